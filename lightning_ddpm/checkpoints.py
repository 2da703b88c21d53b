"""Checkpoint loading with clear errors: a truncated or corrupt file is named as such.

Writing is already safe: Lightning serialises the checkpoint into memory first and writes it
through an fsspec transaction (a temporary file moved into place), so a crash mid-write leaves
the previous file intact. Reading is not: torch does not check the zip archive's CRCs, so a
flipped byte inside a tensor loads silently. ``DiffusionModule`` therefore stores a SHA-256
digest of every tensor in the checkpoint (``checkpoint_digest``) and checks it on load.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

DIGEST_KEY = "lightning_ddpm_digest"


def _tensors(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested checkpoint, with its key path, in a fixed order."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            if key != DIGEST_KEY:
                yield from _tensors(value[key], f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{path}/{i}")


def checkpoint_digest(checkpoint: Mapping[str, Any]) -> str | None:
    """SHA-256 over every tensor's key path, dtype, shape and bytes; ``None`` if some tensor is not a
    plain local tensor (a sharded strategy's DTensor, say), which this digest does not cover."""
    digest = hashlib.sha256()
    for path, tensor in _tensors(checkpoint):
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            return None
        data = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{path}:{data.dtype}:{tuple(tensor.shape)};".encode())
        if data.numel():
            digest.update(data.view(torch.uint8).numpy())  # no copy: hashlib reads the buffer
    return digest.hexdigest()


def verify_checkpoint(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Raise if the checkpoint's tensors differ from the digest written when it was saved.

    Checkpoints written without a digest (by other code, or before it existed) pass unchecked.
    """
    expected = checkpoint.get(DIGEST_KEY)
    if expected is None:
        return
    actual = checkpoint_digest(checkpoint)
    if actual is not None and actual != expected:
        raise ValueError(
            f"{source} is corrupt: its tensors do not match the digest written when it was saved; "
            "resume from an earlier checkpoint (ModelCheckpoint's save_top_k keeps the previous ones)"
        )


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
