"""The one map between training timesteps and sigma = sqrt((1 - alpha_bar) / alpha_bar), both ways.

Between two training steps log sigma is interpolated linearly, as k-diffusion and diffusers do
(``_sigma_to_t``): :func:`log_sigma_at` reads the map at (fractional) timesteps, :func:`sigma_to_t` inverts it,
so a model evaluated at a Karras sigma sees the timestep those libraries give it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["log_sigmas_of", "log_sigma_at", "sigma_to_t"]


def log_sigmas_of(alphas_cumprod: Tensor) -> Tensor:
    """log sigma_t = log sqrt((1 - alpha_bar_t) / alpha_bar_t) at every training step."""
    return 0.5 * ((1.0 - alphas_cumprod).log() - alphas_cumprod.log())


def log_sigma_at(t: Tensor, log_sigmas: Tensor) -> Tensor:
    """log sigma at floating-point timesteps ``t`` (clamped to [0, T - 1]), interpolated linearly between steps."""
    num_timesteps = len(log_sigmas)
    t = t.clamp(0, num_timesteps - 1)  # no range check: reading a flag back would be a host sync
    low = t.floor().long().clamp(max=max(num_timesteps - 2, 0))
    high = (low + 1).clamp(max=num_timesteps - 1)
    w = t.to(log_sigmas.dtype) - low
    ls = log_sigmas
    # where(w == 0) keeps an infinite log sigma (zero terminal SNR) at its own index out of the sum.
    return torch.where(w == 0, ls[low], torch.where(w == 1, ls[high], (1 - w) * ls[low] + w * ls[high]))


def sigma_to_t(sigmas: Tensor, log_sigmas: Tensor) -> Tensor:
    """Fractional timesteps of ``sigmas``: linear interpolation of log sigma between training steps."""
    log_sigma = sigmas.log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
    return low.to(torch.float64) + w
