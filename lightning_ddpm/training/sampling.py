"""The argument checks and the starting noise of ``DiffusionModule.sample``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..samplers import Generators, randn

__all__ = ["check_sample_args", "initial_noise"]


def check_sample_args(num_samples: int, data_shape: tuple[int, ...], guidance_scale: float | None,
                      default_scale: float, labels: Any, x_T: Tensor | None) -> float:
    """The guidance scale to sample with (``guidance_scale``, else the module's), after checking the arguments."""
    scale = default_scale if guidance_scale is None else guidance_scale
    if scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {scale}")
    if guidance_scale is not None and labels is None and guidance_scale != 1.0:
        warnings.warn(f"guidance_scale={guidance_scale} has no effect without labels (guidance mixes the "
                      "conditional and unconditional predictions); pass labels=... to guide",
                      stacklevel=3)  # where sample's stacklevel=2 pointed (sample is wrapped by torch.no_grad)
    if x_T is not None and tuple(x_T.shape) != (num_samples, *data_shape):
        raise ValueError(f"x_T must have shape (num_samples, *data_shape) = {(num_samples, *data_shape)}, "
                         f"got {tuple(x_T.shape)}")
    return scale


def initial_noise(num_samples: int, data_shape: Sequence[int], generator: Generators, device: torch.device,
                  network_dtype: torch.dtype) -> Tensor:
    """x_T drawn from ``generator``, in at least float32 whatever the weights' precision: a 1000-step trajectory
    accumulated in bf16 would lose the detail each step adds; float64 weights (64-true) sample in float64."""
    dtype = torch.promote_types(network_dtype, torch.float32)
    return randn((num_samples, *data_shape), generator, device, dtype)
