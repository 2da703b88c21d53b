"""Sharding a backbone with FSDP2 (``torch.distributed.fsdp.fully_shard``) for ModelParallelStrategy.

Each block a backbone lists in its ``shard_units`` class attribute becomes one FSDP unit (its parameters
are gathered just for its own forward and backward), then the backbone itself takes the rest (stem,
embeddings, head). A backbone without ``shard_units`` is one unit: correct, but every forward gathers
all of it at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["is_sharded", "reshard", "shard_backbone", "shard_units"]


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
