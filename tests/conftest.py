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


def sampler_spec(name: str, **init_args) -> dict:
    """``{"name": name, "init_args": init_args}`` with options that let the sampler run on a short grid: RePaint's
    jumps (10 levels by default, which must be below the step count) go up a third of the grid, twice."""
    if name == "repaint" and init_args.get("num_steps") and "jump_length" not in init_args:
        n = init_args["num_steps"]
        init_args = {"jump_length": max(1, n // 3), "jump_n_sample": 2 if n > 1 else 1, **init_args}
    return {"name": name, "init_args": init_args}


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
