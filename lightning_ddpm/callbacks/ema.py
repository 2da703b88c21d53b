"""EMA of the model parameters, built on Lightning's WeightAveraging callback.

Lightning does the bookkeeping: the averaged copy, swapping it in for validation, saving it
as the checkpoint's ``state_dict`` (the raw weights go to ``current_model_state``) and
restoring both on resume. This file adds the DDPM decay schedule, averages parameters only
(never the schedule buffers), and lets other callbacks borrow the EMA weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.swa_utils import AveragedModel

from ..backbones.sharding import full_tensor, is_sharded, load_full_state, local_shard, reshard, shard_backbone
from .config import Configurable


class EMA(Configurable, WeightAveraging):
    """Exponential moving average with warm-up: decay_n = min(decay, (1 + n) / (10 + n)) at the n-th update.

    Args:
        decay: the final decay (0.9999 in Ho et al.).
        warmup: use the warm-up formula above (otherwise a constant ``decay``).
        update_every_n_steps: update after every this many optimizer steps.
        start_step: first optimizer step (0-based) that updates the average.
        device: keep the average on this device (e.g. ``"cpu"`` to save GPU memory).

    Under DDP every rank holds identical parameters after each optimizer step, so every rank's
    average is identical too without any communication. Under ModelParallelStrategy (FSDP2) the
    average is sharded like the backbone (each rank averages its own shard) and gathered into full
    tensors only when a checkpoint is written (``save_distributed_checkpoint=False``).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        device: str | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        super().__init__(device=device, use_buffers=False, multi_avg_fn=self._lerp)
        self.decay, self.warmup = decay, warmup
        self.update_every_n_steps, self.start_step = update_every_n_steps, start_step
        self.num_updates = 0  # updates done so far, n in the warm-up formula
        self._current_decay = decay
        self.swapped = False
        self._raw_at_end: list[torch.Tensor] | None = None  # the raw parameters when fit ended

    def current_decay(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None or step_idx < self.start_step or (step_idx - self.start_step) % self.update_every_n_steps:
            return False
        # AveragedModel copies on the first update; later ones call _lerp with this decay.
        self._current_decay = self.current_decay(self.num_updates)
        self.num_updates += 1
        return True

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        # ema = decay * ema + (1 - decay) * w, as one fused foreach op over all parameters.
        torch._foreach_lerp_(averaged, current, 1.0 - self._current_decay)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # WeightAveraging's, without AveragedModel.update_parameters: that reads its n_averaged counter (a
        # device tensor) back twice per call (bool(n_averaged == 0), n_averaged > 0), a host synchronisation
        # every step on a GPU. The host knows whether this is the first update (num_updates).
        if trainer.global_step <= self._latest_update_step:
            return
        step_idx = trainer.global_step - 1
        if step_idx < self.start_step:
            # Until the first update the average follows the raw weights: validation, pictures, FID and the
            # checkpoint's state_dict of a run that ends before start_step then see the trained model.
            self._update(pl_module, copy=True)
        elif self.should_update(step_idx=step_idx):
            self._update(pl_module, copy=self.num_updates == 1)  # the first update copies, as AveragedModel does
            if self._average_model is not None:  # built at setup
                self._average_model.n_averaged += 1  # on the device, no read-back
        else:
            return
        self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def _update(self, pl_module: pl.LightningModule, copy: bool) -> None:
        assert self._average_model is not None
        averaged, current = [], []
        for average, param in self._pairs(pl_module):
            averaged.append(average.detach())
            current.append(param.detach().to(average.device))
        if copy:  # DTensors (FSDP2) have no foreach copy: copy this rank's shards
            torch._foreach_copy_([local_shard(a) for a in averaged], [local_shard(c) for c in current])
        else:
            self._lerp(averaged, current, None)
        # Buffers are not averaged; the copy keeps the model's (as AveragedModel(use_buffers=False) does), so
        # that the checkpoint's state_dict holds current buffers (a user backbone's norm statistics, say).
        buffers = list(
            zip(*((a.detach(), b.detach()) for a, b in zip(self._average_model.module.buffers(), pl_module.buffers())))
        )
        if buffers:
            torch._foreach_copy_(list(buffers[0]), list(buffers[1]))

    def _pairs(self, pl_module: pl.LightningModule) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        assert self._average_model is not None
        reshard(pl_module)  # FSDP2: this rank's shards, even after a sampling forward
        # Parameters only: buffers (the float64 schedule constants) are never averaged or swapped.
        return zip(self._average_model.module.parameters(), pl_module.parameters())

    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        for average, current in self._pairs(pl_module):
            tmp = average.data.clone()
            average.data.copy_(current.data)
            current.data.copy_(tmp)
        self.swapped = not self.swapped

    @contextmanager
    def averaged(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
        """Run the block with the average in ``pl_module``, brought up to this step: how other callbacks
        (pictures, FID, bits/dim) see the EMA model. A no-op before the average exists or while it is in."""
        if self._average_model is None or self.swapped:
            yield
            return
        if trainer.training and trainer.global_step > self._latest_update_step:
            # A callback listed before EMA (SampleLogger every N steps) runs its on_train_batch_end before EMA's
            # has folded this step into the average: do that update now (EMA's own call then skips this step).
            self.on_train_batch_end(trainer, pl_module, None, None, 0)
        self._swap_models(pl_module)
        try:
            yield
        finally:
            self._swap_models(pl_module)

    def _copy_average_to_current(self, pl_module: pl.LightningModule) -> None:
        for average, current in self._pairs(pl_module):
            current.data.copy_(average.data)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # WeightAveraging.setup, except under ModelParallelStrategy's mesh: there configure_model would shard the
        # module before the copy (FSDP modules refuse deepcopy), so the copy is sharded in on_fit_start instead.
        if stage != "fit":
            return
        self._raw_at_end = None
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "EMA is not supported under FSDPStrategy ('fsdp', FSDP1: its flattened shards do not match the "
                "averaged copy); use lightning.pytorch.strategies.ModelParallelStrategy (FSDP2), see docs/scaling.md"
            )
        mesh = pl_module.device_mesh  # set by ModelParallelStrategy only
        if mesh is None:
            # as WeightAveraging.setup: layers a module builds in its (idempotent) configure_model must exist
            # before the copy; DiffusionModule's is a no-op without a mesh
            pl_module.configure_model()
        else:  # ModelParallelStrategy: the average is sharded like the backbone, in on_fit_start
            if not isinstance(getattr(pl_module, "backbone", None), torch.nn.Module):
                raise ValueError(
                    f"EMA under ModelParallelStrategy shards its average like the module's `backbone`, and "
                    f"{type(pl_module).__name__} has none; use DiffusionModule or a strategy without sharding"
                )
            if getattr(trainer.strategy, "_save_distributed_checkpoint", False):
                raise ValueError(
                    "EMA under ModelParallelStrategy needs save_distributed_checkpoint=False (one full checkpoint "
                    "file, into which the sharded average is gathered); the distributed format is not supported"
                )
            if self._device is not None:
                raise ValueError(
                    f"EMA(device={str(self._device)!r}) is not supported under ModelParallelStrategy: the average is "
                    "sharded like the backbone, on the same devices; leave device unset"
                )
        # Under a mesh the (still whole) copy stays on the CPU: fully_shard moves only this rank's shard to the
        # device, so no device holds the whole model twice.
        device = torch.device("cpu") if mesh is not None else self._device or pl_module.device
        self._average_model = AveragedModel(
            model=pl_module, device=device, use_buffers=self._use_buffers, **self._kwargs
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelParallelStrategy has sharded the module's backbone (configure_model): shard the copy the same way,
        # so that each rank keeps and updates only its own shard of the average.
        backbone = getattr(pl_module, "backbone", None)  # EMA also serves LightningModules of other kinds
        average: Any = self._average_model.module if self._average_model is not None else None
        if average is not None and backbone is not None and is_sharded(backbone) and not is_sharded(average.backbone):
            shard_backbone(average.backbone, next(backbone.parameters()).device_mesh)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning copies the average over the raw weights here, and ModelCheckpoint(save_last=True) may write
        # last.ckpt in its own on_train_end, after this one (checkpoint callbacks run last), as may a user's
        # trainer.save_checkpoint after fit. Without the raw weights kept, such a checkpoint's current_model_state
        # would hold the EMA weights and a resume would continue training from them, not from the raw ones.
        assert self._average_model is not None
        self._raw_at_end = [p.detach().clone() for _, p in self._pairs(pl_module)]
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is None:
            return
        if self._raw_at_end is not None and "current_model_state" in checkpoint:
            # after fit the module holds the EMA weights: put back the raw ones kept in on_train_end
            # (gathered on every rank first: a sharded tensor's gather is a collective)
            raw = {name: full_tensor(p) for (name, _), p in zip(pl_module.named_parameters(), self._raw_at_end)}
            checkpoint["current_model_state"] = {k: raw.get(k, v) for k, v in checkpoint["current_model_state"].items()}
        # Under FSDP2 the average is sharded: gather it into the full tensors a checkpoint file holds (every rank
        # takes part in the gathers; only rank 0 writes the file, so the others drop their copies).
        state = {k: full_tensor(v) for k, v in checkpoint["state_dict"].items()}
        checkpoint["state_dict"] = state if trainer.is_global_zero or pl_module.device_mesh is None else {}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Outside fit (predict, validate) there is no average to restore: the checkpoint's state_dict already
        # holds the EMA weights, which is what those stages should use. Lightning would warn every time.
        if self._average_model is None:
            return
        if "state_dict" in checkpoint or not is_sharded(getattr(pl_module, "backbone", pl_module)):
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
            return
        # ModelParallelStrategy has loaded the checkpoint's state_dict (the average) into the sharded module
        # and removed it from the dictionary: take the average from there, then the raw weights.
        with torch.no_grad():
            for average, current in self._pairs(pl_module):
                average.copy_(current)
            if "averaging_state" in checkpoint:
                self._average_model.n_averaged.copy_(checkpoint["averaging_state"]["n_averaged"])
            if "current_model_state" in checkpoint:
                load_full_state(pl_module, checkpoint["current_model_state"], strict=pl_module.strict_loading)
            else:  # a checkpoint written without EMA: average and model both start from its weights
                rank_zero_warn("The checkpoint was not created with EMA: the average starts from its weights.")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_updates = state_dict.get("num_updates", 0)


@contextmanager
def ema_weights(trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> Iterator[None]:
    """Run the block with the EMA weights in ``pl_module`` (a no-op without an active :class:`EMA`)."""
    callbacks = trainer.callbacks if trainer is not None else []  # type: ignore[attr-defined]  # set by Lightning
    ema = next((c for c in callbacks if isinstance(c, EMA)), None)
    if ema is None or trainer is None:
        yield
        return
    with ema.averaged(trainer, pl_module):
        yield
