"""LightningDataModules: 2-D toy distributions and image datasets."""

from .contract import DiffusionDataModule
from .edits import MASKS, EditRequests, EditRequestsDataModule, named_mask
from .images import ImageDataModule, ImageFolderDataset
from .requests import SampleRequests, SampleRequestsDataModule
from .toy2d import TOY_DISTRIBUTIONS, Toy2DDataModule, sample_toy2d

__all__ = [
    "DiffusionDataModule",
    "EditRequests",
    "EditRequestsDataModule",
    "MASKS",
    "named_mask",
    "ImageDataModule",
    "ImageFolderDataset",
    "SampleRequests",
    "SampleRequestsDataModule",
    "TOY_DISTRIBUTIONS",
    "Toy2DDataModule",
    "sample_toy2d",
]
