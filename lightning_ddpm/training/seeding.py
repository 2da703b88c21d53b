"""The generators a step draws from: keyed by (stage, step, micro-batch, rank), never the global RNG.

Validation losses are then comparable between epochs, and a resumed run draws exactly what the
uninterrupted one would have (the keys go through :func:`lightning_ddpm.core.seeding.seed_of`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.seeding import seed_of

__all__ = ["request_generators", "step_generator"]


def step_generator(
    stage: str, batch_idx: int, device: torch.device, global_step: int = 0, accumulate: int = 1, rank: int = 0
) -> torch.Generator:
    """A generator on ``device`` for this step: training keys on the optimizer step, the micro-batch within
    it (``accumulate``: gradient accumulation) and the rank; evaluation on the batch and rank."""
    key: tuple[str | int, ...]
    if stage == "train":
        key = ("train", torch.initial_seed(), global_step, batch_idx % accumulate, rank)
    else:
        key = (stage, batch_idx, rank)
    return torch.Generator(device).manual_seed(seed_of(key))


def request_generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One generator per sample request: its sample depends on its seed alone (starting and per-step noise),
    not on how requests were batched or shared between ranks (a promise of docs/cli.md)."""
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]
