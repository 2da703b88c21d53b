"""Order of accuracy of the deterministic samplers on the probability-flow ODE.

For Gaussian data x0 ~ N(m, s^2) the exact denoiser is D(x, sigma) = m + s^2 / (s^2 + sigma^2) (x - m)
in x / alpha = x0 + sigma eps, and the ODE dx/dsigma = (x - D) / sigma has the closed-form solution
x(sigma) = m + sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2) (x(sigma_max) - m), sigma_max the grid's
first sigma (where x_T starts). Every sampler ends with x = D(x_hat, sigma_min), x_hat its estimate of
x(sigma_min) at the grid's last sigma; the reference is D at the exact x(sigma_min). Doubling the steps must divide the error by 2^order: DDIM and Euler first order,
DPM-Solver++(2M) and Heun second, UniPC one above its predictor (the corrector adds one).
The multistep solvers are checked on Karras sigmas: on grids uniform in t that stop short of t = 0 (their
leading / linspace / trailing) the DDPM linear schedule keeps them pre-asymptotic up to ~300 steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ddpm import GaussianDiffusion, make_schedule
from lightning_ddpm.samplers import make_sampler

MU, STD = 0.3, 0.6
STEPS = (20, 40, 80)  # past the pre-asymptotic range of the DDPM linear schedule (sigma from 0.01 to 157)
# (sampler, options, spacing, expected order)
CASES = [
    ("ddim", {}, "linspace", 1),
    ("euler", {}, "leading", 1),
    ("euler", {}, "karras", 1),
    ("dpmpp_2m", {}, "karras", 2),
    ("heun", {}, "leading", 2),
    ("heun", {}, "karras", 2),
    ("unipc", {"order": 2, "corrector": False}, "karras", 2),
    ("unipc", {"order": 1}, "karras", 2),
    ("unipc", {"order": 2}, "karras", 3),
    ("unipc", {"order": 3}, "karras", 4),
]


def _errors(name: str, options: dict, spacing: str) -> list[float]:
    d = GaussianDiffusion(make_schedule("linear", num_timesteps=1000), parameterization="x0")

    def exact_x0(x, t):
        ab = d.alpha_bar_at(t.double() if t.is_floating_point() else t).to(x.dtype).reshape(-1, 1)
        return MU + ab.sqrt() * STD**2 / (ab * STD**2 + 1 - ab) * (x - ab.sqrt() * MU)

    x_T = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in STEPS:
        sampler = make_sampler({"name": name, "init_args": {"num_steps": steps, "spacing": spacing, **options}})
        ab = sampler.grid(d).alpha_bar  # (N + 1,): the grid's alpha_bar, then 1 (the data)
        sigma_max, sigma_min = float(((1 - ab[0]) / ab[0]).sqrt()), float(((1 - ab[-2]) / ab[-2]).sqrt())
        x_end = MU + math.sqrt(STD**2 + sigma_min**2) / math.sqrt(STD**2 + sigma_max**2) * (x_T / ab[0].sqrt() - MU)
        reference = MU + STD**2 / (STD**2 + sigma_min**2) * (x_end - MU)
        errors.append(float((sampler.sample(exact_x0, d, x_T) - reference).abs().max()))
    return errors


@pytest.mark.parametrize(("name", "options", "spacing", "order"), CASES, ids=lambda v: str(v))
def test_error_falls_at_the_solver_order(name, options, spacing, order):
    errors = _errors(name, options, spacing)
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    assert errors[0] > errors[1] > errors[2], errors
    # the last doubling is in the asymptotic range: its slope is the order, within 0.25
    assert abs(slopes[-1] - order) < 0.25, (errors, slopes)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("num_steps", [10, 20])
def test_multistep_grids_spend_no_evaluation_at_t0(name, spacing, num_steps):
    """diffusers' leading / linspace for the multistep solvers (N + 1 points, t = 0 dropped): on the exact
    Gaussian ODE the sample at sigma = 0 is closer to the exact flow than with a grid that evaluates the
    network at t = 0 and then steps to the data (2.7x at 10 steps for dpmpp_2m linspace), and than DDIM's."""
    d = GaussianDiffusion(make_schedule("linear", num_timesteps=1000), parameterization="x0")

    def exact_x0(x, t):
        ab = d.alpha_bar_at(t).to(x.dtype).reshape(-1, 1)
        return MU + ab.sqrt() * STD**2 / (ab * STD**2 + 1 - ab) * (x - ab.sqrt() * MU)

    x_T = torch.randn(256, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def error(sampler) -> float:
        ab = sampler.grid(d).alpha_bar
        sigma_max = float(((1 - ab[0]) / ab[0]).sqrt())
        exact = MU + STD / math.sqrt(STD**2 + sigma_max**2) * (x_T / ab[0].sqrt() - MU)  # the flow at sigma = 0
        return float((sampler.sample(exact_x0, d, x_T) - exact).pow(2).mean().sqrt())

    spec = {"num_steps": num_steps, "spacing": spacing}
    ours = make_sampler({"name": name, "init_args": spec})
    assert 0 not in ours.grid(d).t.tolist()
    with_t0 = make_sampler({"name": name, "init_args": spec})
    with_t0.drop_zero = False  # the grid of N points that ends at t = 0
    assert with_t0.grid(d).t[-1] == 0
    ddim = make_sampler({"name": "ddim", "init_args": spec})
    assert error(ours) < 0.5 * error(with_t0), (error(ours), error(with_t0))
    assert error(ours) < 0.7 * error(ddim), (error(ours), error(ddim))
