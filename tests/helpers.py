"""Callbacks and data the Lightning tests import (also from CLI subprocesses, via PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch


class DumpWeights(pl.Callback):
    """At the end of fit, every rank saves its backbone weights to ``<dirpath>/rank<r>.pt``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.backbone.state_dict(), Path(self.dirpath) / f"rank{trainer.global_rank}.pt")


class RecordStartStep(pl.Callback):
    """Remembers the global step at which training (re)started."""

    def __init__(self) -> None:
        self.start_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = trainer.global_step
