"""UniPC (Zhao et al. 2023): a unified predictor-corrector multistep solver, B(h) = e^h - 1 ("bh2").

Data prediction in lambda = log(alpha / sigma_vp). Each step predicts x_{i+1} with UniP of order p
from the last p values of x0 (one network evaluation per step); the next evaluation, at x_{i+1},
then corrects x_{i+1} with UniC before the next prediction, at no extra cost. The first steps
warm up in order (1, 2, ...) and the last steps come down to first order (``lower_order_final``),
the last landing on the data, sigma = 0, at x = pred_x0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.diffusion import GaussianDiffusion
from .base import SAMPLERS, SPACINGS, Denoise, Generators, Grid, Sampler, StepCallback, solver_alpha_bar

__all__ = ["UniPCSampler"]


def _coefficients(rks: list[float], h: float, order: int, corrector: bool) -> tuple[float, float, list[float]]:
    """(h phi_1(-h), B(h), rhos) of a UniP (``corrector=False``) or UniC update of ``order``.

    ``rks``: (lambda_k - lambda_0) / h of the earlier points, newest first. The rhos solve
    R rho = b with R[k] = r^k and b_k = (k + 1)! phi_{k+1}(-h) / B(h) (Zhao et al. 2023, Alg. 2);
    a first-order UniC and a second-order UniP use rho = 1/2.
    """
    hh = -h
    h_phi_1 = math.expm1(hh)  # e^{-h} - 1
    b_h = h_phi_1  # bh2
    r = torch.tensor([*rks, 1.0], dtype=torch.float64)
    h_phi_k, factorial = h_phi_1 / hh - 1.0, 1.0
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append(r ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R, bt = torch.stack(rows), torch.tensor(b, dtype=torch.float64)
    if corrector:
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, bt).tolist()
    elif order == 1:
        rhos = []
    else:
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
    return h_phi_1, b_h, rhos


@SAMPLERS.register("unipc")
class UniPCSampler(Sampler):
    """UniPC-bh2 with data prediction (``unipc``).

    Args:
        order: the predictor's order p (1, 2 or 3); the corrector raises it by one.
        corrector: apply UniC after every step but the last (``False``: UniP alone).
    """

    spacings = SPACINGS
    drop_zero = True  # leading / linspace as in diffusers' multistep schedulers

    def __init__(
        self,
        num_steps: int | None = 20,
        order: int = 2,
        spacing: str = "trailing",
        clip_denoised: bool | None = None,
        corrector: bool = True,
        sigma_max: float | None = None,
    ):
        super().__init__(num_steps, spacing, clip_denoised, sigma_max)
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order}")
        self.order = order
        self.corrector = corrector

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
        sigma = [math.sqrt(1.0 - v) for v in ab]
        lam = [math.inf if s == 0 else math.log(a / s) for a, s in zip(alpha, sigma)]
        n = grid.num_steps
        history: list[tuple[Tensor, int]] = []  # (x0, grid index), newest last
        x_last, order_last = x, 0
        for i in range(n):
            d = denoise(x, i).x0
            if self.corrector and 0 < i < n - 1:  # the last x is replaced by pred_x0 anyway
                x = self._update(x_last, d, history, i - 1, i, order_last, alpha, sigma, lam)
            history = [*history, (d, i)][-self.order :]
            order = min(self.order, n - i, i + 1)  # warm-up, and lower_order_final
            x_last, order_last = x, order
            x = d if i == n - 1 else self._update(x, None, history, i, i + 1, order, alpha, sigma, lam)
            if callback is not None:
                callback(i + 1, n, x, d)
        return x

    @staticmethod
    def _update(
        x: Tensor,
        d_new: Tensor | None,
        history: list[tuple[Tensor, int]],
        s: int,
        t: int,
        order: int,
        alpha: list[float],
        sigma: list[float],
        lam: list[float],
    ) -> Tensor:
        """UniP (``d_new`` None) or UniC (``d_new``: x0 at the new point) from grid index s to t."""
        d0 = history[-1][0]
        h = lam[t] - lam[s]
        rks, diffs = [], []
        for d_k, k in reversed(history[-order:-1] if order > 1 else []):
            r = (lam[k] - lam[s]) / h
            rks.append(r)
            diffs.append((d_k - d0) / r)
        h_phi_1, b_h, rhos = _coefficients(rks, h, order, corrector=d_new is not None)
        x_next = (sigma[t] / sigma[s]) * x - (alpha[t] * h_phi_1) * d0
        residual = sum((rho * diff for rho, diff in zip(rhos, diffs)), torch.zeros_like(d0))
        if d_new is not None:
            residual = residual + rhos[-1] * (d_new - d0)
        return x_next - (alpha[t] * b_h) * residual
