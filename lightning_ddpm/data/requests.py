"""Sample requests: what ``predict`` iterates over (one seed, and optionally one label, per sample)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset


class SampleRequests(Dataset):
    """Request ``i`` asks for one sample with seed ``seed + i`` and label ``labels[i % len(labels)]``.

    Under DDP the distributed sampler shares the requests out, so every rank generates its part
    and the total is exactly ``num_samples``.
    """

    def __init__(self, num_samples: int, seed: int = 0, labels: Sequence[int] | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"num_predict_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.labels = list(labels) if labels is not None else None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"seed": torch.tensor(self.seed + i), "index": torch.tensor(i)}
        if self.labels:
            item["labels"] = torch.tensor(self.labels[i % len(self.labels)])
        return item


def predict_loader(
    num_samples: int, seed: int, labels: Sequence[int] | None, num_classes: int | None, batch_size: int
) -> DataLoader:
    """The DataModules' ``predict_dataloader``: requested labels, else every class in turn when labelled."""
    if labels is None and num_classes is not None:
        labels = list(range(num_classes))
    return DataLoader(SampleRequests(num_samples, seed, labels), batch_size=batch_size)
