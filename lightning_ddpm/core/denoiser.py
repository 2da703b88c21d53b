"""The model contract of the samplers, guidance and bits/dim: ``model(x_t, t) -> Prediction``.

A :class:`Denoiser` wraps a backbone (the raw network) with the diffusion's parameterization
and variance, the way k-diffusion's ``model(x, sigma) -> denoised`` and EDM's preconditioning
wrappers do: whoever consumes a :class:`Prediction` never sees raw network outputs and never
needs to know whether the network predicts eps, x0, mu or v.

``t`` is the training timestep index; a floating-point ``t`` lies between two indices (samplers
with Karras sigmas evaluate the model there) and its alpha_bar is interpolated in log sigma.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .parameterizations import Parameterization
from .types import DenoiseFn, PredictFn, Prediction, Process, StepCoefficients
from .variances import Variance

__all__ = ["Prediction", "Denoiser", "DenoiseFn", "PredictFn", "split_output", "interpret", "clip_x0"]


def split_output(model_output: Tensor, x_t: Tensor, variance: Variance) -> tuple[Tensor, Tensor | None]:
    """Split a network output into (mean part, variance part or None), checking its shape against x_t."""
    channels = x_t.shape[1] if x_t.ndim > 1 else 1
    expected = (x_t.shape[0], channels * variance.output_factor, *x_t.shape[2:])
    if tuple(model_output.shape) != expected:
        raise ValueError(
            f"model output has shape {tuple(model_output.shape)}, expected {expected} for "
            f"variance={variance.name!r} ({variance.output_factor}x the {channels} data channels on dim 1)"
        )
    model_output = model_output.to(x_t.dtype)
    if variance.output_factor == 2:
        mean_out, var_out = model_output.chunk(2, dim=1)
        return mean_out, var_out
    return model_output, None


def interpret(
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor,
    parameterization: Parameterization,
    variance: Variance,
    c: StepCoefficients,
) -> Prediction:
    """A network output at (x_t, t) as a :class:`Prediction`: the parameterization's x0 and eps, and the
    variance's ``variance_frac``; ``c`` holds the schedule constants at t."""
    mean_out, var_out = split_output(model_output, x_t, variance)
    if t.is_floating_point() and not parameterization.fractional_timesteps:
        raise ValueError(
            f"parameterization {parameterization.name!r} is defined at integer timesteps only "
            "(fractional_timesteps = False); use a spacing other than 'karras' (or a sampler on integer timesteps)"
        )
    pred_x0, pred_eps = parameterization.to_x0_eps(mean_out, x_t, c)
    return Prediction(pred_x0, pred_eps, variance.fraction(var_out))


def clip_x0(prediction: Prediction, x_t: Tensor, c: StepCoefficients) -> Prediction:
    """Clip x0 to [-1, 1] and re-derive eps from it, so the pair stays consistent with x_t."""
    x0 = prediction.x0.clamp(-1.0, 1.0)
    return prediction._replace(x0=x0, eps=(x_t - c.sqrt_alpha_bar * x0) / c.sqrt_one_minus_alpha_bar)


class Denoiser(nn.Module):
    """Backbone + parameterization + variance: ``forward(x_t, t, cond=None) -> Prediction``.

    Args:
        backbone: ``backbone(x_t, t[, cond]) -> output``, an ``nn.Module`` or any callable.
        diffusion: the :class:`GaussianDiffusion` whose parameterization and variance the output follows.
    """

    def __init__(self, backbone: Callable[..., Tensor], diffusion: Process) -> None:
        super().__init__()
        self.backbone = backbone
        self.diffusion = diffusion

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Prediction:
        output = self.backbone(x_t, t) if cond is None else self.backbone(x_t, t, cond)
        return self.diffusion.predict(output, x_t, t)
