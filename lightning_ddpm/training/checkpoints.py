"""Checkpoint loading with clear errors: a truncated or corrupt file is named as such.

Writing is already safe: Lightning serialises the checkpoint into memory first and writes it
through an fsspec transaction (a temporary file moved into place), so a crash mid-write leaves
the previous file intact. Reading is not: torch does not check the zip archive's CRCs, so a
flipped byte inside a tensor loads silently. ``DiffusionModule`` therefore stores a SHA-256
digest of every tensor in the checkpoint (``checkpoint_digest``) and checks it on load.

The RNG states a resume restores are per rank: every rank's CPU generator and the generator of its
own device (``gather_rng_states``), gathered into the one file rank 0 writes, and each rank takes
its own back (``restore_rng_states``).

``save_module_state``, ``check_loaded_checkpoint`` and ``restore_module_state`` are what
``DiffusionModule``'s checkpoint hooks do with these.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..core.imports import settings_agree

DIGEST_KEY = "lightning_ddpm_digest"

# Settings that change the meaning or the shape of the weights: a checkpoint must agree on them.
COMPATIBLE_SETTINGS = (
    "backbone",
    "data_shape",
    "num_classes",
    "schedule",
    "num_timesteps",
    "schedule_kwargs",
    "rescale_to_zero_terminal_snr",
    "parameterization",
    "variance",
)

# device type -> (get_state(device), set_state(state, device)) of the generator that random ops on such a
# device draw from (dropout on a GPU); the CPU's is the global torch generator, saved for every rank anyway.
DEVICE_RNG: dict[str, tuple[Callable[[torch.device], torch.Tensor], Callable[[torch.Tensor, torch.device], None]]] = {
    "cuda": (
        lambda device: torch.cuda.get_rng_state(device),
        lambda state, device: torch.cuda.set_rng_state(state, device),
    ),
    "mps": (lambda device: torch.mps.get_rng_state(), lambda state, device: torch.mps.set_rng_state(state)),
}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG state: the CPU generator and the generator of ``device`` (the rank's own)."""
    state = {"torch": torch.get_rng_state()}
    if device.type in DEVICE_RNG:
        state[device.type] = DEVICE_RNG[device.type][0](device)
    return state


def gather_rng_states(device: torch.device) -> dict[str, Any]:
    """Every rank's :func:`rng_state`, as ``{"per_rank": [rank 0's, rank 1's, ...]}``.

    A collective under torch.distributed: every rank must call it (as every rank calls
    ``Trainer.save_checkpoint``, which has its own barrier); a single process gives a list of one.
    """
    own = rng_state(device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() == 1:
        return {"per_rank": [own]}
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, own)
    return {"per_rank": states}


def restore_rng_states(states: Mapping[str, Any], device: torch.device, rank: int, world_size: int) -> None:
    """Give this rank back the RNG state it saved (:func:`gather_rng_states`); warn if the world size changed.

    Checkpoints from before the per-rank format hold rank 0's CPU state and its view of every GPU's state.
    """
    if "per_rank" not in states:
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        cuda = states.get("cuda")
        if cuda is not None and device.type == "cuda" and (device.index or 0) < len(cuda):
            torch.cuda.set_rng_state(cuda[device.index or 0], device)
        return
    saved = states["per_rank"]
    if len(saved) != world_size and rank == 0:
        warnings.warn(
            f"resuming with {world_size} processes a run checkpointed with {len(saved)}: ranks below "
            f"{min(len(saved), world_size)} restore their own RNG state (dropout) and the others keep theirs, and "
            "the data shards change with the world size, so the run continues but not bit-identically to an "
            "uninterrupted one",
            stacklevel=2,
        )
    if rank >= len(saved):
        return
    own = saved[rank]
    torch.set_rng_state(own["torch"])
    if device.type in own and device.type in DEVICE_RNG:
        DEVICE_RNG[device.type][1](own[device.type], device)


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
            digest.update(data.view(torch.uint8).numpy())  # type: ignore[arg-type]  # no copy: hashlib reads the buffer
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


def check_local_checkpoint_file(path: Any) -> None:
    """:func:`check_checkpoint_file` for a local path; URLs (fsspec) and file-like objects are torch's to read."""
    if isinstance(path, (str, Path)) and "://" not in str(path):
        check_checkpoint_file(path)


class SafeCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that checks the file first, so ``--ckpt_path`` errors name the problem."""

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        check_local_checkpoint_file(path)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {str(path)!r} cannot be read ({err}); it may be corrupt") from err


def root_device(trainer: Any, device: torch.device) -> torch.device:
    """The rank's device: Lightning restores a checkpoint before it moves the module (on ``device``) there."""
    return trainer.strategy.root_device if trainer is not None else device


def save_module_state(
    checkpoint: dict[str, Any], timestep_sampler: Any, device: torch.device, is_global_zero: bool
) -> None:
    """Add the timestep sampler's state, every rank's RNG states and (on rank 0) the digest to ``checkpoint``."""
    checkpoint["timestep_sampler"] = timestep_sampler.state_dict()
    # The global RNG now drives only dropout; keep every rank's state (CPU and its own device's) so that
    # a resume continues each rank's stream. Every rank calls this hook; rank 0's file gets all states.
    checkpoint["rng_states"] = gather_rng_states(device)
    if is_global_zero:  # only rank 0 writes the file
        # Last, over everything above: on load, a flipped byte in any tensor is caught.
        checkpoint[DIGEST_KEY] = checkpoint_digest(checkpoint)


def check_loaded_checkpoint(
    checkpoint: Mapping[str, Any], hparams: Mapping[str, Any], keys: tuple[str, ...] = COMPATIBLE_SETTINGS
) -> None:
    """Raise if ``checkpoint`` is corrupt (its digest) or from a config whose ``keys`` differ from ``hparams``."""
    if "state_dict" in checkpoint:  # ModelParallelStrategy loads the weights itself and removes them first
        verify_checkpoint(checkpoint)
    saved = checkpoint.get("hyper_parameters") or {}
    different = [
        f"{key}: checkpoint {saved[key]!r} vs this model {hparams[key]!r}"
        for key in keys
        if key in saved and key in hparams and not settings_agree(key, saved[key], hparams[key])
    ]
    if different:
        raise ValueError("checkpoint is from an incompatible config: " + "; ".join(different))


def restore_module_state(
    checkpoint: Mapping[str, Any], timestep_sampler: Any, trainer: Any, device: torch.device
) -> None:
    """Give the timestep sampler its state back and, when ``trainer`` is fitting, this rank its RNG state."""
    if checkpoint.get("timestep_sampler"):
        timestep_sampler.load_state_dict(checkpoint["timestep_sampler"])
    # The global RNG belongs to the caller: restore it only to continue an interrupted fit.
    fitting = trainer is not None and trainer.state.fn == "fit"
    states = (checkpoint.get("rng_states") or {}) if fitting else {}
    if states:
        restore_rng_states(states, root_device(trainer, device), trainer.global_rank, trainer.world_size)
