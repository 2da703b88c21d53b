"""Checkpoint loading with clear errors: a truncated or corrupt file is named as such.

Writing is already safe: Lightning serialises the checkpoint into memory first and writes it
through an fsspec transaction (a temporary file moved into place), so a crash mid-write leaves
the previous file intact.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO


def check_checkpoint_file(path: str | Path) -> Path:
    """Fail early and clearly on a missing, truncated or non-checkpoint file (torch.save writes zip archives)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {str(file)!r} does not exist")
    try:
        with zipfile.ZipFile(file) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise zipfile.BadZipFile("no data.pkl record")
    except zipfile.BadZipFile as err:
        raise ValueError(
            f"checkpoint {str(file)!r} is truncated or corrupt ({err}); resume from an earlier checkpoint "
            "(ModelCheckpoint's save_top_k keeps the previous ones)"
        ) from err
    return file


class SafeCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that checks the file first, so ``--ckpt_path`` errors name the problem."""

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if isinstance(path, (str, Path)) and "://" not in str(path):
            check_checkpoint_file(path)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {str(path)!r} cannot be read ({err}); it may be corrupt") from err
