"""Post-hoc EMA (EDM2): track power-function EMA profiles during training and write snapshots of them, from
which :func:`lightning_ddpm.ema.reconstruct` builds an EMA of any length after training."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ..backbones.sharding import full_tensor, local_shard, reshard
from ..ema.power import PowerProfile
from ..ema.snapshots import save_snapshot
from .config import Configurable

__all__ = ["PostHocEMA"]

SNAPSHOT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class PostHocEMA(Configurable, pl.Callback):
    """Power-function EMA profiles of the parameters, and their snapshots every ``snapshot_every_n_steps``.

    After optimizer step t each profile is updated as ``ema = lerp(ema, theta, 1 - beta_t)`` with
    beta_t = (1 - 1/t)^(gamma + 1) (one fused op per profile, on the parameters' device, no host
    synchronisation), so that after step t it weighs theta_s in proportion to s^gamma
    (:class:`~lightning_ddpm.ema.PowerProfile`). Snapshots are ``<snapshot_dir>/phema-<run>-<step>-<sigma_rel>.pt``;
    rank 0 writes them (under DDP every rank's profiles are identical; under FSDP2 the shards are gathered
    first). The profiles, the run's id and its snapshot folder are in the checkpoint, so a resumed run
    continues them bit for bit and writes to the same folder. Works alongside :class:`EMA` or instead of it:
    it never changes the weights that training, validation or the checkpoint's ``state_dict`` see.

    Args:
        sigma_rels: the relative widths of the tracked profiles, at least two, each in (0, 0.289)
            (EDM2: 0.05 and 0.10); any width between and around them can be reconstructed.
        snapshot_every_n_steps: write snapshots after every this many optimizer steps (and at the end of fit).
            Denser snapshots reconstruct more accurately; EDM2 keeps a few hundred per run.
        snapshot_dir: the folder for the snapshots (default ``<log_dir or default_root_dir>/phema``).
        snapshot_dtype: the snapshots' dtype: ``"float16"`` (EDM2's), ``"bfloat16"`` or ``"float32"``.
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every_n_steps: int = 1000,
        snapshot_dir: str | None = None,
        snapshot_dtype: str = "float16",
    ) -> None:
        self.profiles = [PowerProfile(s) for s in sigma_rels]  # checks each sigma_rel
        if len({p.sigma_rel for p in self.profiles}) < 2:
            raise ValueError(
                f"PostHocEMA needs at least two different sigma_rels (the reconstruction combines profiles), "
                f"got sigma_rels={list(sigma_rels)}"
            )
        if int(snapshot_every_n_steps) != snapshot_every_n_steps or snapshot_every_n_steps < 1:
            raise ValueError(f"snapshot_every_n_steps must be an integer >= 1, got {snapshot_every_n_steps}")
        if snapshot_dtype not in SNAPSHOT_DTYPES:
            raise ValueError(f"snapshot_dtype must be one of {list(SNAPSHOT_DTYPES)}, got {snapshot_dtype!r}")
        self.sigma_rels = tuple(p.sigma_rel for p in self.profiles)
        self.snapshot_every_n_steps = int(snapshot_every_n_steps)
        self.snapshot_dtype = SNAPSHOT_DTYPES[snapshot_dtype]
        self.snapshot_dir: Path | None = Path(snapshot_dir) if snapshot_dir is not None else None
        self.run: str | None = None  # this run's id, in every snapshot: reconstruct never mixes runs
        self.averages: list[list[torch.Tensor]] | None = None  # per profile, aligned with the parameters
        self.step = 0  # the optimizer step the averages have reached
        self.last_snapshot_step = 0
        self._loaded: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        # by the profiles alone: a resumed run finds its state whatever snapshot_dir this run was given
        return self._generate_state_key(sigma_rels=self.sigma_rels)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_fit_start: under ModelParallelStrategy Lightning restores callback states after that hook.
        if self.snapshot_dir is None:
            self.snapshot_dir = Path(trainer.log_dir or trainer.default_root_dir) / "phema"
        if self.run is None:  # a new run (a resumed one has its id back from the checkpoint)
            self.run = trainer.strategy.broadcast(uuid.uuid4().hex[:8])
        params = self._parameters(pl_module)
        loaded, self._loaded = self._loaded, None
        with torch.no_grad():
            if loaded is None:
                if trainer.global_step > 0:
                    warnings.warn(
                        f"PostHocEMA starts at step {trainer.global_step} (the checkpoint holds no profiles of it): "
                        "its profiles start from the current weights",
                        stacklevel=2,
                    )
                self.step = self.last_snapshot_step = trainer.global_step
                self.averages = [[p.detach().clone() for _, p in params] for _ in self.profiles]
            else:
                self.averages = [[_like(saved[name], p) for name, p in params] for saved in loaded["averages"]]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        t = trainer.global_step  # optimizer steps done (gradient accumulation: the same t for several batches)
        if t <= self.step or self.averages is None:
            return
        # FSDP2: each rank's own shards, as plain tensors (the same kernel however the DTensor was built)
        current = [local_shard(p.detach()) for _, p in self._parameters(pl_module)]
        with torch.no_grad():
            for profile, average in zip(self.profiles, self.averages):
                # beta from the host's step count
                torch._foreach_lerp_([local_shard(a) for a in average], current, 1.0 - profile.beta(t))
        self.step = t
        if t % self.snapshot_every_n_steps == 0:
            self.save_snapshots(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averages is not None and self.step > self.last_snapshot_step:
            self.save_snapshots(trainer, pl_module)  # the end of the run can be reconstructed too

    def save_snapshots(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write every profile's average at the current step (every rank calls this: FSDP2 gathers shards)."""
        assert self.averages is not None and self.snapshot_dir is not None and self.run is not None
        names = [name for name, _ in self._parameters(pl_module)]
        for profile, average in zip(self.profiles, self.averages):
            state = {name: full_tensor(value) for name, value in zip(names, average)}
            if trainer.is_global_zero:
                save_snapshot(self.snapshot_dir, self.run, self.step, profile, state, self.snapshot_dtype)
        self.last_snapshot_step = self.step

    def state_dict(self) -> dict[str, Any]:
        if self.averages is None:
            return {}
        names = [name for name, _ in self._named_parameters]
        return {
            "run": self.run,
            "snapshot_dir": str(self.snapshot_dir),
            "sigma_rels": list(self.sigma_rels),
            "step": self.step,
            "last_snapshot_step": self.last_snapshot_step,
            "averages": [
                {name: full_tensor(value) for name, value in zip(names, average)} for average in self.averages
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        configured, self.snapshot_dir = self.snapshot_dir, Path(state_dict["snapshot_dir"])
        if configured is not None and configured.resolve() != self.snapshot_dir.resolve():
            warnings.warn(
                f"PostHocEMA(snapshot_dir={str(configured)!r}) resumes a run whose snapshots are in "
                f"{str(self.snapshot_dir)!r}: it keeps writing there (one run, one folder)",
                stacklevel=2,
            )
        self.run = state_dict["run"]
        self.step, self.last_snapshot_step = state_dict["step"], state_dict["last_snapshot_step"]
        self._loaded = state_dict  # the averages are placed like the parameters in on_train_start

    def _parameters(self, pl_module: pl.LightningModule) -> list[tuple[str, torch.Tensor]]:
        reshard(pl_module)  # FSDP2: this rank's shards, even after a sampling forward
        self._named_parameters: list[tuple[str, torch.Tensor]] = list(pl_module.named_parameters())
        return self._named_parameters


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved full tensor placed like ``param``: on its device, and sharded like it when it is a DTensor."""
    value = value.to(device=param.device, dtype=param.dtype)
    placements = getattr(param, "placements", None)
    if placements is None:
        return value.clone()
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, param.device_mesh, placements, src_data_rank=None)  # type: ignore[attr-defined]
