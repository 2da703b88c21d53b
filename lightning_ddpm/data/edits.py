"""Edit requests: what ``predict`` iterates over to edit images (SDEdit) or complete them (inpainting).

Request ``i`` is one image with seed ``seed + i`` and, for inpainting, its mask (1 keeps a pixel, 0 generates
it), or, for SDEdit, the strength. ``DiffusionModule.predict_step`` runs ``inpaint`` or ``edit`` on a batch of
them; ``SampleWriter`` writes the results and a before/after grid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["MASKS", "named_mask", "EditRequests", "EditRequestsDataModule"]

# Each name says where the hole is, the region that is generated (mask 0); the rest is kept (mask 1).
MASKS = ("center", "left_half", "right_half", "top_half", "bottom_half", "random_boxes")


def named_mask(name: str, height: int, width: int, seed: int = 0) -> Tensor:
    """A ``(1, height, width)`` float mask, 1 where the image is kept and 0 where it is generated.

    ``center``: the central square of half the side; ``left_half`` ... ``bottom_half``: that half;
    ``random_boxes``: one to three boxes of a quarter to a half of each side, placed from ``seed``.
    """
    mask = torch.ones(1, height, width)
    if name == "center":
        mask[:, height // 4 : height - height // 4, width // 4 : width - width // 4] = 0
    elif name == "left_half":
        mask[:, :, : width // 2] = 0
    elif name == "right_half":
        mask[:, :, width // 2 :] = 0
    elif name == "top_half":
        mask[:, : height // 2] = 0
    elif name == "bottom_half":
        mask[:, height // 2 :] = 0
    elif name == "random_boxes":
        g = torch.Generator().manual_seed(seed)
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            h = int(torch.randint(max(1, height // 4), max(2, height // 2 + 1), (), generator=g))
            w = int(torch.randint(max(1, width // 4), max(2, width // 2 + 1), (), generator=g))
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            mask[:, top : top + h, left : left + w] = 0
    else:
        raise ValueError(f"unknown mask {name!r}; choose one of: {', '.join(MASKS)} (or give a folder of masks)")
    return mask


def _held_out_digits() -> Tensor:
    """The validation split of ``ImageDataModule("digits")`` (what ``configs/digits.yaml`` holds out), in [-1, 1]."""
    from .images import ImageDataModule

    datamodule = ImageDataModule("digits")
    datamodule.setup()
    val = datamodule._val
    assert val is not None  # made by setup
    return torch.stack([val[i][0] for i in range(len(val))])  # type: ignore[arg-type]


def _load_folder(root: str, channels: int, image_size: tuple[int, int] | None) -> tuple[Tensor, list[str]]:
    """Every image under ``root`` in file-name order, in [-1, 1], and the file stems."""
    from .images import ImageFolderDataset, _Transformed

    folder = ImageFolderDataset(root, channels, image_size)
    shown = _Transformed(folder, image_size, random_flip=False)  # resized and cropped as for training, in [-1, 1]
    return torch.stack([shown[i][0] for i in range(len(shown))]), [p.stem for p in folder.files]


class EditRequests(Dataset):
    """Request ``i`` edits image ``i // repeats`` from seed ``seed + i``: ``{"seed", "index", "images", "mask" or
    "strength", "sampler"}`` (the sampler as JSON, empty for the default)."""

    def __init__(
        self,
        images: Tensor,
        seed: int,
        repeats: int,
        masks: Tensor | None = None,
        mask: str | None = None,
        strength: float | None = None,
        sampler: str | dict[str, Any] | None = None,
    ) -> None:
        self.images, self.seed, self.repeats = images, seed, repeats
        self.masks, self.mask, self.strength = masks, mask, strength
        self.sampler = json.dumps(sampler) if sampler is not None else ""

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.images[i // self.repeats]
        item: dict[str, Any] = {"seed": torch.tensor(self.seed + i), "index": torch.tensor(i), "images": image}
        if self.strength is not None:
            item["strength"] = torch.tensor(float(self.strength))
        elif self.masks is not None:
            item["mask"] = self.masks[i // self.repeats].expand_as(image)
        else:
            assert self.mask is not None  # the DataModule asks for one of the three
            height, width = image.shape[-2:]
            item["mask"] = named_mask(self.mask, height, width, seed=self.seed + i).expand_as(image)
        item["sampler"] = self.sampler
        return item


class EditRequestsDataModule(pl.LightningDataModule):
    """``predict`` on images: complete them under a mask (inpainting) or re-imagine them (SDEdit).

    ``lightning-ddpm predict --ckpt_path C --data EditRequestsDataModule --data.images photos/ --data.mask center``
    completes the centre of every image in ``photos/`` with ``repaint``; ``--data.strength 0.5`` edits them
    instead. ``SampleWriter`` writes the results (``samples.pt``, ``samples.png``) and ``edits.png``: per
    request, the original, what the model was given, and the result.

    Args:
        images: a folder of images (file-name order), or ``digits``: the held-out split of scikit-learn's
            digits as ``configs/digits.yaml`` holds it out.
        mask: a named mask, the region generated: ``center``, ``left_half``, ``right_half``, ``top_half``,
            ``bottom_half`` or ``random_boxes`` (placed from each request's seed).
        masks: a folder of masks, one per image with the same file stem; white (>= 128) keeps, black generates.
        strength: SDEdit strength in (0, 1] instead of a mask.
        seed: seed of the first request (request ``i`` has seed ``seed + i``).
        repeats: requests per image (different seeds): several completions of each.
        num_images: only the first this many images (default: all).
        sampler: the sampler (default: ``repaint`` for masks, the model's sampler for SDEdit).
        channels, image_size: how images are read (as ``ImageDataModule``).
        batch_size: requests per forward pass.
        data_shape, num_classes: the model's (default: the checkpoint's).
    """

    def __init__(
        self,
        images: str,
        mask: str | None = None,
        masks: str | None = None,
        strength: float | None = None,
        seed: int = 0,
        repeats: int = 1,
        num_images: int | None = None,
        sampler: str | dict[str, Any] | None = None,
        channels: int = 3,
        image_size: Sequence[int] | None = None,
        batch_size: int = 16,
        data_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        options = (("mask", mask), ("masks", masks), ("strength", strength))
        given = [name for name, value in options if value is not None]
        if len(given) != 1:
            raise ValueError(
                "edit requests need exactly one of mask (a named mask), masks (a folder) or strength (SDEdit), "
                f"got {', '.join(given) if given else 'none'}"
            )
        if mask is not None and mask not in MASKS:
            named_mask(mask, 1, 1)  # raises with the list
        if strength is not None:
            from ..samplers.base import check_strength

            check_strength(strength)
        for field, value in (("repeats", repeats), ("num_images", num_images), ("batch_size", batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{field} must be >= 1, got {value}")
        self.num_images = num_images
        self.images, self.mask, self.masks, self.strength = images, mask, masks, strength
        self.seed, self.repeats, self.sampler, self.batch_size = seed, repeats, sampler, batch_size
        self.channels = channels
        self.image_size = tuple(image_size) if image_size is not None else None
        self._data_shape = list(data_shape) if data_shape is not None else None
        self._num_classes = num_classes
        self._requests: EditRequests | None = None

    @property
    def data_shape(self) -> list[int] | None:
        return self._data_shape

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def requests(self) -> EditRequests:
        """The requests (images read once)."""
        if self._requests is None:
            if self.images == "digits":
                images, stems = _held_out_digits(), list[str]()
            else:
                images, stems = _load_folder(self.images, self.channels, self.image_size)  # type: ignore[arg-type]
            if self.num_images is not None:
                images, stems = images[: self.num_images], stems[: self.num_images]
            masks = self._load_masks(stems, images) if self.masks is not None else None
            self._requests = EditRequests(
                images, self.seed, self.repeats, masks, self.mask, self.strength, self.sampler
            )
        return self._requests

    def _load_masks(self, stems: list[str], images: Tensor) -> Tensor:
        from .images import ImageFolderDataset

        assert self.masks is not None
        folder = ImageFolderDataset(self.masks, channels=1, image_size=tuple(images.shape[-2:]))  # type: ignore[arg-type]
        by_stem = {path.stem: i for i, path in enumerate(folder.files)}
        missing = [stem for stem in stems if stem not in by_stem]
        if not stems or missing:
            raise ValueError(
                f"masks: no mask under {self.masks!r} for {len(missing) or len(images)} images, "
                f"e.g. {(missing or ['digits'])[0]!r} (one mask per image, with the image's file stem)"
            )
        import numpy as np
        from PIL import Image

        size = (images.shape[-1], images.shape[-2])  # PIL's (width, height)
        pixels = [np.asarray(folder[by_stem[stem]][0].resize(size, Image.Resampling.NEAREST)) for stem in stems]
        return torch.stack([torch.from_numpy(p >= 128).float()[None] for p in pixels])

    def predict_dataloader(self) -> DataLoader:
        requests = self.requests()
        sampler: Any = None
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:  # even shares, as predict_loader's (see there)
            sampler = DistributedSampler(
                requests, shuffle=False, drop_last=False, **trainer.strategy.distributed_sampler_kwargs
            )
        return DataLoader(requests, batch_size=self.batch_size, sampler=sampler)
