import math

import pytest
import torch

from lightning_ddpm import DDIMSampler, DDPMSampler, GaussianDiffusion, make_schedule
from lightning_ddpm.samplers import SAMPLERS, SPACINGS, make_sampler, timestep_schedule
from tests.conftest import oracle, small_schedule

T = 20
# Every registered sampler at all T steps and at two respaced counts, with its default options;
# options worth covering separately are listed by name (a new sampler gets the checks for free).
EXTRA_OPTIONS = {"ddim": [{"eta": 1.0}]}
CASES = [(name, steps, {}) for name in SAMPLERS.names() for steps in (T, 5, 7)] + [
    (name, 7, options) for name, variants in EXTRA_OPTIONS.items() for options in variants
]


def _sampler(name: str, steps: int, options: dict, spacing: str = "leading"):
    return make_sampler({"name": name, "init_args": {"num_steps": steps, "spacing": spacing, **options}})


def test_timestep_schedules():
    assert timestep_schedule(1000, 50, "leading").tolist() == list(range(980, -1, -20))
    assert timestep_schedule(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    lin = timestep_schedule(1000, 5, "linspace").tolist()
    assert lin == [999, 749, 500, 250, 0]
    for spacing in SPACINGS:
        ts = timestep_schedule(37, 37, spacing)
        assert ts.tolist() == list(range(36, -1, -1))
    with pytest.raises(ValueError, match=r"num_steps must lie in \[1, T=20\], got 21"):
        timestep_schedule(20, 21)
    with pytest.raises(ValueError, match=r"unknown spacing 'uniform'; choose one of: leading, trailing, linspace"):
        DDIMSampler(spacing="uniform")
    with pytest.raises(ValueError, match="eta must be >= 0, got -0.5"):
        DDIMSampler(eta=-0.5)
    d = GaussianDiffusion(small_schedule("linear", T))
    with pytest.raises(ValueError, match=r"num_steps must lie in \[1, T=20\], got 50"):
        DDIMSampler(num_steps=50).sample(lambda x, t: x, d, torch.zeros(1, 2))


@pytest.mark.parametrize(("name", "steps", "options"), CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_sampler_recovers_a_point_mass(schedule_name, parameterization, variance, name, steps, options, spacing):
    """With the exact denoiser for single-point data, every sampler must land on that point."""
    d = GaussianDiffusion(small_schedule(schedule_name, T), parameterization=parameterization, variance=variance)
    x0 = torch.tensor([[0.3, -0.8, 0.5]], dtype=torch.float64)
    x_T = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sampler = _sampler(name, steps, options, spacing)
    out = sampler.sample(oracle(d, x0), d, x_T, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=1e-8)


@pytest.mark.parametrize(("name", "steps", "options"), CASES, ids=lambda v: str(v))
def test_every_sampler_with_one_generator_per_sample_ignores_the_batching(name, steps, options):
    """Sample i depends on generator i alone: drawn in a batch of 4 or on its own, it is the same."""
    d = GaussianDiffusion(small_schedule("cosine", T), parameterization="v")
    model = lambda x, t: 0.3 * x + 0.01 * t[:, None].to(x.dtype)  # noqa: E731 (a deterministic stand-in network)
    x_T = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sampler = _sampler(name, steps, options)
    together = sampler.sample(model, d, x_T, generator=[torch.Generator().manual_seed(10 + i) for i in range(4)])
    alone = torch.cat([sampler.sample(model, d, x_T[i:i + 1], generator=[torch.Generator().manual_seed(10 + i)])
                       for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)


def test_ddim_eta1_over_all_steps_is_ddpm():
    d = GaussianDiffusion(small_schedule("cosine", T), variance="fixed_small")
    ddim = DDIMSampler(num_steps=T, eta=1.0)
    ab = d.schedule.alphas_cumprod.tolist()
    for step in range(1, T):
        assert ddim.sigma(ab[step], ab[step - 1]) ** 2 == pytest.approx(d.schedule.posterior_variance[step].item(),
                                                                         rel=1e-12)
    # and whole trajectories agree given the same noise stream
    net = lambda x, t: torch.sin(3 * x) * 0.5 + 0.01 * t[:, None]
    x_T = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = ddim.sample(net, d, x_T, generator=torch.Generator().manual_seed(3))
    b = DDPMSampler().sample(net, d, x_T, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_determinism_and_randomness():
    d = GaussianDiffusion(small_schedule("linear", T))
    net = lambda x, t: 0.3 * x
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    run = lambda sampler, seed: sampler.sample(net, d, x_T, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(run(DDPMSampler(), 1), run(DDPMSampler(), 1), rtol=0, atol=0)
    assert not torch.allclose(run(DDPMSampler(), 1), run(DDPMSampler(), 2))
    ddim = DDIMSampler(num_steps=10, eta=0.0)
    torch.testing.assert_close(run(ddim, 1), run(ddim, 2), rtol=0, atol=0)  # eta = 0 uses no noise
    torch.testing.assert_close(ddim.sample(net, d, x_T), run(ddim, 5), rtol=0, atol=0)


@pytest.mark.parametrize("sampler", [DDPMSampler(), DDIMSampler(num_steps=100, eta=0.0)], ids=repr)
def test_gaussian_data_is_reproduced(sampler):
    """1-D data N(m, s^2) has the exact denoiser E[x0 | x_t] in closed form; samples must match m and s."""
    m, s = 0.4, 0.5
    d = GaussianDiffusion(make_schedule("linear", num_timesteps=1000), parameterization="x0")

    def exact_x0(x_t, t):
        ab = d.schedule.alphas_cumprod[t].reshape(-1, 1).to(x_t.dtype)
        return m + ab.sqrt() * s**2 / (ab * s**2 + 1 - ab) * (x_t - ab.sqrt() * m)

    n = 20_000
    x_T = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sampler.sample(exact_x0, d, x_T, generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - m) < 4 * s / math.sqrt(n)
    assert out.std().item() == pytest.approx(s, rel=0.03)


def test_clipping_and_callback():
    d = GaussianDiffusion(small_schedule("linear", T), parameterization="x0", clip_denoised=True)
    far = lambda x, t: torch.full_like(x, 5.0)
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    calls = []
    out = DDIMSampler(num_steps=4).sample(far, d, x_T, callback=lambda i, n, x, x0: calls.append((i, n, x0.max())))
    assert out.max().item() == pytest.approx(1.0)
    assert [c[:2] for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)] and all(c[2] <= 1 for c in calls)
    unclipped = DDIMSampler(num_steps=4, clip_denoised=False).sample(far, d, x_T)
    assert unclipped.max().item() == pytest.approx(5.0)
