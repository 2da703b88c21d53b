"""The pieces of ``DiffusionModule.sample``: argument checks, the class-conditional (guided) denoiser, the
starting noise, and eval mode for the duration of a draw."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..core.denoiser import Denoiser
from ..core.guidance import guided_denoiser
from ..core.types import PredictFn
from ..data.batches import check_labels
from ..samplers import Generators, randn

__all__ = ["check_edit_images", "check_sample_args", "conditioned", "edit_request", "evaluating", "initial_noise"]


def check_sample_args(
    num_samples: int,
    data_shape: tuple[int, ...],
    guidance_scale: float | None,
    default_scale: float,
    labels: Any,
    x_T: Tensor | None,
) -> float:
    """The guidance scale to sample with (``guidance_scale``, else the module's), after checking the arguments."""
    scale = default_scale if guidance_scale is None else guidance_scale
    if scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {scale}")
    if guidance_scale is not None and labels is None and guidance_scale != 1.0:
        warnings.warn(
            f"guidance_scale={guidance_scale} has no effect without labels (guidance mixes the "
            "conditional and unconditional predictions); pass labels=... to guide",
            stacklevel=3,
        )  # where sample's stacklevel=2 pointed (sample is wrapped by torch.no_grad)
    if x_T is not None and tuple(x_T.shape) != (num_samples, *data_shape):
        raise ValueError(
            f"x_T must have shape (num_samples, *data_shape) = {(num_samples, *data_shape)}, got {tuple(x_T.shape)}"
        )
    return scale


def initial_noise(
    num_samples: int, data_shape: Sequence[int], generator: Generators, device: torch.device, network_dtype: torch.dtype
) -> Tensor:
    """x_T drawn from ``generator``, in at least float32 whatever the weights' precision: a 1000-step trajectory
    accumulated in bf16 would lose the detail each step adds; float64 weights (64-true) sample in float64."""
    dtype = torch.promote_types(network_dtype, torch.float32)
    return randn((num_samples, *data_shape), generator, device, dtype)


def conditioned(
    model: Denoiser,
    labels: Tensor | Sequence[int] | None,
    num_samples: int,
    num_classes: int | None,
    scale: float,
    device: torch.device,
) -> PredictFn:
    """``model`` with the labels bound and classifier-free guidance at ``scale``; ``model`` itself without labels."""
    if labels is None:
        return model
    if num_classes is None:
        raise ValueError("labels given to an unconditional model (num_classes is None)")
    cond = check_labels(torch.as_tensor(labels).cpu(), num_samples, num_classes)
    assert cond is not None  # labels were given
    return guided_denoiser(model, cond.to(device), num_classes, scale)


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block, back in the mode it was in afterwards (errors included)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def check_edit_images(images: Tensor, data_shape: tuple[int, ...], network_dtype: torch.dtype) -> Tensor:
    """The examples to edit, ``(B, *data_shape)``, in at least float32 (as ``initial_noise``); images must hold
    values in [-1, 1] (read back once: editing is not a hot path)."""
    if not isinstance(images, Tensor) or tuple(images.shape[1:]) != tuple(data_shape) or images.shape[0] < 1:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must have shape (B, *data_shape) = (B, {', '.join(map(str, data_shape))}), got {got}")
    x = images.to(torch.promote_types(network_dtype, torch.float32))
    if len(data_shape) == 3:
        low, high = float(x.min()), float(x.max())
        if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:
            raise ValueError(
                f"images must hold values in [-1, 1], got range [{low:.4g}, {high:.4g}] "
                "(x / 127.5 - 1 for 8-bit images)"
            )
    return x


def edit_request(module: Any, batch: dict[str, Any], generators: list[torch.Generator]) -> Tensor:
    """One batch of edit requests through ``module.inpaint`` (a ``mask``) or ``module.edit`` (a ``strength``, one
    per batch), with the request's ``sampler`` (JSON; empty: the method's default)."""
    spec = (batch.get("sampler") or [""])[0]
    sampler = json.loads(spec) if spec else None
    labels = batch.get("labels")
    if "mask" in batch:
        return module.inpaint(batch["images"], batch["mask"], sampler, generators, labels)
    if "strength" in batch:
        strength = float(batch["strength"][0])  # read once per batch: predict is not a hot path
        return module.edit(batch["images"], strength, sampler, generators, labels)
    raise ValueError("edit requests hold 'images' and a 'mask' (inpainting) or a 'strength' (SDEdit)")
