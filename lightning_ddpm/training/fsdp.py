"""Which device mesh ``DiffusionModule.configure_model`` shards the backbone over (FSDP2, ModelParallelStrategy)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..backbones.sharding import shard_backbone

__all__ = ["data_parallel_mesh", "shard_over_mesh"]


def data_parallel_mesh(mesh: Any) -> Any:
    """The data-parallel part of ModelParallelStrategy's ``mesh``; tensor parallelism is refused."""
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"ModelParallelStrategy: tensor_parallel_size is {mesh['tensor_parallel'].size()}; lightning-ddpm "
            "shards the backbone with FSDP2 only (tensor_parallel_size=1, data_parallel_size=<number of "
            "devices>). Its default 'auto' makes every device of a node tensor-parallel: set both sizes."
        )
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def shard_over_mesh(backbone: nn.Module, mesh: Any) -> None:
    """Shard ``backbone`` over the data-parallel ranks of ``mesh``; nothing to do without a mesh (other strategies)."""
    if mesh is None:
        return
    shard_backbone(backbone, data_parallel_mesh(mesh))
