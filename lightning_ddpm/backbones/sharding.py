"""Sharding a backbone with FSDP2 (``torch.distributed.fsdp.fully_shard``) for ModelParallelStrategy.

Each block a backbone lists in its ``shard_units`` class attribute becomes one FSDP unit (its parameters
are gathered just for its own forward and backward), then the backbone itself takes the rest (stem,
embeddings, head). A backbone without ``shard_units`` is one unit: correct, but every forward gathers
all of it at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["full_tensor", "is_sharded", "load_full_state", "local_shard", "reshard", "shard_backbone", "shard_units"]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` (its class is then FSDP's subclass)."""
    if not torch.distributed.is_available():  # builds without torch.distributed cannot shard
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard(module: nn.Module) -> None:
    """Put ``module``'s sharded parameters back in place if a forward left them gathered.

    FSDP2 keeps the root unit's parameters gathered after a forward without backward (sampling), so
    that ``parameters()`` would then yield full plain tensors instead of this rank's shards.
    """
    for unit in module.modules():
        if is_sharded(unit):
            unit.reshard()  # type: ignore[operator]  # an FSDPModule's method


def shard_units(backbone: nn.Module) -> list[nn.Module]:
    """The submodules that become FSDP units of their own: instances of ``backbone.shard_units``."""
    units = tuple(getattr(backbone, "shard_units", ()))
    return [m for m in backbone.modules() if m is not backbone and isinstance(m, units)] if units else []


def shard_backbone(backbone: nn.Module, mesh: Any, **fully_shard_kwargs: Any) -> nn.Module:
    """Shard ``backbone`` over the 1-D device mesh ``mesh``: its ``shard_units`` blocks, then itself.
    Idempotent: Lightning may call ``configure_model`` more than once."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(backbone):
        return backbone
    for unit in shard_units(backbone):
        fully_shard(unit, mesh=mesh, **fully_shard_kwargs)
    fully_shard(backbone, mesh=mesh, **fully_shard_kwargs)
    return backbone


def local_shard(tensor: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor (DTensor), sharing its storage; other tensors as they are."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def full_tensor(tensor: Tensor) -> Tensor:
    """A sharded tensor (DTensor) gathered into a full CPU tensor (a collective); other tensors as they are."""
    if not torch.distributed.is_available():
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor().cpu() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def load_full_state(module: nn.Module, state: dict[str, Tensor], strict: bool) -> None:
    """Load full tensors into ``module``, each sharded parameter taking its own rank's chunk (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    targets = module.state_dict(keep_vars=True)
    missing = sorted(set(targets) - set(state))
    if strict and missing:
        raise RuntimeError(f"the checkpoint's current_model_state lacks {len(missing)} entries, e.g. {missing[:3]}")
    for name, target in targets.items():
        if name not in state:
            continue
        value = state[name].to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        target.copy_(value)
