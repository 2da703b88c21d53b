"""Shared fixtures: every registered schedule, parameterization and variance, small T."""

from __future__ import annotations

import pytest
import torch

from lightning_ddpm import GaussianDiffusion, make_schedule
from lightning_ddpm.core.parameterizations import available_parameterizations
from lightning_ddpm.core.schedules import available_schedules
from lightning_ddpm.core.variances import available_variances

# "custom" needs its own betas; every other registered schedule is checked the same way.
SCHEDULES = [name for name in available_schedules() if name != "custom"]
PARAMETERIZATIONS = available_parameterizations()


def small_schedule(name: str, T: int = 20, **kw):
    """A T-step version of a named schedule whose last step is noisy enough for tests."""
    if name == "linear":
        kw.setdefault("beta_end", 0.3)
    if name == "scaled_linear":
        kw.setdefault("beta_end", 0.3)
    return make_schedule(name, num_timesteps=T, **kw)


@pytest.fixture(params=SCHEDULES)
def schedule_name(request) -> str:
    return request.param


@pytest.fixture(params=PARAMETERIZATIONS)
def parameterization(request) -> str:
    return request.param


@pytest.fixture(params=available_variances())
def variance(request) -> str:
    return request.param


def oracle(diffusion: GaussianDiffusion, x0_star: torch.Tensor):
    """The exact denoiser for data that is the single point ``x0_star``, in any parameterization."""

    def denoise_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = diffusion.coefficients(t, x_t)
        x0 = x0_star.expand_as(x_t)
        eps = (x_t - c.sqrt_alpha_bar * x0) / c.sqrt_one_minus_alpha_bar
        out = diffusion.param.from_x0_eps(x0, eps, x_t, c)
        if diffusion.variance == "learned_range":
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out

    return denoise_fn
