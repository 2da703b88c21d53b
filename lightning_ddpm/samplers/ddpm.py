"""DDPM ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t) (Ho et al. 2020, Algorithm 2)."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ..core.diffusion import GaussianDiffusion
from .base import SAMPLERS, Denoise, Generators, Grid, Sampler, StepCallback, noise_like

__all__ = ["DDPMSampler"]


@SAMPLERS.register("ddpm")
class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), optionally over a respaced process.

    With fewer steps than T it samples the respaced process (Nichol & Dhariwal 2021, sec. 4), whose
    posterior and variances are those of the kept alpha_bar values (a learned variance interpolates
    between the respaced beta and beta_tilde); the last step adds no noise and returns pred_x0.
    """

    def __init__(self, num_steps: int | None = None, spacing: str = "leading", clip_denoised: bool | None = None):
        super().__init__(num_steps, spacing, clip_denoised)
        # The last respaced diffusion, keyed by a weak reference to its source (an id() can be reused by
        # another model once the first is garbage collected, and a sampler may be shared between models),
        # its device and the grid's timesteps (num_steps and spacing are plain attributes a user may change).
        self._respaced: tuple[weakref.ref, str, list[int], GaussianDiffusion] | None = None

    def _step_diffusion(self, diffusion: GaussianDiffusion, grid: Grid) -> GaussianDiffusion:
        if grid.num_steps == diffusion.num_timesteps:
            return diffusion
        key = (str(diffusion.betas.device), grid.t.tolist())  # the grid is a CPU tensor: no synchronisation
        cached = self._respaced
        if cached is None or cached[0]() is not diffusion or cached[1:3] != key:
            cached = self._respaced = (weakref.ref(diffusion), *key, diffusion.respace(grid.t))
        return cached[3]

    def solve(
        self,
        denoise: Denoise,
        diffusion: GaussianDiffusion,
        grid: Grid,
        x: Tensor,
        generator: Generators,
        callback: StepCallback | None,
    ) -> Tensor:  # noqa: D102
        stepper = self._step_diffusion(diffusion, grid)
        n = grid.num_steps
        for i in range(n):
            prediction = denoise(x, i)
            index = torch.full((x.shape[0],), n - 1 - i, device=x.device, dtype=torch.long)  # step in `stepper`
            if i == n - 1:
                x = prediction.x0  # the posterior mean at the first step: coef1 = 1, coef2 = 0
            else:
                step = stepper.reverse_step(prediction, x, index)
                x = step.mean + (0.5 * step.log_variance).exp() * noise_like(x, generator)
            if callback is not None:
                callback(i + 1, n, x, prediction.x0)
        return x
