"""Noise schedules: betas -> alpha_bar, snr and the posterior constants, in float64.

A schedule is fixed data (Ho et al. 2020 keep beta_t fixed, not learned). Named schedules
live in a registry so new ones plug in by name; a released schedule's numbers never change
(a change is a new name).

Index convention: ``t`` is an integer in ``[0, T)``; index 0 is the paper's t = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .registry import Registry

__all__ = [
    "NoiseSchedule",
    "SCHEDULES",
    "make_schedule",
    "register_schedule",
    "available_schedules",
    "rescale_zero_terminal_snr",
]

BetaFn = Callable[..., Tensor]
SCHEDULES: Registry[BetaFn] = Registry("schedule")


class NoiseSchedule:
    """A discrete forward process given by its betas (float64, shape ``(T,)``).

    Every derived constant is computed once here, in float64, so that the rest of the
    library only gathers and casts. ``betas`` must lie in (0, 1]; beta = 1 is allowed only
    at the last step (zero terminal SNR, Lin et al. 2024).
    """

    def __init__(self, betas: Tensor | Sequence[float]) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().clone().cpu()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all():
            raise ValueError("betas must be finite")
        if (betas <= 0).any() or (betas > 1).any():
            raise ValueError(
                f"betas must lie in (0, 1], got values from {betas.min().item():.4g} to {betas.max().item():.4g}"
            )
        if (betas[:-1] >= 1).any():
            raise ValueError("beta = 1 is only allowed at the last timestep (zero terminal SNR)")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        # q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, beta_tilde I); Ho et al. 2020, eq. 6-7.
        self.posterior_variance = (1.0 - ab_prev) / (1.0 - ab) * betas
        self.posterior_mean_coef1 = ab_prev.sqrt() * betas / (1.0 - ab)
        self.posterior_mean_coef2 = self.alphas.sqrt() * (1.0 - ab_prev) / (1.0 - ab)
        # beta_tilde at index 0 is 0; clip its log as the reference implementations do.
        if len(betas) > 1:
            clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        else:
            clipped = betas.clone()
        self.posterior_log_variance_clipped = clipped.log()

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor | Sequence[float]) -> NoiseSchedule:
        """Build the schedule whose cumulative products are ``alphas_cumprod`` (decreasing)."""
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        return cls(1.0 - ab / prev)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.numel())

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar), shape ``(T,)``."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @property
    def has_zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def respace(self, timesteps: Sequence[int] | Tensor) -> NoiseSchedule:
        """The schedule of the sub-process that visits only ``timesteps`` (Nichol & Dhariwal 2021, sec. 4).

        Its alpha_bar values are the original ones at the kept indices, so q(x_t | x0) is
        unchanged at those steps.
        """
        ts = torch.as_tensor(timesteps, dtype=torch.long).sort().values
        if ts.numel() == 0 or ts[0] < 0 or ts[-1] >= self.num_timesteps or ts.unique().numel() != ts.numel():
            raise ValueError(f"timesteps must be distinct indices in [0, {self.num_timesteps})")
        return NoiseSchedule.from_alphas_cumprod(self.alphas_cumprod[ts])

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={self.num_timesteps}, beta_1={self.betas[0].item():.3g}, "
            f"beta_T={self.betas[-1].item():.3g}, alpha_bar_T={self.alphas_cumprod[-1].item():.3g})"
        )


def register_schedule(name: str) -> Callable[[BetaFn], BetaFn]:
    """Register ``fn(num_timesteps, **kwargs) -> betas`` under ``name``."""
    return SCHEDULES.register(name)


def available_schedules() -> list[str]:
    return sorted(SCHEDULES)


def make_schedule(
    name: str,
    num_timesteps: int = 1000,
    rescale_to_zero_terminal_snr: bool = False,
    **kwargs: float | Sequence[float],
) -> NoiseSchedule:
    """Build a named schedule.

    Args:
        name: one of :func:`available_schedules` (``linear``, ``cosine``, ``sigmoid``,
            ``scaled_linear``, ``custom``).
        num_timesteps: T.
        rescale_to_zero_terminal_snr: shift and scale sqrt(alpha_bar) so alpha_bar_T = 0
            (Lin et al. 2024, Algorithm 1).
        **kwargs: the schedule's own options (e.g. ``beta_start``, ``beta_end``, ``s``, ``betas``).
    """
    beta_fn = SCHEDULES.get(name)
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    try:
        betas = beta_fn(num_timesteps, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad options for schedule {name!r}: {err}") from err
    if rescale_to_zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return NoiseSchedule(betas)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Algorithm 1: keep sqrt(alpha_bar_1), move sqrt(alpha_bar_T) to 0."""
    sqrt_ab = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    if len(betas) < 2:
        raise ValueError("zero terminal SNR rescaling needs at least 2 timesteps")
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return NoiseSchedule.from_alphas_cumprod(sqrt_ab**2).betas


def _check_linear_range(name: str, beta_start: float, beta_end: float) -> None:
    """A linear schedule grows: 0 < beta_start <= beta_end < 1 (a decreasing one is almost surely swapped)."""
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"{name} schedule needs 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )


def _betas_from_alpha_bar(alpha_bar: Callable[[Tensor], Tensor], num_timesteps: int, max_beta: float) -> Tensor:
    """beta_t = 1 - alpha_bar(t / T) / alpha_bar((t - 1) / T), clipped at ``max_beta``."""
    grid = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    ab = alpha_bar(grid)
    return (1.0 - ab[1:] / ab[:-1]).clamp(max=max_beta)


@register_schedule("linear")
def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 (for T = 1000)."""
    _check_linear_range("linear", beta_start, beta_end)
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


@register_schedule("scaled_linear")
def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Linear in sqrt(beta) (the latent-diffusion / Stable Diffusion schedule)."""
    _check_linear_range("scaled_linear", beta_start, beta_end)
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64) ** 2


@register_schedule("cosine")
def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""

    def alpha_bar(u: Tensor) -> Tensor:
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return _betas_from_alpha_bar(alpha_bar, num_timesteps, max_beta)


@register_schedule("sigmoid")
def sigmoid_betas(
    num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> Tensor:
    """Chen 2023 ("On the importance of noise scheduling"), sigmoid alpha_bar(t), normalised to [0, 1]."""
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

    def alpha_bar(u: Tensor) -> Tensor:
        return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)

    return _betas_from_alpha_bar(alpha_bar, num_timesteps, max_beta)


@register_schedule("custom")
def custom_betas(num_timesteps: int, betas: Sequence[float] = ()) -> Tensor:
    """User-given betas; their count must equal ``num_timesteps``."""
    values = torch.as_tensor(list(betas), dtype=torch.float64)
    if values.numel() != num_timesteps:
        raise ValueError(f"custom schedule: got {values.numel()} betas for num_timesteps={num_timesteps}")
    return values
