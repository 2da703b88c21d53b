"""Image datasets scaled to [-1, 1]: CIFAR-10, MNIST, Fashion-MNIST, an image folder, sklearn digits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..core.registry import Registry
from ..core.seeding import seed_of
from .requests import predict_loader
from .resumable import resumable_train_loader

__all__ = ["ImageDataModule", "ImageFolderDataset", "IMAGE_DATASETS", "IMAGE_EXTENSIONS"]

# name -> (channels, height, width, classes); imagefolder's come from its arguments and files.
IMAGE_DATASETS: Registry[tuple[int, int, int, int | None]] = Registry("dataset")
for _name, _shape in {
    "cifar10": (3, 32, 32, 10),
    "mnist": (1, 28, 28, 10),
    "fashion_mnist": (1, 28, 28, 10),
    "digits": (1, 8, 8, 10),
    "imagefolder": (3, 0, 0, None),
}.items():
    IMAGE_DATASETS.register(_name, _shape)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_TORCHVISION = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _to_unit_range(images: Tensor) -> Tensor:
    """uint8 or [0, 1] float images -> float32 in [-1, 1]."""
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return images * 2.0 - 1.0


class _Transformed(Dataset):
    """Applies resize / flip / scaling to an underlying dataset that yields (image, label).

    The random flip is a function of (seed, epoch, index): the training sampler indexes this dataset
    with ``(index, epoch)`` keys (``keyed_by_epoch``), and each key seeds its own generator, so the
    number of worker processes, the rank and a resume (fresh workers) never change an image's flips.
    A plain integer index means epoch 0.
    """

    keyed_by_epoch = True

    def __init__(self, base: Dataset, image_size: tuple[int, int] | None, random_flip: bool, seed: int = 0) -> None:
        from torchvision.transforms import v2

        self.base, self.random_flip, self.seed = base, random_flip, seed
        steps: list = [v2.ToImage()]
        if image_size is not None:
            steps += [v2.Resize(min(image_size), antialias=True), v2.CenterCrop(image_size)]
        steps.append(v2.ToDtype(torch.uint8, scale=True))
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]  # a map-style dataset: Dataset does not declare __len__

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, label = self.base[index]
        image = self.transform(image)
        if self.random_flip:
            # Every random draw of the augmentation comes from this (seed, epoch, index) generator.
            generator = torch.Generator().manual_seed(seed_of(("augment", self.seed, epoch, index)))
            if torch.rand((), generator=generator) < 0.5:
                image = image.flip(-1)
        return _to_unit_range(image), int(label)


class ImageFolderDataset(Dataset):
    """Every image under ``root``; if all images sit in subfolders, the subfolder names are the classes.

    Every file is checked once when the dataset is built (each image's header and, for PNGs, its chunk
    checksums; nothing is decoded): unreadable files and, without ``image_size``, mixed sizes are reported
    then with a count, before training starts, not when a worker first draws the file.
    """

    def __init__(self, root: str | Path, channels: int = 3, image_size: tuple[int, int] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder root {str(self.root)!r} does not exist or is not a folder")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(self.root)!r}")
        top = [p.relative_to(self.root).parts for p in self.files]
        self.classes = sorted({parts[0] for parts in top}) if all(len(parts) > 1 for parts in top) else []
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = [index[parts[0]] for parts in top] if self.classes else [0] * len(self.files)
        self.mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
        if self.mode is None:
            raise ValueError(f"channels must be 1, 3 or 4 for an image folder, got {channels}")
        self.image_size = image_size
        sizes = self._scan()
        self.first_size = sizes[0] if image_size is None else None
        if image_size is None and len(set(sizes)) > 1:
            counts: dict[tuple[int, int], int] = {}
            for size in sizes:
                counts[size] = counts.get(size, 0) + 1
            seen = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items(), key=lambda kv: -kv[1])[:4])
            odd = next(i for i, size in enumerate(sizes) if size != sizes[0])
            raise ValueError(
                f"the images under {str(self.root)!r} have {len(counts)} sizes ({seen}), e.g. "
                f"{str(self.files[odd])!r} is {sizes[odd][0]}x{sizes[odd][1]} but the first image is "
                f"{sizes[0][0]}x{sizes[0][1]}; set image_size to resize them all (data.init_args.image_size)"
            )

    def _scan(self) -> list[tuple[int, int]]:
        """Each file's (width, height) from its header; every unreadable file is named in one error."""
        from PIL import Image, UnidentifiedImageError

        sizes, bad = [], []
        for path in self.files:
            try:
                with Image.open(path) as image:
                    sizes.append(image.size)
                    image.verify()  # PNG: chunk checksums, a truncated file; no decoding
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
                bad.append((path, err))
        if bad:
            examples = "; ".join(f"{str(path)!r} ({err})" for path, err in bad[:3])
            raise ValueError(
                f"cannot read image: {len(bad)} of {len(self.files)} files under {str(self.root)!r} "
                f"are not readable images, e.g. {examples}; remove or replace them"
            )
        return sizes

    def _open(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path = self.files[i]
        try:
            with Image.open(path) as image:
                return image.convert(self.mode)
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise ValueError(f"cannot read image {str(path)!r}: {err}") from err

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = self._open(i)
        if self.first_size is not None and image.size != self.first_size:
            raise ValueError(
                f"image {str(self.files[i])!r} is {image.size[0]}x{image.size[1]} but the first image is "
                f"{self.first_size[0]}x{self.first_size[1]}; set image_size to resize them all"
            )
        return image, self.labels[i]


class _Digits(Dataset):
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16): real images with no download."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = torch.from_numpy(digits.images).float().div(16.0).mul(255).round().to(torch.uint8)[:, None]
        self.targets = torch.from_numpy(digits.target).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.targets[i])


class ImageDataModule(pl.LightningDataModule):
    """Images in [-1, 1] with labels.

    Args:
        dataset: ``cifar10``, ``mnist``, ``fashion_mnist`` (torchvision; downloaded in ``prepare_data``),
            ``imagefolder`` (``root`` is the folder) or ``digits`` (scikit-learn's 8x8 digits, no network).
        root: where torchvision datasets live (or are downloaded to), or the image folder.
        image_size: resize (shorter side) and centre-crop to this size; required for ``imagefolder``
            unless every image has the same size.
        channels: channels of an image folder (1 grey, 3 RGB, 4 RGBA); the other datasets fix their own.
        batch_size: per-device batch size.
        val_fraction: held-out fraction for datasets without a test split (digits, imagefolder).
        num_workers: dataloader worker processes.
        pin_memory: pinned host memory for faster GPU transfer.
        random_flip: random horizontal flips in training (Ho et al. use them on CIFAR-10); each image's flip
            is a function of (seed, epoch, index), so a resumed run flips what an uninterrupted one would.
        labels: expose class labels, which makes the linked model class-conditional.
        download: let ``prepare_data`` download torchvision datasets.
        seed: seed of the train/val split, the training order and the flips.
        num_predict_samples: how many samples ``predict`` draws.
        predict_seed: seed of the first predict request.
        predict_labels: labels to cycle through in ``predict`` (default: every class, when ``labels``).
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str = "data",
        image_size: int | None = None,
        channels: int = 3,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        pin_memory: bool = False,
        random_flip: bool = False,
        labels: bool = False,
        download: bool = True,
        seed: int = 0,
        num_predict_samples: int = 64,
        predict_seed: int = 0,
        predict_labels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        IMAGE_DATASETS.get(dataset)  # an unknown name fails here, with the choices
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        if dataset == "imagefolder" and not Path(root).is_dir():
            raise FileNotFoundError(f"image folder root {root!r} does not exist or is not a folder")
        self.dataset, self.root = dataset, root
        self.image_size = (image_size, image_size) if image_size else None
        self.channels = channels if dataset == "imagefolder" else IMAGE_DATASETS[dataset][0]
        self.batch_size, self.val_fraction = batch_size, val_fraction
        self.num_workers, self.pin_memory, self.random_flip = num_workers, pin_memory, random_flip
        self.labels, self.download, self.seed = labels, download, seed
        self.num_predict_samples, self.predict_seed, self.predict_labels = (
            num_predict_samples,
            predict_seed,
            predict_labels,
        )
        self._folder: ImageFolderDataset | None = None
        self._train: Dataset | None = None
        self._val: Dataset | None = None

    def _image_folder(self) -> ImageFolderDataset:
        if self._folder is None:
            self._folder = ImageFolderDataset(self.root, self.channels, self.image_size)
        return self._folder

    @property
    def data_shape(self) -> list[int]:
        if self.image_size is not None:
            return [self.channels, *self.image_size]
        if self.dataset == "imagefolder":
            size = self._image_folder().first_size
            assert size is not None  # without image_size the folder records its images' one size
            width, height = size
            return [self.channels, height, width]
        return list(IMAGE_DATASETS[self.dataset][:3])

    @property
    def num_classes(self) -> int | None:
        if not self.labels:
            return None
        if self.dataset == "imagefolder":
            classes = self._image_folder().classes
            if not classes:
                raise ValueError(
                    f"labels: true needs class subfolders under {self.root!r}, found images at the top level"
                )
            return len(classes)
        return IMAGE_DATASETS[self.dataset][3]

    def prepare_data(self) -> None:
        if self.dataset in _TORCHVISION and self.download:
            import torchvision.datasets as tvd

            cls = getattr(tvd, _TORCHVISION[self.dataset])
            cls(self.root, train=True, download=True)
            cls(self.root, train=False, download=True)

    def _torchvision(self, train: bool) -> Dataset:
        import torchvision.datasets as tvd

        try:
            return getattr(tvd, _TORCHVISION[self.dataset])(self.root, train=train, download=False)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{self.dataset} not found under root {self.root!r} ({err}); run once with download: true on a "
                "machine with network, or copy the downloaded files there"
            ) from err

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        if self.dataset in _TORCHVISION:
            train_base, val_base = self._torchvision(True), self._torchvision(False)
        else:
            base = self._image_folder() if self.dataset == "imagefolder" else _Digits()
            order = torch.randperm(len(base), generator=torch.Generator().manual_seed(self.seed)).tolist()
            num_val = max(1, int(round(self.val_fraction * len(base))))
            train_base, val_base = Subset(base, order[num_val:]), Subset(base, order[:num_val])
        self._train = _Transformed(train_base, self.image_size, self.random_flip, self.seed)
        self._val = _Transformed(val_base, self.image_size, False)

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self._train is not None  # made by setup
        return resumable_train_loader(
            self._train,
            self.batch_size,
            self.seed,
            getattr(self, "trainer", None),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self._val is not None  # made by setup
        return self._loader(self._val)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return predict_loader(
            self.num_predict_samples,
            self.predict_seed,
            self.predict_labels,
            self.num_classes,
            self.batch_size,
            self.trainer,
        )
