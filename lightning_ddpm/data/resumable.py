"""Training data order that survives a crash: a per-epoch permutation that can skip ahead.

After a resume in the middle of an epoch, Lightning restarts the epoch's iterator; this
sampler starts where the interrupted run stopped, so the resumed run sees the same batches.
It is a ``DistributedSampler`` (one shard per rank, permutation seeded by seed + epoch), which
Lightning uses as it is instead of injecting its own.

A dataset with random augmentation sets ``keyed_by_epoch = True`` and is then indexed with
``(index, epoch)`` keys: its draws become a function of (seed, epoch, index). Worker processes
(persistent ones keep their copy of the dataset from the first epoch) learn the epoch from the
key, and neither the number of workers, the rank an example lands on, nor a resume (new worker
processes with fresh RNG streams) changes what an example's augmentation is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose next epoch can start after ``skip`` examples of this rank's shard.

    With ``keyed=True`` it yields ``(index, epoch)`` pairs instead of indices (see the module docstring).
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, keyed: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._skip = 0
        self.keyed = keyed

    def skip_next(self, num_examples: int) -> None:
        """Make the next iteration start ``num_examples`` into the epoch (once)."""
        self._skip = num_examples

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        indices = list(super().__iter__())[self._skip :]
        self._skip = 0
        return iter([(i, self.epoch) for i in indices] if self.keyed else indices)


def consumed_batches(trainer: Any) -> int:
    """Training batches already taken in the current epoch (non-zero only right after a mid-epoch resume)."""
    try:
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
    except AttributeError:
        return 0


def epoch_to_run(trainer: Any) -> int:
    """The epoch whose data Lightning will draw next (what it passes to ``set_epoch``)."""
    try:
        return int(trainer.fit_loop.epoch_progress.current.processed)
    except AttributeError:
        return 0


def resumable_train_loader(
    dataset: Dataset, batch_size: int, seed: int, trainer: Any = None, **loader_kwargs: Any
) -> DataLoader:
    """A shuffled training DataLoader whose order depends only on (seed, epoch, rank) and the resume point."""
    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    rank = getattr(trainer, "global_rank", 0) if trainer is not None else 0
    size = len(dataset)  # type: ignore[arg-type]  # a map-style dataset: Dataset does not declare __len__
    per_device = size // world
    if per_device < batch_size:
        # drop_last would give no batches at all, and Lightning would "train" zero steps with success.
        on = f" ({per_device} per device on {world} devices)" if world > 1 else ""
        raise ValueError(
            f"the training set has {size} examples{on}, fewer than one batch of batch_size={batch_size}; "
            "lower batch_size or add data"
        )
    sampler = ResumableSampler(
        dataset, num_replicas=world, rank=rank, seed=seed, keyed=bool(getattr(dataset, "keyed_by_epoch", False))
    )
    if trainer is not None:
        # Lightning creates the loader's iterator before it calls set_epoch, and on a resume it keeps that
        # iterator; worker processes make iter() draw the first indices at once, so they would come
        # from epoch 0's permutation. Start at the right epoch instead.
        sampler.set_epoch(epoch_to_run(trainer))
        consumed = consumed_batches(trainer)
        # A checkpoint written on the epoch's last batch: Lightning starts the next epoch afresh
        # (it resets the batch counter only after this loader is built), so skip nothing.
        if consumed < per_device // batch_size:
            sampler.skip_next(consumed * batch_size)
    # Its own generator: worker seeds must not draw from (and shift) the global RNG.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        **loader_kwargs,
    )
