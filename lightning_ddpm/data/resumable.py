"""Training data order that survives a crash: a per-epoch permutation that can skip ahead.

After a resume in the middle of an epoch, Lightning restarts the epoch's iterator; this
sampler starts where the interrupted run stopped, so the resumed run sees the same batches.
It is a ``DistributedSampler`` (one shard per rank, permutation seeded by seed + epoch), which
Lightning uses as it is instead of injecting its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose next epoch can start after ``skip`` examples of this rank's shard."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._skip = 0

    def skip_next(self, num_examples: int) -> None:
        """Make the next iteration start ``num_examples`` into the epoch (once)."""
        self._skip = num_examples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self._skip:]
        self._skip = 0
        return iter(indices)


def consumed_batches(trainer: Any) -> int:
    """Training batches already taken in the current epoch (non-zero only right after a mid-epoch resume)."""
    try:
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
    except AttributeError:
        return 0


def resumable_train_loader(
    dataset: Dataset, batch_size: int, seed: int, trainer: Any = None, **loader_kwargs: Any
) -> DataLoader:
    """A shuffled training DataLoader whose order depends only on (seed, epoch, rank) and the resume point."""
    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    rank = getattr(trainer, "global_rank", 0) if trainer is not None else 0
    per_device = len(dataset) // world
    if per_device < batch_size:
        # drop_last would give no batches at all, and Lightning would "train" zero steps with success.
        on = f" ({per_device} per device on {world} devices)" if world > 1 else ""
        raise ValueError(
            f"the training set has {len(dataset)} examples{on}, fewer than one batch of batch_size={batch_size}; "
            "lower batch_size or add data"
        )
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=seed)
    if trainer is not None:
        consumed = consumed_batches(trainer)
        # A checkpoint written on the epoch's last batch: Lightning starts the next epoch afresh
        # (it resets the batch counter only after this loader is built), so skip nothing.
        if consumed < per_device // batch_size:
            sampler.skip_next(consumed * batch_size)
    # Its own generator: worker seeds must not draw from (and shift) the global RNG.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      generator=torch.Generator().manual_seed(seed), **loader_kwargs)
