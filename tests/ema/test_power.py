"""Power-function EMA closed forms (Karras et al. 2024, appendix C), each against an independent computation:
the cubic's root against the forward formula, the discrete weights against the update law run on one-hot
signals, the relative width against the weights' own moments, the inner products against sums and quadrature,
and the least-squares reconstruction against a profile tracked directly."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ddpm.ema import (
    SIGMA_REL_MAX,
    PowerProfile,
    gamma_to_sigma_rel,
    profile_inner_products,
    reconstruction_error,
    sigma_rel_to_gamma,
    solve_coefficients,
)

SIGMA_RELS = [0.005, 0.01, 0.02, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.28, 0.288]


def test_sigma_rel_and_gamma_are_inverse_over_the_whole_range():
    for sigma_rel in torch.linspace(0.002, SIGMA_REL_MAX - 1e-6, 300).tolist():
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma > -0.01  # just below 0 between sqrt(1/12) and 0.289
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)
    for gamma in [0.0, 0.1, 0.5, 1.0, 3.0, 6.94, 16.97, 50.0, 300.0, 3000.0]:
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-8, abs=1e-9)


def test_the_papers_two_profiles():
    # Karras et al. 2024, section 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94 (two decimals)
    assert round(sigma_rel_to_gamma(0.05), 2) == 16.97
    assert round(sigma_rel_to_gamma(0.10), 2) == 6.94
    assert gamma_to_sigma_rel(0.0) == pytest.approx(math.sqrt(1 / 12))  # a uniform average: std of U(0, 1)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.289, 0.5, float("nan")])
def test_a_width_outside_the_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"sigma_rel must lie in \(0, 0.289\)"):
        PowerProfile(bad)


@pytest.mark.parametrize("sigma_rel", SIGMA_RELS)
def test_the_update_law_gives_the_closed_form_weights(sigma_rel):
    """Run ema = lerp(ema, theta_s, 1 - beta_s) on theta_s = the s-th unit vector: the average after step t
    is the weight vector, which must equal PowerProfile.weights(t) (and sum to 1) at every t."""
    profile, n = PowerProfile(sigma_rel), 60
    ema = torch.zeros(n, dtype=torch.float64)
    for t in range(1, n + 1):
        theta = torch.zeros(n, dtype=torch.float64)
        theta[t - 1] = 1.0
        ema.lerp_(theta, 1.0 - profile.beta(t))
        weights = profile.weights(t)
        torch.testing.assert_close(ema[:t], weights, rtol=1e-12, atol=1e-14)
        assert ema[t:].abs().max() == 0 if t < n else True
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert (weights >= 0).all()
    assert profile.beta(1) == 0.0  # the first update copies


@pytest.mark.parametrize("sigma_rel", SIGMA_RELS)
def test_the_weights_have_the_stated_relative_width(sigma_rel):
    """The standard deviation of the step a weight sits at, over the profile's length t, is sigma_rel (up to
    the discretisation, O(1/t)); the continuous profile's moments are exact."""
    profile = PowerProfile(sigma_rel)
    for t in (1000, 20000):
        weights, s = profile.weights(t), torch.arange(1, t + 1, dtype=torch.float64) - 0.5  # the step's midpoint
        mean = (weights * s).sum()
        std = ((weights * (s - mean) ** 2).sum()).sqrt() / t
        assert std.item() == pytest.approx(sigma_rel, abs=1.0 / t)
    # the continuous density (gamma + 1) x^gamma on [0, 1], by quadrature
    x = torch.linspace(0, 1, 400001, dtype=torch.float64)
    density = (profile.gamma + 1) * x**profile.gamma
    mean = torch.trapezoid(density * x, x)
    std = torch.trapezoid(density * (x - mean) ** 2, x).sqrt()
    assert std.item() == pytest.approx(sigma_rel, rel=1e-4)


def test_an_ema_of_a_constant_is_that_constant():
    profile, theta = PowerProfile(0.05), torch.randn(1000, generator=torch.Generator().manual_seed(0))
    ema = torch.zeros_like(theta)
    for t in range(1, 2001):
        torch._foreach_lerp_([ema], [theta], 1.0 - profile.beta(t))
    assert torch.equal(ema, theta)


def test_inner_products_match_quadrature_and_the_discrete_weights():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        sa, sb = (0.02 + 0.25 * torch.rand(2, generator=g, dtype=torch.float64)).tolist()
        ta, tb = (200 + torch.randint(0, 3000, (2,), generator=g)).tolist()
        a, b = PowerProfile(sa), PowerProfile(sb)
        closed = profile_inner_products(
            torch.tensor(float(ta)), torch.tensor(a.gamma), torch.tensor(float(tb)), torch.tensor(b.gamma)
        ).item()
        tau = torch.linspace(0, min(ta, tb), 200001, dtype=torch.float64)
        pa = (a.gamma + 1) * tau**a.gamma / ta ** (a.gamma + 1)
        pb = (b.gamma + 1) * tau**b.gamma / tb ** (b.gamma + 1)
        assert closed == pytest.approx(torch.trapezoid(pa * pb, tau).item(), rel=1e-5)
        n = min(ta, tb)  # the discrete profiles' inner product, one weight per step
        discrete = (a.weights(ta)[:n] * b.weights(tb)[:n]).sum().item()
        assert closed == pytest.approx(discrete, rel=5.0 / n)


def test_reconstructing_a_stored_profile_returns_it():
    steps = torch.tensor([100, 100, 200, 200, 300, 300])
    gammas = torch.tensor([PowerProfile(0.05).gamma, PowerProfile(0.10).gamma] * 3, dtype=torch.float64)
    for i in range(len(steps)):
        x = solve_coefficients(steps, gammas, int(steps[i]), gammas[i].item())
        expected = torch.zeros(len(steps), dtype=torch.float64)
        expected[i] = 1.0
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-8)


def _trajectory(num_steps: int, dim: int = 64) -> torch.Tensor:
    """(num_steps, dim) parameters as training leaves them: a drift, slow oscillations and a random walk."""
    g = torch.Generator().manual_seed(2)
    s = torch.arange(1, num_steps + 1, dtype=torch.float64)[:, None] / num_steps
    freqs, phases = 1 + 6 * torch.rand(dim, generator=g), 6.3 * torch.rand(dim, generator=g)
    walk = torch.randn(num_steps, dim, generator=g, dtype=torch.float64).cumsum(0) / math.sqrt(num_steps)
    return torch.sin(freqs * 6.3 * s + phases) + 2 * s + 0.3 * walk


def test_reconstruction_approaches_a_directly_tracked_profile_as_snapshots_get_denser():
    """Track 0.05 and 0.10 (snapshots every k steps) and 0.07 directly; reconstruct 0.07 at the end from the
    snapshots. The error, relative to how far the two stored profiles end apart, falls as k shrinks."""
    num_steps, theta = 2000, _trajectory(2000)
    stored, direct = [PowerProfile(0.05), PowerProfile(0.10)], PowerProfile(0.07)
    errors = []
    for every in (500, 100, 20):
        emas, target = [theta[0].clone() for _ in stored], theta[0].clone()
        steps, gammas, snapshots = [], [], []
        for t in range(1, num_steps + 1):
            for ema, profile in zip(emas, stored):
                ema.lerp_(theta[t - 1], 1.0 - profile.beta(t))
            target.lerp_(theta[t - 1], 1.0 - direct.beta(t))
            if t % every == 0:
                for ema, profile in zip(emas, stored):
                    steps.append(t), gammas.append(profile.gamma), snapshots.append(ema.clone())
        x = solve_coefficients(torch.tensor(steps), torch.tensor(gammas, dtype=torch.float64), num_steps, direct.gamma)
        reconstructed = (x[:, None] * torch.stack(snapshots)).sum(0)
        errors.append(((reconstructed - target).norm() / (emas[0] - emas[1]).norm()).item())
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-4, errors  # measured: 0.067, 2.9e-4, 7.0e-7


def _every(k: int, num_steps: int = 2000) -> tuple[torch.Tensor, torch.Tensor, list[PowerProfile]]:
    """Snapshots of sigma_rel 0.05 and 0.10 every k steps up to num_steps (configs/digits.yaml at k = 50)."""
    stored = [PowerProfile(0.05), PowerProfile(0.10)]
    steps = [t for _ in stored for t in range(k, num_steps + 1, k)]
    gammas = [p.gamma for p in stored for _ in range(k, num_steps + 1, k)]
    return torch.tensor(steps), torch.tensor(gammas, dtype=torch.float64), stored


@pytest.mark.parametrize("sigma_rel", [0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.288])
def test_reconstruction_error_is_the_distance_of_the_discrete_weights(sigma_rel):
    """The closed form against the discrete profiles themselves: combine each snapshot's weights over steps
    1..t with the solved coefficients and measure the distance to the target's weights after step T."""
    num_steps = 2000
    steps, gammas, stored = _every(50, num_steps)
    target = PowerProfile(sigma_rel)
    x = solve_coefficients(steps, gammas, num_steps, target.gamma)
    combined = torch.zeros(num_steps, dtype=torch.float64)
    for weight, t, gamma in zip(x.tolist(), steps.tolist(), gammas.tolist()):
        profile = stored[0] if gamma == stored[0].gamma else stored[1]
        combined[:t] += weight * profile.weights(t)
    discrete = ((combined - target.weights(num_steps)).norm() / target.weights(num_steps).norm()).item()
    closed = reconstruction_error(steps, gammas, num_steps, target.gamma)
    assert closed == pytest.approx(discrete, rel=0.02, abs=2e-4)


def test_reconstruction_error_is_zero_for_a_stored_profile_and_falls_as_snapshots_get_denser():
    steps, gammas, _ = _every(50)
    for stored in (0.05, 0.10):
        assert reconstruction_error(steps, gammas, 2000, sigma_rel_to_gamma(stored)) < 1e-6
    errors = [reconstruction_error(*_every(k)[:2], 2000, sigma_rel_to_gamma(0.01)) for k in (200, 50, 10, 2)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[1] == pytest.approx(0.1266, abs=5e-4)  # the figure docs/benchmarks.md quotes for digits.yaml
