"""DDIM (Song et al. 2021, eq. 12): deterministic at eta = 0, the DDPM posterior variance at eta = 1."""

from __future__ import annotations

from torch import Tensor

from ..core.diffusion import GaussianDiffusion
from .base import SAMPLERS, Denoise, Generators, Grid, Sampler, StepCallback, noise_like

__all__ = ["DDIMSampler"]


@SAMPLERS.register("ddim")
class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12).

    x_s = sqrt(alpha_bar_s) x0 + sqrt(1 - alpha_bar_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s);
    the last step uses alpha_bar_s = 1 and so returns pred_x0. At eta = 0 this is Euler's method on
    the probability-flow ODE in sigma = sqrt((1 - alpha_bar) / alpha_bar) (first order).
    """

    def __init__(
        self,
        num_steps: int | None = 50,
        eta: float = 0.0,
        spacing: str = "leading",
        clip_denoised: bool | None = None,
    ):
        super().__init__(num_steps, spacing, clip_denoised)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)

    def sigma(self, alpha_bar_t: float, alpha_bar_s: float) -> float:
        """The DDIM noise scale of the step t -> s."""
        return self.eta * ((1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s)) ** 0.5

    def solve(
        self,
        denoise: Denoise,
        diffusion: GaussianDiffusion,
        grid: Grid,
        x: Tensor,
        generator: Generators,
        callback: StepCallback | None,
    ) -> Tensor:  # noqa: D102
        ab = grid.alpha_bar.tolist()
        for i in range(grid.num_steps):
            prediction = denoise(x, i)
            sigma = self.sigma(ab[i], ab[i + 1])
            x = ab[i + 1] ** 0.5 * prediction.x0 + max(1.0 - ab[i + 1] - sigma**2, 0.0) ** 0.5 * prediction.eps
            if sigma > 0:
                x = x + sigma * noise_like(x, generator)
            if callback is not None:
                callback(i + 1, grid.num_steps, x, prediction.x0)
        return x

    def _options(self) -> str:
        return f", eta={self.eta}"
