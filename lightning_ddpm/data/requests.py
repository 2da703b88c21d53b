"""Sample requests: what ``predict`` iterates over (one seed, and optionally one label, per sample)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
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
    sampler: Any = None
    if trainer is not None and trainer.world_size > 1:
        sampler = DistributedSampler(
            requests, shuffle=False, drop_last=False, **trainer.strategy.distributed_sampler_kwargs
        )
    return DataLoader(requests, batch_size=batch_size, sampler=sampler)


class SampleRequestsDataModule(pl.LightningDataModule):
    """``predict`` from a checkpoint alone: sample requests, no data (``lightning-ddpm predict --ckpt_path C``).

    The CLI fills ``data_shape`` and ``num_classes`` from the checkpoint when they are not given; the
    module reports them so that the model they are linked to is built as it was trained.

    Args:
        num_predict_samples: how many samples ``predict`` draws.
        predict_seed: seed of the first request (request ``i`` has seed ``predict_seed + i``).
        predict_labels: labels to cycle through (default: every class, when the model is conditional).
        batch_size: requests per forward pass.
        data_shape: the shape of one sample, e.g. ``[3, 32, 32]`` (default: the checkpoint's).
        num_classes: the model's classes, or None (default: the checkpoint's).
    """

    def __init__(
        self,
        num_predict_samples: int = 64,
        predict_seed: int = 0,
        predict_labels: Sequence[int] | None = None,
        batch_size: int = 64,
        data_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        SampleRequests(num_predict_samples)  # num_predict_samples < 1 fails here, not in predict
        self.num_predict_samples, self.predict_seed, self.predict_labels = (
            num_predict_samples,
            predict_seed,
            predict_labels,
        )
        self.batch_size = batch_size
        self._data_shape = list(data_shape) if data_shape is not None else None
        self._num_classes = num_classes

    @property
    def data_shape(self) -> list[int] | None:
        return self._data_shape

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def predict_dataloader(self) -> DataLoader:
        return predict_loader(
            self.num_predict_samples,
            self.predict_seed,
            self.predict_labels,
            self.num_classes,
            self.batch_size,
            self.trainer,
        )
