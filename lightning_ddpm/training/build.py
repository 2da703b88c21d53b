"""What ``DiffusionModule.__init__`` builds from its plain-data settings: checked settings, the
GaussianDiffusion and the backbone (linked to the data and the diffusion)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..backbones import BackboneSpec, build_backbone, check_backbone
from ..core.diffusion import GaussianDiffusion
from ..core.schedules import make_schedule

__all__ = ["build_diffusion", "build_linked_backbone", "check_settings", "linked_backbone_args"]


def check_settings(
    data_shape: Sequence[int],
    num_classes: int | None,
    cond_drop_prob: float,
    guidance_scale: float,
    lr_warmup_steps: int,
) -> tuple[int, ...]:
    """``data_shape`` as a tuple, after checking the module's plain settings (errors at construction, not at fit)."""
    shape = tuple(int(s) for s in data_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"data_shape must be a non-empty list of positive sizes, got {list(data_shape)}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
    if not 0.0 <= cond_drop_prob < 1.0:
        raise ValueError(f"cond_drop_prob must lie in [0, 1), got {cond_drop_prob}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if lr_warmup_steps < 0:
        raise ValueError(f"lr_warmup_steps must be >= 0, got {lr_warmup_steps}")
    return shape


def build_diffusion(
    schedule: str,
    num_timesteps: int,
    schedule_kwargs: dict[str, Any] | None,
    rescale_to_zero_terminal_snr: bool,
    parameterization: str,
    variance: str,
    loss: str,
    loss_weighting: str,
    min_snr_gamma: float,
    hybrid_lambda: float,
    clip_denoised: bool,
) -> GaussianDiffusion:
    """The GaussianDiffusion of the module's settings; warns of an eps model that the last beta makes unstable."""
    diffusion = GaussianDiffusion(
        make_schedule(
            schedule,
            num_timesteps,
            rescale_to_zero_terminal_snr=rescale_to_zero_terminal_snr,
            **(schedule_kwargs or {}),
        ),
        parameterization=parameterization,
        variance=variance,
        loss=loss,
        loss_weighting=loss_weighting,
        min_snr_gamma=min_snr_gamma,
        hybrid_lambda=hybrid_lambda,
        clip_denoised=clip_denoised,
    )
    amplification = float(1.0 / (1.0 - diffusion.schedule.betas[-1]).sqrt())
    if parameterization == "eps" and not clip_denoised and amplification > 10:
        # docs/benchmarks.md, "Sample quality": sliced W2 633 (eps) vs 0.080 (v) on two moons with the cosine schedule.
        warnings.warn(
            f"parameterization='eps' with beta_T={diffusion.schedule.betas[-1].item():.3g} and clip_denoised=False: "
            f"the first reverse step multiplies eps errors by {amplification:.0f}x, which gives far outliers on "
            "unclipped data; prefer parameterization='v' (or clip_denoised=True for data in [-1, 1])",
            stacklevel=3,  # the caller of DiffusionModule(...)
        )
    return diffusion


def linked_backbone_args(
    data_shape: tuple[int, ...], num_classes: int | None, diffusion: GaussianDiffusion
) -> dict[str, Any]:
    """The backbone arguments that the data and the diffusion decide (also for diffusers export)."""
    return {
        "in_channels": data_shape[0],
        "out_channels": data_shape[0] * diffusion.output_channels_factor,
        "image_size": list(data_shape[1:]) if len(data_shape) == 3 else None,
        "num_classes": num_classes,
    }


def build_linked_backbone(
    backbone: BackboneSpec | nn.Module,
    shared: dict[str, Any],
    data_shape: tuple[int, ...],
    diffusion: GaussianDiffusion,
    channels_last: bool,
    compile: bool | dict[str, Any],
) -> nn.Module:
    """The backbone with the ``shared`` (linked) arguments, checked against the data, in its memory format
    and compiled if asked."""
    module = build_backbone(backbone, defaults=shared)
    check_backbone(module, data_shape, shared["out_channels"], shared["num_classes"], diffusion.variance)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    if compile:
        # In place (nn.Module.compile): parameter names and checkpoints stay those of the plain backbone.
        module.compile(**(compile if isinstance(compile, dict) else {}))
    return module
