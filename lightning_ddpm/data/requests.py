"""Sample requests: what ``predict`` iterates over (one seed, and optionally one label, per sample)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class SampleRequests(Dataset):
    """Request ``i`` asks for one sample with seed ``seed + i`` and label ``labels[i % len(labels)]``.

    With several processes each rank generates its share (``predict_loader``), and the prediction
    writer merges them back into exactly ``num_samples``, in request order.
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
    num_samples: int,
    seed: int,
    labels: Sequence[int] | None,
    num_classes: int | None,
    batch_size: int,
    trainer: Any = None,
) -> DataLoader:
    """The DataModules' ``predict_dataloader``: requested labels, else every class in turn when labelled.

    With several processes every rank gets the same number of requests (the last ones padded with
    repeats, which the writer drops): under a sharded strategy (FSDP2) each forward gathers parameters
    from every rank, so a rank with one batch fewer would leave the others waiting forever. Lightning's
    own predict sampler shares requests out unevenly, so this one is set here and Lightning keeps it.
    """
    if labels is None and num_classes is not None:
        labels = list(range(num_classes))
    requests = SampleRequests(num_samples, seed, labels)
    sampler = None
    if trainer is not None and trainer.world_size > 1:
        sampler = DistributedSampler(requests, shuffle=False, drop_last=False,
                                     **trainer.strategy.distributed_sampler_kwargs)
    return DataLoader(requests, batch_size=batch_size, sampler=sampler)
