import pytest
import torch

from lightning_ddpm import GaussianDiffusion
from lightning_ddpm.core.parameterizations import PARAMETERIZATIONS as PARAMETERIZATIONS_REGISTRY
from lightning_ddpm.core.parameterizations import X0Parameterization, get_parameterization
from lightning_ddpm.core.schedules import available_schedules, make_schedule
from tests.conftest import PARAMETERIZATIONS, small_schedule


def _setup(schedule_name, T=20, batch=64, seed=0):
    d = GaussianDiffusion(small_schedule(schedule_name, T))
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, T, (batch,), generator=g)
    t[:2] = torch.tensor([0, T - 1])  # always include both ends
    x_t = d.q_sample(x0, t, eps)
    return d, x0, eps, x_t, d.coefficients(t, x_t), t


def test_round_trips_across_all_parameterizations(schedule_name):
    d, x0, eps, x_t, c, _ = _setup(schedule_name)
    outputs = {n: get_parameterization(n).from_x0_eps(x0, eps, x_t, c) for n in PARAMETERIZATIONS}
    for name, out in outputs.items():
        p = get_parameterization(name)
        rx0, reps = p.to_x0_eps(out, x_t, c)
        torch.testing.assert_close(rx0, x0, rtol=0, atol=1e-10, msg=f"{name}: x0")
        torch.testing.assert_close(reps, eps, rtol=0, atol=1e-10, msg=f"{name}: eps")
        # output -> (x0, eps) -> output for an arbitrary (not consistent) output too
        noise = torch.randn_like(out)
        torch.testing.assert_close(p.from_x0_eps(*p.to_x0_eps(noise, x_t, c), x_t, c), noise, rtol=0, atol=1e-10)
    # the chain eps -> x0 -> v -> mu -> eps
    chain = ["eps", "x0", "v", "mu", "eps"]
    out = outputs["eps"]
    for a, b in zip(chain, chain[1:]):
        out = get_parameterization(b).from_x0_eps(*get_parameterization(a).to_x0_eps(out, x_t, c), x_t, c)
        torch.testing.assert_close(out, outputs[b], rtol=0, atol=1e-10)


def test_targets_match_their_definitions(schedule_name):
    d, x0, eps, x_t, c, t = _setup(schedule_name)
    ab = d.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(get_parameterization("eps").from_x0_eps(x0, eps, x_t, c), eps)
    torch.testing.assert_close(get_parameterization("x0").from_x0_eps(x0, eps, x_t, c), x0)
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0  # Salimans & Ho 2022
    torch.testing.assert_close(get_parameterization("v").from_x0_eps(x0, eps, x_t, c), v, rtol=0, atol=1e-12)
    mu, _, _ = d.q_posterior(x0, x_t, t)
    torch.testing.assert_close(get_parameterization("mu").from_x0_eps(x0, eps, x_t, c), mu)


def test_x0_scale_is_the_derivative(schedule_name, parameterization):
    d, x0, eps, x_t, c, _ = _setup(schedule_name)
    p = get_parameterization(parameterization)
    out = p.from_x0_eps(x0, eps, x_t, c)
    h = 1e-6
    dx0 = (p.to_x0_eps(out + h, x_t, c)[0] - p.to_x0_eps(out, x_t, c)[0]) / h
    torch.testing.assert_close(dx0.abs(), p.x0_scale(c).expand_as(dx0), rtol=1e-5, atol=1e-8)


def test_unknown_parameterization():
    with pytest.raises(ValueError, match=r"unknown parameterization 'epsilon'; choose one of: eps, x0, mu, v"):
        get_parameterization("epsilon")


@pytest.mark.parametrize("schedule", [s for s in available_schedules() if s != "custom"])
def test_zero_terminal_snr_flag_matches_the_conditioning_of_x0(schedule):
    """A parameterization says whether x0 is recoverable at alpha_bar = 0; the flag agrees with |d x0 / d output|
    at the last step of every built-in zero-terminal-SNR schedule (<= 1 when it claims so, >= 50 when not)."""
    s = make_schedule(schedule, num_timesteps=1000, rescale_to_zero_terminal_snr=True)
    d = GaussianDiffusion(s, parameterization="v")
    x = torch.zeros(1, 2, dtype=torch.float64)
    c = d.coefficients(torch.tensor([999]), x)
    for name in PARAMETERIZATIONS:
        p = get_parameterization(name)
        scale = float(p.x0_scale(c))
        assert (scale <= 1.0) if p.zero_terminal_snr else (scale >= 50.0), (name, scale)
        if not p.zero_terminal_snr:
            with pytest.raises(ValueError, match=f"parameterization={name!r}"):
                GaussianDiffusion(s, parameterization=name)


class _FlaggedX0(X0Parameterization):
    name = "flagged_x0"
    zero_terminal_snr = False
    fractional_timesteps = False


def test_the_flags_of_a_registered_parameterization_are_honoured(monkeypatch):
    """The zero-terminal-SNR and fractional-timestep refusals read the parameterization's flags, not its name."""
    monkeypatch.setattr(PARAMETERIZATIONS_REGISTRY, "_entries", dict(PARAMETERIZATIONS_REGISTRY._entries))
    PARAMETERIZATIONS_REGISTRY.register("flagged_x0")(_FlaggedX0)
    s = make_schedule("linear", num_timesteps=20, rescale_to_zero_terminal_snr=True)
    with pytest.raises(
        ValueError, match="parameterization='flagged_x0' at the last step; use parameterization='x0' or 'v'"
    ):
        GaussianDiffusion(s, parameterization="flagged_x0")
    d = GaussianDiffusion(small_schedule("linear"), parameterization="flagged_x0")
    x = torch.zeros(2, 2)
    d.predict(x, x, torch.tensor([3, 4]))  # integer timesteps: fine
    with pytest.raises(ValueError, match="parameterization 'flagged_x0' is defined at integer timesteps only"):
        d.predict(x, x, torch.tensor([3.5, 4.0]))
