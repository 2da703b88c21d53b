"""Euler and Heun on the probability-flow ODE in sigma (Karras et al. 2022, Algorithm 1, S_churn = 0).

In x / alpha = x0 + sigma eps, with sigma = sqrt((1 - alpha_bar) / alpha_bar) exactly as the
discrete VP schedule gives it, the ODE is dx/dsigma = (x - D(x, sigma)) / sigma, D = pred_x0.
The network sees alpha x at the timestep of sigma (fractional for Karras sigmas). Euler is
first order (the same steps as DDIM with eta = 0); Heun adds a trapezoidal correction (second
order, two evaluations per step) except on the last step to sigma = 0, which is an Euler step:
N steps cost 2N - 1 evaluations.
"""

from __future__ import annotations

import math
import warnings

from torch import Tensor

from ..core.diffusion import GaussianDiffusion
from .base import SAMPLERS, Denoise, Generators, Grid, Sampler, StepCallback, solver_alpha_bar

__all__ = ["EulerSampler", "HeunSampler"]

# Heun's first step spanning more than this ratio of sigmas gets a warning. On the cosine schedule the
# trailing grid's ratio is ~3200 at 10 steps and ~630 at 50; benchmarks/sampler_quality.py measured sliced
# W2 23 / 0.10 there on two moons, against 0.06 at 10 steps capped at sigma_max 80 (ratio 1.8).
HEUN_SPAN_WARNING = 100.0


@SAMPLERS.register("euler")
class EulerSampler(Sampler):
    """Euler's method in sigma (``euler``): x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D_i) / sigma_i."""

    spacings = ("leading", "trailing", "karras")
    refused_spacings = {
        "linspace": "diffusers' EulerDiscreteScheduler and HeunDiscreteScheduler place 'linspace' "
        "at fractional timesteps with linearly interpolated sigmas, a grid these samplers do not "
        "reproduce"
    }
    heun = False

    def __init__(
        self,
        num_steps: int | None = 20,
        spacing: str = "trailing",
        clip_denoised: bool | None = None,
        sigma_max: float | None = None,
    ):
        super().__init__(num_steps, spacing, clip_denoised, sigma_max)

    def solve(
        self,
        denoise: Denoise,
        diffusion: GaussianDiffusion,
        grid: Grid,
        x: Tensor,
        generator: Generators,
        callback: StepCallback | None,
    ) -> Tensor:  # noqa: D102
        ab = solver_alpha_bar(grid)
        alpha = [math.sqrt(v) for v in ab]
        sigma = [math.sqrt((1.0 - v) / v) for v in ab]
        n = grid.num_steps
        if self.heun and n > 1 and sigma[0] > HEUN_SPAN_WARNING * sigma[1]:
            warnings.warn(
                f"heun: the first step goes from sigma {sigma[0]:.3g} to {sigma[1]:.3g}; Heun's corrector multiplies "
                f"the network's error by about their ratio ({sigma[0] / sigma[1]:.0f}), which ruins the samples. "
                "Cap the grid as EDM does, {spacing: karras, sigma_max: 80}, "
                "or use a multistep solver (dpmpp_2m, unipc)",
                stacklevel=3,
            )
        x = x / alpha[0]  # variance-preserving x_t -> x_t / alpha = x0 + sigma eps

        def derivative(x: Tensor, i: int) -> tuple[Tensor, Tensor]:
            d = denoise(x * alpha[i], i).x0
            return (x - d) / sigma[i], d

        for i in range(n):
            slope, d = derivative(x, i)
            dt = sigma[i + 1] - sigma[i]
            if i == n - 1:
                x = d  # the Euler step onto sigma = 0 lands on D exactly
            elif not self.heun:
                x = x + slope * dt
            else:
                slope_next, _ = derivative(x + slope * dt, i + 1)
                x = x + (slope + slope_next) * (dt / 2)
            if callback is not None:
                callback(i + 1, n, x * alpha[i + 1], d)
        return x


@SAMPLERS.register("heun")
class HeunSampler(EulerSampler):
    """Heun's method in sigma (``heun``, Karras et al. 2022, Algorithm 1): second order, 2N - 1 evaluations."""

    heun = True
