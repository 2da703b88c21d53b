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

from .types import DenoiseFn, Prediction, PredictFn, Process

__all__ = ["Prediction", "Denoiser", "DenoiseFn", "PredictFn"]


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
