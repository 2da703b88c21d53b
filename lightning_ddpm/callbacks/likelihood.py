"""Log ``val/bpd``: the full-bound NLL in bits/dim on a fixed subset of the validation data."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..data.batches import unpack_batch
from ..training.sampling import evaluating
from .ema import ema_weights


class BitsPerDimCallback(pl.Callback):
    """Every ``every_n_validations`` validation epochs, bits/dim over the first ``num_examples`` validation
    examples of each rank (the validation loader is not shuffled, so the subset is fixed).

    Costs T model calls per batch, so keep ``num_examples`` small during training. Uses the EMA
    weights when an :class:`EMA` callback is active; data must be 8-bit images in [-1, 1].
    """

    def __init__(self, num_examples: int = 256, every_n_validations: int = 1, batch_size: int = 128, seed: int = 0) -> None:
        super().__init__()
        if num_examples < 1 or every_n_validations < 1 or batch_size < 1:
            raise ValueError("num_examples, every_n_validations and batch_size must be >= 1")
        self.num_examples, self.every_n_validations = num_examples, every_n_validations
        self.batch_size, self.seed = batch_size, seed
        self._subset: list[Tensor] = []
        self._validations = 0
        self.last: float | None = None

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        have = sum(x.shape[0] for x in self._subset)
        if trainer.sanity_checking or have >= self.num_examples:
            return
        x, _ = unpack_batch(batch)
        self._subset.append(x[: self.num_examples - have].detach())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._subset:
            return
        self._validations += 1
        if self._validations % self.every_n_validations:
            return
        data = torch.cat(self._subset)
        generator = torch.Generator(pl_module.device).manual_seed(self.seed + trainer.global_rank)
        with evaluating(pl_module), ema_weights(trainer, pl_module), torch.no_grad():
            bpd = torch.cat([
                pl_module.diffusion.bits_per_dim(pl_module.denoiser(), chunk, generator=generator)
                for chunk in data.split(self.batch_size)
            ])
        self.last = float(bpd.mean())
        pl_module.log("val/bpd", bpd.mean().float(), sync_dist=True)
