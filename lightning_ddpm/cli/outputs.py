"""Where a run writes: every output under trainer.default_root_dir, the guard against taking over another
run's checkpoints, and the saved config.yaml with absolute paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback

# Settings that name a file or folder: the saved config.yaml stores them absolute, so that it (and the
# checkpoint it sits beside) still works from another working directory.
_PATH_KEYS = frozenset({"root", "init_from", "default_root_dir", "dirpath", "output_dir", "save_dir", "ckpt_path"})


def _absolute_paths(value: Any, key: str = "") -> Any:
    """``value`` with every relative path under a ``_PATH_KEYS`` key made absolute (a copy)."""
    if isinstance(value, Namespace):
        return Namespace(**{k: _absolute_paths(v, k) for k, v in vars(value).items()})
    if isinstance(value, dict):
        return {k: _absolute_paths(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute_paths(v, key) for v in value]
    if (
        key in _PATH_KEYS
        and isinstance(value, (str, os.PathLike))
        and str(value)
        and "://" not in str(value)
        and str(value) not in ("last", "hpc", "best", "registry")
        and not Path(value).is_absolute()
    ):
        return str(Path(value).absolute())
    return value


class SaveConfigWithAbsolutePaths(SaveConfigCallback):
    """LightningCLI's saved ``config.yaml``, with data roots, checkpoint and output paths made absolute."""

    def __init__(self, parser: LightningArgumentParser, config: Namespace, *args: Any, **kwargs: Any) -> None:
        super().__init__(parser, _absolute_paths(config), *args, **kwargs)


def _place_outputs(trainer: pl.Trainer) -> set[int]:
    """Outputs without a folder of their own go under ``trainer.default_root_dir``: checkpoints in
    ``checkpoints/`` (not a logger's version folder, so ``--ckpt_path last`` finds them), sample pictures
    in ``samples/``. Returns the ids of the checkpoint callbacks placed here."""
    from ..callbacks import SampleLogger

    root, placed = Path(trainer.default_root_dir), set()
    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's callback connector
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = os.path.realpath(root / "checkpoints")
            placed.add(id(callback))
        elif isinstance(callback, SampleLogger) and not callback.output_dir:
            callback.output_dir = str(root / "samples")
    return placed


def _resumes_from(ckpt_path: str | None, folder: Path) -> bool:
    """Whether ``fit --ckpt_path`` continues a run whose checkpoints are in ``folder``."""
    if ckpt_path in ("last", "hpc"):
        return True
    return ckpt_path is not None and ckpt_path != "" and Path(ckpt_path).resolve().parent == folder.resolve()


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, as a user would type it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
