"""The optimizer and learning-rate warm-up that ``DiffusionModule.configure_optimizers`` returns.

Adam and AdamW are made fused where the parameters allow it, and kept out of GradScaler's own
unscaling, so that the non-finite guard (``nonfinite.py``) can skip a step on the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.imports import import_object, split_spec

__all__ = ["DEFAULT_OPTIMIZER", "make_optimizer", "optimizer_spec"]

DEFAULT_OPTIMIZER: dict[str, Any] = {"name": "torch.optim.Adam", "init_args": {"lr": 2e-4}}  # Ho et al.


def optimizer_spec(optimizer: dict[str, Any] | None) -> dict[str, Any]:
    """The module's ``optimizer`` setting, or the default, checked now rather than at fit time."""
    spec = optimizer or {"name": DEFAULT_OPTIMIZER["name"], "init_args": dict(DEFAULT_OPTIMIZER["init_args"])}
    split_spec(spec, "optimizer")  # fail now, not at fit time
    return spec


def make_optimizer(spec: Mapping[str, Any] | str, params: Sequence[Tensor], lr_warmup_steps: int) -> Any:
    """What Lightning's ``configure_optimizers`` returns: the optimizer over ``params``, with a linear
    warm-up of the learning rate over ``lr_warmup_steps`` optimizer steps (none when 0)."""
    name, init_args = split_spec(spec, "optimizer")
    optimizer_cls = import_object(name, "optimizer")
    params = list(params)
    if optimizer_cls in (torch.optim.Adam, torch.optim.AdamW) and not {"fused", "foreach"} & set(init_args):
        # One fused kernel per step instead of several foreach ops, and it can skip a non-finite
        # step on the device (found_inf) without a host synchronisation.
        init_args["fused"] = _fused_supported(params)
    try:
        optimizer = optimizer_cls(params, **init_args)
    except TypeError as err:
        raise ValueError(f"bad optimizer init_args for {name!r}: {err}") from err
    if optimizer.defaults.get("fused"):
        # Fused optimizers announce that they unscale gradients themselves, and Lightning then forbids
        # gradient clipping under mixed precision. We never let GradScaler hand them its scale: it
        # unscales first (so clipping sees true gradients), and the non-finite guard passes found_inf.
        optimizer._step_supports_amp_scaling = False
    if lr_warmup_steps == 0:
        return optimizer
    warmup = lr_warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _fused_supported(params: list[Tensor]) -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        devices = {"cuda"}
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)
