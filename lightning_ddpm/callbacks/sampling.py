"""The callbacks' one way to draw samples: N samples from the EMA model, shared over the ranks, sample i from
seed + i alone, so that the set (and its order) is the same at any world size."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..samplers import DDIMSampler, Sampler, make_sampler
from .ema import ema_weights

__all__ = ["Drawn", "draw_samples", "iter_samples", "rank_share", "resolve_sampler", "sample_generators"]

# labels="random": sample i's class is drawn from its own generator (before its noise), so it is per-sample too
Labels = Tensor | Sequence[int] | Literal["random"] | None


def resolve_sampler(
    spec: Sampler | str | dict[str, Any] | None,
    current: Sampler,
    pl_module: pl.LightningModule,
    default_steps: int,
    module_default: bool = False,
) -> Sampler:
    """The sampler a callback's ``setup`` settles on for ``pl_module`` (``current``: the one built in ``__init__``).

    No ``spec``: the module's ``default_sampler`` when ``module_default`` (one place says how a config's model is
    sampled), else DDIM with ``default_steps`` capped at T. A name or mapping is rebuilt with its default steps
    capped at T; a Sampler is kept as given. Checked against the module's schedule now, not at step N.
    """
    diffusion = getattr(pl_module, "diffusion", None)
    sampler = current
    default = getattr(pl_module, "default_sampler", None)
    if spec is None and module_default and isinstance(default, Sampler):
        sampler = default
    elif diffusion is not None and spec is None:
        sampler = DDIMSampler(num_steps=min(default_steps, diffusion.num_timesteps))
    elif diffusion is not None and spec is not None and not isinstance(spec, Sampler):
        sampler = make_sampler(spec, num_timesteps=diffusion.num_timesteps)
    if diffusion is not None:
        sampler.grid(diffusion)
    return sampler


class Drawn(NamedTuple):
    """One batch of this rank's share: ``samples[:real]`` are samples ``index[:real]``; the rest pad the share."""

    samples: Tensor
    index: list[int]  # type: ignore[assignment]  # shadows tuple.index: the name the callbacks read
    real: int


def rank_share(num: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """The sample indices ``rank`` draws and how many of them are its own: a contiguous block of
    ceil(num / world_size), padded with repeats of the last index, so that every rank runs the same forward
    passes (a sharded strategy's collectives need every rank) and the blocks in rank order are 0..num-1."""
    world = max(world_size, 1)
    size = -(-num // world)
    start = rank * size
    return [min(i, num - 1) for i in range(start, start + size)], max(0, min(size, num - start))


def sample_generators(index: Sequence[int], seed: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per sample, seeded ``seed + i``: sample i depends on nothing else."""
    return [torch.Generator(device).manual_seed(seed + i) for i in index]


def _labels(
    labels: Labels, index: list[int], generators: list[torch.Generator], pl_module: pl.LightningModule
) -> Tensor | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        if labels != "random":
            raise ValueError(f"labels must be a tensor, a sequence, 'random' or None, got {labels!r}")
        num_classes = getattr(pl_module, "num_classes", None)
        if not num_classes:
            return None
        return torch.cat(
            [torch.randint(0, num_classes, (1,), generator=g, device=pl_module.device) for g in generators]
        )
    return torch.as_tensor(labels)[index].to(pl_module.device)


def iter_samples(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    num_samples: int,
    sampler: Sampler | None = None,
    seed: int = 0,
    labels: Labels = None,
    batch_size: int | None = None,
) -> Iterator[Drawn]:
    """This rank's share of ``num_samples`` samples, in batches of at most ``batch_size`` (``None``: one batch),
    with the EMA weights when an :class:`~lightning_ddpm.callbacks.EMA` callback is active.

    ``labels``: one class per sample (indexed by sample), ``"random"`` (each drawn from its sample's generator;
    unconditional for a model without classes) or ``None``. ``sampler``: ``None`` is the module's own.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    index, real = rank_share(num_samples, trainer.global_rank, trainer.world_size)
    step = batch_size or len(index)
    with ema_weights(trainer, pl_module), torch.no_grad():
        for start in range(0, len(index), step):
            chunk = index[start : start + step]
            generators = sample_generators(chunk, seed, pl_module.device)
            cond = _labels(labels, chunk, generators, pl_module)
            sample: Any = pl_module.sample  # a DiffusionModule's
            samples = sample(len(chunk), sampler=sampler, generator=generators, labels=cond)
            yield Drawn(samples, chunk, max(0, min(len(chunk), real - start)))


@torch.no_grad()
def draw_samples(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    num_samples: int,
    sampler: Sampler | None = None,
    seed: int = 0,
    labels: Labels = None,
    batch_size: int | None = None,
) -> Tensor:
    """All ``num_samples`` samples, in order, on every rank: each rank draws its share (:func:`iter_samples`)
    and the shares are gathered. The same tensor at any world size."""
    samples = torch.cat(
        [drawn.samples for drawn in iter_samples(trainer, pl_module, num_samples, sampler, seed, labels, batch_size)]
    )
    if trainer.world_size > 1:
        samples = trainer.strategy.all_gather(samples).reshape(-1, *samples.shape[1:])
    return samples[:num_samples]
