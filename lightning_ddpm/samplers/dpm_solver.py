"""DPM-Solver++ 2M and its SDE variant (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and sec. 5).

Multistep exponential integrators in lambda = log(alpha / sigma_vp) with the data prediction
x0: one network evaluation per step, second order from the previous step's x0 (midpoint form,
as diffusers' ``solver_type="midpoint"``). The first step is first order (no history) and so is
the last (``lower_order_final``, what keeps few-step sampling stable): it lands on the data,
sigma = 0, where the update is x = pred_x0.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..core.diffusion import GaussianDiffusion
from .base import SAMPLERS, SPACINGS, Denoise, Generators, Grid, Sampler, StepCallback, noise_like, solver_alpha_bar

__all__ = ["DPMSolverPP2MSampler", "DPMSolverPP2MSDESampler"]


def _alpha_sigma_lambda(alpha_bar: float) -> tuple[float, float, float]:
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    return alpha, sigma, (math.inf if sigma == 0 else math.log(alpha / sigma))


@SAMPLERS.register("dpmpp_2m")
class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M): deterministic, second order (``dpmpp_2m``).

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) (D_i + (D_i - D_{i-1}) / (2 r)),
    h = lambda_{i+1} - lambda_i, r = (lambda_i - lambda_{i-1}) / h, D = pred_x0.
    """

    spacings = SPACINGS
    drop_zero = True  # leading / linspace as in diffusers' multistep schedulers

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
        coefs = [_alpha_sigma_lambda(ab) for ab in solver_alpha_bar(grid)]
        n = grid.num_steps
        d_prev = None
        for i in range(n):
            d = denoise(x, i).x0
            if i == n - 1:
                x = d  # first order onto sigma = 0
            else:
                (_, s_i, lam_i), (a_next, s_next, lam_next) = coefs[i], coefs[i + 1]
                h = lam_next - lam_i
                d_hat = d if d_prev is None else d + (d - d_prev) * (h / (lam_i - coefs[i - 1][2]) / 2)
                x = self._update(x, d_hat, a_next, s_i, s_next, h, generator)
            if callback is not None:
                callback(i + 1, n, x, d)
            d_prev = d
        return x

    def _update(
        self, x: Tensor, d: Tensor, a_next: float, s_i: float, s_next: float, h: float, generator: Generators
    ) -> Tensor:
        return (s_next / s_i) * x - (a_next * math.expm1(-h)) * d


@SAMPLERS.register("dpmpp_2m_sde")
class DPMSolverPP2MSDESampler(DPMSolverPP2MSampler):
    """SDE-DPM-Solver++(2M) (``dpmpp_2m_sde``): the same multistep data prediction on the reverse SDE.

    x_{i+1} = (sigma_{i+1} / sigma_i) e^{-h} x_i + alpha_{i+1} (1 - e^{-2h}) D + sigma_{i+1} sqrt(1 - e^{-2h}) z.
    """

    def _update(
        self, x: Tensor, d: Tensor, a_next: float, s_i: float, s_next: float, h: float, generator: Generators
    ) -> Tensor:
        one_minus = -math.expm1(-2.0 * h)
        return (
            (s_next / s_i * math.exp(-h)) * x
            + (a_next * one_minus) * d
            + (s_next * math.sqrt(one_minus)) * noise_like(x, generator)
        )
