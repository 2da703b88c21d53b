"""2-D toy distributions, generated on the fly from a seed (no download), and their DataModule."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ..core.registry import Registry
from .requests import predict_loader
from .resumable import resumable_train_loader

__all__ = ["TOY_DISTRIBUTIONS", "sample_toy2d", "Toy2DDataModule"]

# name -> (sampler(n, generator) -> (points (n, 2), labels (n,)), number of classes)
ToySampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
TOY_DISTRIBUTIONS: Registry[tuple[ToySampler, int]] = Registry("distribution")


def _register(name: str, num_classes: int) -> Callable[[ToySampler], ToySampler]:
    def decorator(fn: ToySampler) -> ToySampler:
        TOY_DISTRIBUTIONS.register(name, (fn, num_classes))
        return fn

    return decorator


def _randn(n: int, g: torch.Generator) -> Tensor:
    return torch.randn(n, 2, generator=g)


@_register("two_moons", 2)
def two_moons(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    labels = torch.randint(0, 2, (n,), generator=g)
    angle = torch.rand(n, generator=g) * math.pi
    x = torch.where(labels == 0, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(labels == 0, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x - 0.5, y - 0.25], dim=1) / 1.2 + 0.04 * _randn(n, g)
    return points, labels


@_register("eight_gaussians", 8)
def eight_gaussians(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    labels = torch.randint(0, 8, (n,), generator=g)
    angle = labels.float() * (2 * math.pi / 8)
    centers = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + 0.08 * _randn(n, g), labels


@_register("swiss_roll", 3)
def swiss_roll(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    u = torch.rand(n, generator=g)
    turn = 1.5 * math.pi * (1 + 2 * u)
    points = torch.stack([turn * torch.cos(turn), turn * torch.sin(turn)], dim=1) / (4.5 * math.pi)
    labels = (u * 3).long().clamp(max=2)  # inner, middle, outer third of the roll
    return points + 0.02 * _randn(n, g), labels


@_register("checkerboard", 8)
def checkerboard(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    labels = torch.randint(0, 8, (n,), generator=g)
    row = labels // 2
    col = (labels % 2) * 2 + (row % 2)  # the dark squares of a 4x4 board
    offset = torch.rand(n, 2, generator=g)
    points = torch.stack([col.float() + offset[:, 0], row.float() + offset[:, 1]], dim=1) / 2 - 1
    return points, labels


@_register("rings", 3)
def rings(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    labels = torch.randint(0, 3, (n,), generator=g)
    radius = (labels.float() + 1) / 3
    angle = torch.rand(n, generator=g) * 2 * math.pi
    points = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return points + 0.025 * _randn(n, g), labels


@_register("spiral_arms", 3)
def spiral_arms(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Three thin arms winding 1.5 turns out of the centre, 0.22 apart (radially) at the rim: fine structure."""
    labels = torch.randint(0, 3, (n,), generator=g)
    # sqrt: uniform along the arc (arc length grows with turn^2 on an Archimedean spiral)
    turn = 3 * math.pi * torch.rand(n, generator=g).sqrt()
    angle = turn + labels.float() * (2 * math.pi / 3)
    points = (turn / (3 * math.pi))[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return points + 0.015 * _randn(n, g), labels


@_register("pentagram", 5)
def pentagram(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Points jittered (sd 0.01) along a line drawing: the five strokes of a star, crossing each other."""
    labels = torch.randint(0, 5, (n,), generator=g)
    vertex = torch.arange(5) * 2 * math.pi / 5 + math.pi / 2  # the pentagon's corners, one at the top
    corners = torch.stack([torch.cos(vertex), torch.sin(vertex)], dim=1)
    start, end = corners[labels], corners[(labels + 2) % 5]  # stroke k joins corner k to corner k + 2
    along = torch.rand(n, 1, generator=g)
    return start + along * (end - start) + 0.01 * _randn(n, g), labels


def sample_toy2d(name: str, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``n`` points of a named distribution and their class labels (mixture component / segment)."""
    return TOY_DISTRIBUTIONS.get(name)[0](n, generator or torch.Generator().manual_seed(0))


class Toy2DDataModule(pl.LightningDataModule):
    """A 2-D toy distribution, drawn once from ``seed`` into memory.

    Args:
        distribution: ``two_moons``, ``eight_gaussians``, ``swiss_roll``, ``checkerboard``, ``rings``,
            ``spiral_arms`` or ``pentagram`` (``TOY_DISTRIBUTIONS`` lists them).
        num_train: training points (one epoch).
        num_val: validation points.
        batch_size: per-device batch size.
        seed: seed of the data draw (train, val and the plotting reference all follow from it).
        labels: expose class labels, which makes the linked model class-conditional.
        num_predict_samples: how many samples ``predict`` draws.
        predict_seed: seed of the first predict request.
        predict_labels: labels to cycle through in ``predict`` (default: every class, when ``labels``).
    """

    def __init__(
        self,
        distribution: str = "two_moons",
        num_train: int = 50_000,
        num_val: int = 5_000,
        batch_size: int = 256,
        seed: int = 0,
        labels: bool = False,
        num_predict_samples: int = 2000,
        predict_seed: int = 0,
        predict_labels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        TOY_DISTRIBUTIONS.get(distribution)  # an unknown name fails here, with the choices
        if not 1 <= batch_size <= num_train:
            raise ValueError(f"num_train={num_train} must hold at least one batch of batch_size={batch_size} (>= 1)")
        if num_val < 1:
            raise ValueError(f"num_val must be >= 1, got {num_val}")
        self.distribution = distribution
        self.num_train, self.num_val, self.batch_size, self.seed = num_train, num_val, batch_size, seed
        self.labels = labels
        self.num_predict_samples, self.predict_seed = num_predict_samples, predict_seed
        self.predict_labels = predict_labels
        self._train: TensorDataset | None = None
        self._val: TensorDataset | None = None

    @property
    def data_shape(self) -> list[int]:
        return [2]

    @property
    def num_classes(self) -> int | None:
        return TOY_DISTRIBUTIONS[self.distribution][1] if self.labels else None

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            g = torch.Generator().manual_seed(self.seed)
            self._train = TensorDataset(*sample_toy2d(self.distribution, self.num_train, g))
            self._val = TensorDataset(*sample_toy2d(self.distribution, self.num_val, g))

    def reference_points(self, n: int = 5000) -> Tensor:
        """Fresh data points for plots and quality metrics (a separate seed from train/val)."""
        return sample_toy2d(self.distribution, n, torch.Generator().manual_seed(self.seed + 1))[0]

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self._train is not None  # made by setup
        return resumable_train_loader(self._train, self.batch_size, self.seed, getattr(self, "trainer", None))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self._val is not None  # made by setup
        return DataLoader(self._val, batch_size=self.batch_size)

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
