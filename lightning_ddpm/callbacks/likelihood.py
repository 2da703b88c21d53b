"""Log ``val/bpd``: the full-bound NLL in bits/dim on a fixed subset of the validation data."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..core.dtypes import precise_dtype
from ..data.batches import unpack_batch
from ..training.sampling import evaluating
from .config import Configurable
from .ema import ema_weights
from .sampling import sample_generators

__all__ = ["BitsPerDimCallback"]


class BitsPerDimCallback(Configurable, pl.Callback):
    """Every ``every_n_validations`` validation epochs, bits/dim over the first ``num_examples`` validation
    examples, kept from the first validation pass (as FID keeps its real statistics): the subset is fixed.

    The rule the sampling callbacks follow: example i (its index in the validation set) is noised from
    ``seed + i`` alone, and the ranks share the subset, so ``val/bpd`` is the same at any world size. The
    index assumes Lightning's distributed sampler, which deals the examples out in turn (rank r's j-th
    example is example ``j * world_size + r``).

    Costs T model calls per batch, so keep ``num_examples`` small during training. Uses the EMA
    weights when an :class:`EMA` callback is active; data must be 8-bit images in [-1, 1].
    """

    def __init__(
        self, num_examples: int = 256, every_n_validations: int = 1, batch_size: int = 128, seed: int = 0
    ) -> None:
        super().__init__()
        if num_examples < 1 or every_n_validations < 1 or batch_size < 1:
            raise ValueError("num_examples, every_n_validations and batch_size must be >= 1")
        self.num_examples, self.every_n_validations = num_examples, every_n_validations
        self.batch_size, self.seed = batch_size, seed
        self._subset: list[Tensor] = []
        self._index: list[int] = []  # the validation-set index of each kept example
        self._seen = 0  # this rank's validation examples in the first pass
        self._collected = False  # the first (non-sanity) validation pass is over
        self._validations = 0
        self.last: float | None = None

    def state_dict(self) -> dict[str, Any]:
        # every_n_validations counts the run's validations (as FIDCallback's does): a resumed run evaluates where
        # an uninterrupted one does. The subset is not kept; the next validation collects it again.
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or self._collected or dataloader_idx != 0:
            return
        x, _ = unpack_batch(batch)
        world, rank = max(trainer.world_size, 1), trainer.global_rank
        index = [(self._seen + j) * world + rank for j in range(x.shape[0])]
        self._seen += x.shape[0]
        keep = [j for j, i in enumerate(index) if i < self._limit(trainer)]
        if keep:
            self._subset.append(x[keep].detach())
            self._index += [index[j] for j in keep]

    def _limit(self, trainer: pl.Trainer) -> int:
        """``num_examples``, or the validation set's size when it is smaller (the distributed sampler pads a
        rank's share with repeats, which must not count twice)."""
        loaders = getattr(trainer, "val_dataloaders", None)
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        dataset = getattr(loader, "dataset", None)
        try:
            return min(self.num_examples, len(dataset))  # type: ignore[arg-type]
        except TypeError:  # no loader, or an iterable dataset without a length
            return self.num_examples

    def per_example(self, trainer: pl.Trainer, pl_module: Any) -> tuple[list[int], Tensor]:
        """This rank's kept examples: their validation-set indices and bits/dim, ``(n,)``."""
        if not self._subset:
            return [], torch.zeros(0, device=pl_module.device, dtype=precise_dtype(pl_module.device))  # bpd's dtype
        data = torch.cat(self._subset)
        generators = sample_generators(self._index, self.seed, pl_module.device)
        with evaluating(pl_module), ema_weights(trainer, pl_module), torch.no_grad():
            bpd = torch.cat(
                [
                    pl_module.diffusion.bits_per_dim(
                        pl_module.denoiser(),
                        data[i : i + self.batch_size],
                        generator=generators[i : i + self.batch_size],
                    )
                    for i in range(0, data.shape[0], self.batch_size)
                ]
            )
        return list(self._index), bpd

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._collected = True
        self._validations += 1
        if self._validations % self.every_n_validations:
            return
        _, bpd = self.per_example(trainer, pl_module)
        # the sum and count over every rank (a rank may hold fewer examples, or none), in bpd's precise dtype
        totals = torch.stack([bpd.sum(), torch.tensor(bpd.numel(), device=bpd.device, dtype=bpd.dtype)])
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        if totals[1] == 0:
            return
        mean = totals[0] / totals[1]
        self.last = float(mean)
        pl_module.log("val/bpd", mean.float(), sync_dist=True)  # the same on every rank: the sync is a no-op
