import inspect
import math
import warnings

import pytest
import torch

from lightning_ddpm import DDIMSampler, DDPMSampler, GaussianDiffusion, make_schedule
from lightning_ddpm.core.denoiser import Denoiser, Prediction
from lightning_ddpm.core.schedules import available_schedules
from lightning_ddpm.samplers import (
    INTEGER_SPACINGS,
    SAMPLERS,
    SPACINGS,
    DPMSolverPP2MSampler,
    DPMSolverPP2MSDESampler,
    EulerSampler,
    HeunSampler,
    RePaintSampler,
    UniPCSampler,
    karras_sigmas,
    make_sampler,
    sigma_to_t,
    timestep_schedule,
)
from lightning_ddpm.samplers.base import MIN_ALPHA_BAR
from lightning_ddpm.samplers.karras import HEUN_SPAN_WARNING
from lightning_ddpm.samplers.repaint import jump_schedule
from tests.conftest import oracle, sampler_spec, small_schedule

T = 20
# Every registered sampler at all T steps and at two respaced counts, with its default options;
# options worth covering separately are listed by name (a new sampler gets the checks for free).
EXTRA_OPTIONS = {"ddim": [{"eta": 1.0}], "unipc": [{"order": 1}, {"order": 3}, {"corrector": False}]}
STOCHASTIC = {"ddpm": {}, "ddim": {"eta": 1.0}, "dpmpp_2m_sde": {}, "repaint": {}}
CASES = [(name, steps, {}) for name in SAMPLERS.names() for steps in (T, 5, 7)] + [
    (name, 7, options) for name, variants in EXTRA_OPTIONS.items() for options in variants
]


def _sampler(name: str, steps: int, options: dict, spacing: str = "leading"):
    return make_sampler(sampler_spec(name, num_steps=steps, spacing=spacing, **options))


# The solvers that divide by sigma start from MIN_ALPHA_BAR where the grid has alpha_bar = 0; DDPM and DDIM do not.
ODE_SOLVERS = (DPMSolverPP2MSampler, UniPCSampler, EulerSampler, HeunSampler)  # and dpmpp_2m_sde, a subclass


def _sample_point_mass(sampler, d, x0, x_T, seed=1, atol=1e-9):
    """Sample data that is the single point x0 with the exact denoiser, checking every step the callback reports.

    The last step of every sampler returns pred_x0 = x0 whatever came before, so the end point alone says
    nothing of the updates; the intermediate x's do. With eps(x, ab) = (x - sqrt(ab) x0) / sqrt(1 - ab):

    - deterministic samplers (DDIM eta = 0, Euler, Heun, DPM-Solver++ 2M, UniPC) follow the probability-flow
      ODE of a point mass, eps = eps_T constant, exactly (pred_x0 never changes, so every order is exact):
      x_i = sqrt(ab_i) x0 + sqrt(1 - ab_i) eps_T;
    - the stochastic ones draw one z_i ~ N(0, I) from the generator per step but the last; replaying those
      draws, each step is their update law: DDIM eta > 0 (Song et al. eq. 12), the DDPM posterior mean of the
      (respaced) process plus its variance's sigma z (Ho et al. eq. 6-7), and for dpmpp_2m_sde
      eps_{i+1} = e^{-h} eps_i + sqrt(1 - e^{-2h}) z_i (its update with D = x0, in eps).
    """
    grid = sampler.grid(d)
    n, ab = grid.num_steps, grid.alpha_bar.tolist()
    if isinstance(sampler, ODE_SOLVERS):
        ab = [a if a > 0 else MIN_ALPHA_BAR for a in ab]
    # the moves: a step down from grid point i (one per grid point), or RePaint's jumps back up its levels
    if isinstance(sampler, RePaintSampler):
        levels = jump_schedule(n, sampler.jump_length, sampler.jump_n_sample)
        moves = [("up" if b > a else "down", n - a, n - b) for a, b in zip(levels, levels[1:])]
    else:
        moves = [("down", i, i + 1) for i in range(n)]
    evaluations = sum(move[0] == "down" for move in moves)
    xs = []

    def callback(step, num_steps, x, pred_x0):
        assert (step, num_steps) == (len(xs) + 1, evaluations)
        xs.append(x.clone())

    out = sampler.sample(oracle(d, x0), d, x_T, generator=torch.Generator().manual_seed(seed), callback=callback)
    assert len(xs) == evaluations
    torch.testing.assert_close(xs[-1], out, rtol=0, atol=0)
    torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=atol)
    x0 = x0.expand_as(x_T)
    replay = torch.Generator().manual_seed(seed)
    eps = lambda x, a: (x - a**0.5 * x0) / (1 - a) ** 0.5  # noqa: E731
    eps_T, prev, seen = eps(x_T, ab[0]), x_T, iter(xs)
    for kind, i, j in moves:
        a_t, a_s = ab[i], ab[j]
        if kind == "up":  # the forward process from grid point i back to grid point j < i: x is not reported
            z = torch.randn(prev.shape, generator=replay, dtype=prev.dtype)
            prev = (a_s / a_t) ** 0.5 * prev + (1 - a_s / a_t) ** 0.5 * z
            continue
        x = next(seen)
        if j == n:
            expected = x0  # alpha_bar = 1: no noise, the data
        elif isinstance(sampler, DPMSolverPP2MSDESampler):
            decay = (a_t * (1 - a_s) / ((1 - a_t) * a_s)) ** 0.5  # e^{-h}, h = lambda_s - lambda_t
            z = torch.randn(x.shape, generator=replay, dtype=x.dtype)
            expected = a_s**0.5 * x0 + (1 - a_s) ** 0.5 * (decay * eps(prev, a_t) + (1 - decay**2) ** 0.5 * z)
        elif isinstance(sampler, ODE_SOLVERS) or (isinstance(sampler, DDIMSampler) and sampler.eta == 0):
            expected = a_s**0.5 * x0 + (1 - a_s) ** 0.5 * eps_T
        elif isinstance(sampler, DDIMSampler):
            sigma = sampler.eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5
            z = torch.randn(x.shape, generator=replay, dtype=x.dtype)
            expected = a_s**0.5 * x0 + (1 - a_s - sigma**2) ** 0.5 * eps(prev, a_t) + sigma * z
        elif isinstance(sampler, DDPMSampler):
            beta = 1 - a_t / a_s  # of the (respaced) step t -> s
            beta_tilde = beta * (1 - a_s) / (1 - a_t)
            # learned_range: the oracle's variance channels are 0, i.e. v = 1/2, half-way in log
            variance = {"fixed_small": beta_tilde, "fixed_large": beta, "learned_range": (beta * beta_tilde) ** 0.5}
            mean = a_s**0.5 * beta / (1 - a_t) * x0 + (1 - beta) ** 0.5 * (1 - a_s) / (1 - a_t) * prev
            z = torch.randn(x.shape, generator=replay, dtype=x.dtype)
            expected = mean + variance[d.variance] ** 0.5 * z
        else:
            pytest.fail(f"no exact point-mass trajectory known for {sampler!r}: add its update law here")
        torch.testing.assert_close(x, expected, rtol=0, atol=atol, msg=lambda m, i=i: f"step from {i} of {n}: {m}")
        prev = x


def test_timestep_schedules():
    assert timestep_schedule(1000, 50, "leading").tolist() == list(range(980, -1, -20))
    assert timestep_schedule(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    lin = timestep_schedule(1000, 5, "linspace").tolist()
    assert lin == [999, 749, 500, 250, 0]
    for spacing in INTEGER_SPACINGS:
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


@pytest.mark.parametrize("num_timesteps", [1, 2, 3, 7, 50, 100, 1000])
def test_every_spacing_gives_n_distinct_timesteps_for_every_n(num_timesteps):
    """For every 1 <= N <= T, every spacing (and diffusers' multistep variant, drop_zero) gives exactly N
    distinct decreasing int64 timesteps in [0, T). A float-step arange once gave N + 1, the last t = -1
    (69 pairs for T in 50, 100, 1000: T = 1000 with N = 61, 103, 121, 122, 201; T = 50 with N = 29, 31)."""
    for spacing in INTEGER_SPACINGS:
        for drop_zero in (False, True):
            for n in range(1, num_timesteps + 1):
                ts = timestep_schedule(num_timesteps, n, spacing, drop_zero=drop_zero)
                assert ts.dtype == torch.long and ts.shape == (n,), (spacing, drop_zero, n, ts.shape)
                assert int(ts.min()) >= 0 and int(ts.max()) < num_timesteps, (spacing, drop_zero, n)
                assert bool((ts[:-1] > ts[1:]).all()), (spacing, drop_zero, n)  # strictly decreasing: distinct
                if spacing == "trailing":
                    assert int(ts[0]) == num_timesteps - 1
                if drop_zero and spacing != "trailing" and n < num_timesteps:
                    assert int(ts[-1]) > 0, (spacing, n)  # no evaluation spent at t = 0


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_grid_has_n_steps_for_every_n(name):
    """Every registered sampler, every spacing it allows, every N in [1, T]: N grid points at distinct
    timesteps in [0, T) (or in [0, T - 1] for Karras sigmas) with their alpha_bar, then alpha_bar = 1.
    The respaced process DDPM steps through is built for each grid too."""
    d = GaussianDiffusion(small_schedule("cosine", 50))
    for spacing in SAMPLERS.get(name).spacings:
        for n in range(1, 51):
            if spacing == "karras" and n == 1:
                continue  # a Karras grid needs two sigmas: refused (test_karras_grid)
            sampler = _sampler(name, n, {}, spacing)
            grid = sampler.grid(d)
            assert grid.num_steps == n and grid.alpha_bar.shape == (n + 1,), (spacing, n)
            assert bool((grid.t[:-1] > grid.t[1:]).all()) and float(grid.t.min()) >= 0, (spacing, n)
            assert float(grid.t.max()) <= 49 and float(grid.alpha_bar[-1]) == 1.0, (spacing, n)
            if not grid.t.is_floating_point():
                torch.testing.assert_close(grid.alpha_bar[:-1], d.schedule.alphas_cumprod[grid.t])
            if isinstance(sampler, DDPMSampler) and n < 50:
                assert sampler._step_diffusion(d, grid).num_timesteps == n


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "euler", "heun", "ddim", "ddpm"])
def test_gaussian_data_at_61_trailing_steps(name):
    """The worst case of the overshooting trailing grid: T = 1000, N = 61. With the exact denoiser of
    N(0.4, 0.5^2) data the samples had std 0.002 (t = -1 read alpha_bar[T - 1]) or failed; now the data's."""
    m, s = 0.4, 0.5
    d = GaussianDiffusion(make_schedule("linear", num_timesteps=1000), parameterization="x0")

    def exact_x0(x_t, t):
        ab = d.alpha_bar_at(t).reshape(-1, 1).to(x_t.dtype)
        return m + ab.sqrt() * s**2 / (ab * s**2 + 1 - ab) * (x_t - ab.sqrt() * m)

    x_T = torch.randn(4000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = _sampler(name, 61, {}, "trailing").sample(exact_x0, d, x_T, generator=torch.Generator().manual_seed(1))
    # ancestral DDPM respaced to 61 steps under-disperses (std 0.45 here): its method, not the grid
    assert out.std().item() == pytest.approx(s, rel=0.15 if name == "ddpm" else 0.08)
    assert abs(out.mean().item() - m) < 0.05


@pytest.mark.parametrize(("name", "steps", "options"), CASES, ids=lambda v: str(v))
def test_every_sampler_recovers_a_point_mass(schedule_name, parameterization, variance, name, steps, options):
    """With the exact denoiser for single-point data, every sampler follows that point's exact trajectory
    (its update law, step by step: see _sample_point_mass) and lands on the point."""
    d = GaussianDiffusion(small_schedule(schedule_name, T), parameterization=parameterization, variance=variance)
    x0 = torch.tensor([[0.3, -0.8, 0.5]], dtype=torch.float64)
    x_T = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _sample_point_mass(_sampler(name, steps, options), d, x0, x_T)


@pytest.mark.parametrize("name", SAMPLERS.names())
@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_spacing_recovers_a_point_mass(name, spacing):
    """Every spacing a sampler allows follows the point's exact trajectory onto it; the others are refused with the allowed list."""
    if spacing not in SAMPLERS.get(name).spacings:
        allowed = ", ".join(SAMPLERS.get(name).spacings)
        kind = "is refused: .*" if spacing in SAMPLERS.get(name).refused_spacings else ""
        with pytest.raises(
            ValueError, match=f"(unknown spacing '{spacing}'|spacing '{spacing}' {kind}); choose one of: {allowed}$"
        ):
            _sampler(name, 5, {}, spacing)
        return
    for parameterization in ("eps", "x0", "v"):
        d = GaussianDiffusion(small_schedule("cosine", T), parameterization=parameterization, variance="learned_range")
        x0 = torch.tensor([[0.3, -0.8, 0.5]], dtype=torch.float64)
        x_T = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        for steps in (T, 5, 7):
            _sample_point_mass(_sampler(name, steps, {}, spacing), d, x0, x_T)


# The samplers that draw noise (a deterministic one ignores its generators, which would make the test vacuous).
STOCHASTIC_CASES = [
    pytest.param(name, steps, options, id="-".join([name, f"{steps}steps", *(f"{k}={v}" for k, v in options.items())]))
    for name, variants in {
        **{n: [o] for n, o in STOCHASTIC.items()},
        "ddim": [{"eta": 0.5}, STOCHASTIC["ddim"]],
    }.items()
    for options in variants
    for steps in (T, 5, 7)
]


@pytest.mark.parametrize(("name", "steps", "options"), STOCHASTIC_CASES)
def test_every_sampler_with_one_generator_per_sample_ignores_the_batching(name, steps, options):
    """Sample i depends on generator i alone: drawn in a batch of 4 or on its own, it is the same."""
    d = GaussianDiffusion(small_schedule("cosine", T), parameterization="v")
    model = lambda x, t: 0.3 * x + 0.01 * t[:, None].to(x.dtype)  # noqa: E731 (a deterministic stand-in network)
    x_T = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sampler = _sampler(name, steps, options)
    together = sampler.sample(model, d, x_T, generator=[torch.Generator().manual_seed(10 + i) for i in range(4)])
    alone = torch.cat(
        [sampler.sample(model, d, x_T[i : i + 1], generator=[torch.Generator().manual_seed(10 + i)]) for i in range(4)]
    )
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)


def test_ddim_eta1_over_all_steps_is_ddpm():
    d = GaussianDiffusion(small_schedule("cosine", T), variance="fixed_small")
    ddim = DDIMSampler(num_steps=T, eta=1.0)
    ab = d.schedule.alphas_cumprod.tolist()
    for step in range(1, T):
        assert ddim.sigma(ab[step], ab[step - 1]) ** 2 == pytest.approx(
            d.schedule.posterior_variance[step].item(), rel=1e-12
        )
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


# First-order samplers get 100 steps, the second- and third-order ones 25 (every registered one is here).
GAUSSIAN_STEPS = {"ddpm": 1000, "ddim": 100, "euler": 100, "repaint": 1000}
GAUSSIAN_OPTIONS = {"repaint": {"jump_length": 10, "jump_n_sample": 2}}  # 1990 evaluations


@pytest.mark.parametrize(
    "sampler",
    [
        make_sampler(sampler_spec(name, num_steps=GAUSSIAN_STEPS.get(name, 25), **GAUSSIAN_OPTIONS.get(name, {})))
        for name in SAMPLERS.names()
    ],
    ids=repr,
)
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


def test_karras_grid():
    """Karras et al. 2022, eq. 5 with rho = 7 between the schedule's sigma at t = 0 and at T - 1."""
    d = GaussianDiffusion(make_schedule("linear", num_timesteps=1000))
    grid = make_sampler({"name": "euler", "init_args": {"num_steps": 10, "spacing": "karras"}}).grid(d)
    ab = d.schedule.alphas_cumprod
    sigma = ((1 - ab) / ab).sqrt()
    expected = karras_sigmas(float(sigma[0]), float(sigma[-1]), 10)
    torch.testing.assert_close(((1 - grid.alpha_bar[:-1]) / grid.alpha_bar[:-1]).sqrt(), expected, rtol=1e-12, atol=0)
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)  # the formula written out once more
    by_hand = (sigma[-1] ** (1 / 7) + ramp * (sigma[0] ** (1 / 7) - sigma[-1] ** (1 / 7))) ** 7
    torch.testing.assert_close(expected, by_hand, rtol=1e-12, atol=0)
    assert grid.alpha_bar[-1] == 1 and grid.t[0] == pytest.approx(999) and grid.t[-1] == pytest.approx(0)
    assert (grid.t.diff() < 0).all()
    # the model is evaluated at the fractional timestep whose interpolated alpha_bar is the grid's
    torch.testing.assert_close(d.alpha_bar_at(grid.t), grid.alpha_bar[:-1], rtol=1e-10, atol=0)


def test_sigma_to_t_inverts_alpha_bar_at():
    d = GaussianDiffusion(make_schedule("cosine", num_timesteps=100))
    t = torch.tensor([0.0, 0.25, 3.5, 50.0, 98.75, 99.0], dtype=torch.float64)
    ab = d.alpha_bar_at(t)
    torch.testing.assert_close(sigma_to_t(((1 - ab) / ab).sqrt(), d.log_sigmas), t, rtol=0, atol=1e-9)
    integer = torch.tensor([0, 7, 99])
    torch.testing.assert_close(d.alpha_bar_at(integer.double()), d.alphas_cumprod[integer], rtol=1e-12, atol=0)
    # between two steps, log sigma is linear in t
    log_sigma = lambda ab: 0.5 * ((1 - ab) / ab).log()  # noqa: E731
    mid = log_sigma(d.alpha_bar_at(torch.tensor([3.5], dtype=torch.float64)))
    torch.testing.assert_close(mid, (log_sigma(d.alphas_cumprod[3:4]) + log_sigma(d.alphas_cumprod[4:5])) / 2)


def test_mu_refuses_fractional_timesteps():
    d = GaussianDiffusion(small_schedule("linear", T), parameterization="mu")
    with pytest.raises(ValueError, match="parameterization 'mu' .* integer timesteps only"):
        make_sampler({"name": "heun", "init_args": {"num_steps": 5, "spacing": "karras"}}).sample(
            oracle(d, torch.zeros(1, 2)), d, torch.randn(2, 2)
        )


def test_sampler_option_errors():
    with pytest.raises(ValueError, match="order must be 1, 2 or 3, got 4"):
        make_sampler({"name": "unipc", "init_args": {"order": 4}})
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        make_sampler({"name": "dpmpp_2m", "init_args": {"num_steps": 0}})
    with pytest.raises(ValueError, match=r"unknown spacing 'karras'; choose one of: leading, trailing, linspace$"):
        make_sampler({"name": "ddpm", "init_args": {"spacing": "karras"}})
    with pytest.raises(ValueError, match="unknown sampler 'dpm'; choose one of: ddpm, ddim, dpmpp_2m"):
        make_sampler("dpm")
    ztsnr = GaussianDiffusion(
        make_schedule("linear", num_timesteps=T, beta_end=0.3, rescale_to_zero_terminal_snr=True), parameterization="v"
    )
    with pytest.raises(ValueError, match="spacing='karras' needs a finite sigma_max"):
        make_sampler({"name": "euler", "init_args": {"num_steps": 5, "spacing": "karras"}}).grid(ztsnr)
    with pytest.raises(ValueError, match=r"num_steps must lie in \[1, T=20\], got 21"):
        make_sampler({"name": "unipc", "init_args": {"num_steps": 21}}).grid(ztsnr)
    # a bare name caps the default number of steps at T; an explicit one is kept (and checked)
    assert make_sampler("dpmpp_2m", num_timesteps=10).num_steps == 10
    assert make_sampler("ddim", num_timesteps=1000).num_steps == 50
    assert make_sampler({"name": "ddim", "init_args": {"num_steps": 30}}, num_timesteps=10).num_steps == 30


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_zero_terminal_snr_schedules_sample_finite_values(name):
    """Every sampler starts from pure noise (alpha_bar_T = 0) with a v model: finite, and exact for a point mass."""
    d = GaussianDiffusion(
        make_schedule("linear", num_timesteps=T, beta_end=0.3, rescale_to_zero_terminal_snr=True), parameterization="v"
    )
    x0 = torch.tensor([[0.3, -0.8]], dtype=torch.float64)
    x_T = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # alpha_bar_0 = 0: DDIM's eps_T is x_T itself, the solvers' starts from MIN_ALPHA_BAR (x_T at sigma 4096)
    _sample_point_mass(make_sampler(sampler_spec(name, num_steps=6, spacing="trailing")), d, x0, x_T)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_network_evaluations_and_callback(name):
    """One evaluation per step (Heun: 2N - 1), the callback after every step, at integer or grid timesteps."""
    d = GaussianDiffusion(small_schedule("cosine", T), parameterization="v")
    seen, calls = [], []

    def model(x, t):
        seen.append(t.clone())
        return 0.5 * x

    sampler = make_sampler(sampler_spec(name, num_steps=6, spacing="trailing"))
    sampler.sample(model, d, torch.randn(3, 2), callback=lambda i, n, x, x0: calls.append((i, n)))
    # Heun: 2N - 1; RePaint (jumps of 2 levels from levels 1 and 3, once each): N + 4, reported after each one
    evaluations = {"heun": 11, "repaint": 10}.get(name, 6)
    assert len(seen) == evaluations and (name != "repaint" or sampler.evaluations(6) == 10)
    reported = 10 if name == "repaint" else 6
    assert calls == [(i, reported) for i in range(1, reported + 1)]
    visited = sorted({int(t[0]) for t in seen}, reverse=True)
    assert visited == sampler.grid(d).t.tolist()


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_samplers_are_reproducible_and_random(name):
    d = GaussianDiffusion(small_schedule("linear", T), parameterization="v")
    net = lambda x, t: 0.3 * x  # noqa: E731
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    sampler = make_sampler(sampler_spec(name, num_steps=10, **STOCHASTIC[name]))
    run = lambda seed: sampler.sample(net, d, x_T, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.allclose(run(1), run(2))


@pytest.mark.parametrize("name", sorted(set(SAMPLERS.names()) - set(STOCHASTIC)))
def test_deterministic_samplers_use_no_noise(name):
    d = GaussianDiffusion(small_schedule("linear", T), parameterization="v")
    net = lambda x, t: 0.3 * x  # noqa: E731
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    sampler = make_sampler(sampler_spec(name, num_steps=10))
    torch.testing.assert_close(
        sampler.sample(net, d, x_T, generator=torch.Generator().manual_seed(1)),
        sampler.sample(net, d, x_T),
        rtol=0,
        atol=0,
    )


def test_denoiser_and_raw_network_give_the_same_samples():
    """A Denoiser (-> Prediction) and the raw backbone it wraps are interchangeable for every sampler."""
    d = GaussianDiffusion(small_schedule("cosine", T), parameterization="v", variance="learned_range")
    net = lambda x, t: torch.cat([torch.tanh(x), torch.sin(x)], dim=1) * 0.5  # noqa: E731
    x_T = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name in SAMPLERS.names():
        sampler = make_sampler(sampler_spec(name, num_steps=5))
        raw = sampler.sample(net, d, x_T, generator=torch.Generator().manual_seed(1))
        wrapped = sampler.sample(Denoiser(net, d), d, x_T, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(raw, wrapped, rtol=0, atol=0)
    assert isinstance(Denoiser(net, d)(x_T, torch.zeros(4, dtype=torch.long)), Prediction)


def test_sigma_max_caps_karras_and_lets_zero_terminal_snr_use_it():
    d = GaussianDiffusion(make_schedule("cosine", num_timesteps=100))
    grid = make_sampler(
        {"name": "dpmpp_2m", "init_args": {"num_steps": 6, "spacing": "karras", "sigma_max": 80.0}}
    ).grid(d)
    sigmas = ((1 - grid.alpha_bar[:-1]) / grid.alpha_bar[:-1]).sqrt()
    ab = d.schedule.alphas_cumprod
    torch.testing.assert_close(sigmas, karras_sigmas(float(((1 - ab[0]) / ab[0]).sqrt()), 80.0, 6), rtol=1e-10, atol=0)
    assert 0 < float(grid.t[0]) < 99  # a fractional timestep below the schedule's last
    with pytest.raises(
        ValueError, match="sigma_max caps Karras sigmas and needs spacing='karras', got spacing='trailing'"
    ):
        make_sampler({"name": "heun", "init_args": {"sigma_max": 80.0}})
    with pytest.raises(ValueError, match="sigma_max=0.001 must exceed the schedule's first sigma"):
        make_sampler({"name": "heun", "init_args": {"spacing": "karras", "sigma_max": 1e-3}}).grid(d)
    ztsnr = GaussianDiffusion(
        make_schedule("linear", num_timesteps=T, beta_end=0.3, rescale_to_zero_terminal_snr=True), parameterization="v"
    )
    x0 = torch.tensor([[0.3, -0.8]], dtype=torch.float64)
    _sample_point_mass(
        make_sampler({"name": "unipc", "init_args": {"num_steps": 5, "spacing": "karras", "sigma_max": 50.0}}),
        ztsnr,
        x0,
        torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
    )


def test_heun_warns_when_its_first_step_spans_decades_of_sigma():
    """On the cosine schedule the trailing grid starts at sigma ~2e4 and its next sigma is ~6 at 10 steps:
    the trapezoid correction multiplies the network's error by about their ratio."""
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    denoise = lambda x, t: torch.zeros_like(x)  # noqa: E731
    cosine = GaussianDiffusion(make_schedule("cosine", 1000), parameterization="v")
    with pytest.warns(UserWarning, match=r"heun: the first step goes from sigma 2\.03e\+04 to 6\.36; .*ratio \(3188\)"):
        make_sampler({"name": "heun", "init_args": {"num_steps": 10}}).sample(denoise, cosine, x_T)
    linear = GaussianDiffusion(make_schedule("linear", 1000), parameterization="v")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where the grid is fine: capped, or the linear schedule
        make_sampler({"name": "heun", "init_args": {"num_steps": 10, "spacing": "karras", "sigma_max": 80.0}}).sample(
            denoise, cosine, x_T
        )
        make_sampler({"name": "heun", "init_args": {"num_steps": 10}}).sample(denoise, linear, x_T)
        make_sampler({"name": "euler", "init_args": {"num_steps": 10}}).sample(denoise, cosine, x_T)  # no corrector


@pytest.mark.parametrize("name", [n for n in available_schedules() if n != "custom"])  # custom needs its betas
def test_heuns_warning_gives_the_sigmas_of_the_schedule_it_runs_on(name):
    # every registered schedule, every step count 2..60 on the trailing grid (t = round(T - i T / N) - 1): the
    # warning comes exactly when the first step spans more than HEUN_SPAN_WARNING in sigma, and quotes that grid's
    # own first two sigmas from alpha_bar, naming no schedule (it once said "the cosine schedule's sigma_max is
    # ~2e4" on every one)
    schedule = make_schedule(name, 1000)
    ab = schedule.alphas_cumprod
    diffusion = GaussianDiffusion(schedule, parameterization="v")
    denoise = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    for num_steps in range(2, 61):
        t0, t1 = 999, round(1000 - 1000 / num_steps) - 1
        sigma = [math.sqrt((1.0 - float(ab[t])) / float(ab[t])) for t in (t0, t1)]
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            make_sampler({"name": "heun", "init_args": {"num_steps": num_steps}}).sample(denoise, diffusion, x_T)
        messages = [str(w.message) for w in record if str(w.message).startswith("heun:")]
        if sigma[0] <= HEUN_SPAN_WARNING * sigma[1]:
            assert messages == [], (num_steps, messages)
            continue
        (message,) = messages
        assert f"from sigma {sigma[0]:.3g} to {sigma[1]:.3g}" in message, (num_steps, message)
        assert f"({sigma[0] / sigma[1]:.0f})" in message, (num_steps, message)
        assert not any(other in message for other in available_schedules()), message


def _spec_cases():
    for name, cls in SAMPLERS.items():
        for spacing in cls.spacings:
            options = sampler_spec(name, num_steps=7, spacing=spacing, clip_denoised=True)["init_args"]
            if spacing == "karras" and "sigma_max" in inspect.signature(cls).parameters:
                options["sigma_max"] = 50.0
            yield pytest.param(name, options, id=f"{name}-{spacing}")


@pytest.mark.parametrize("name,options", list(_spec_cases()))
def test_every_sampler_round_trips_through_its_config_spec(name, options):
    """A sampler rebuilt from its ``{name, init_args}`` (what a config or a saved config holds) is the same sampler:
    the same spec and the same grid, for every registered sampler and every spacing it allows."""
    sampler = make_sampler({"name": name, "init_args": options})
    spec = sampler.spec()
    assert spec["name"] == name and {k: spec["init_args"][k] for k in options} == options
    again = make_sampler(spec)
    assert type(again) is type(sampler) and again.spec() == spec
    d = GaussianDiffusion(make_schedule("cosine", num_timesteps=40))
    first, second = sampler.grid(d), again.grid(d)
    assert torch.equal(first.t, second.t) and torch.equal(first.alpha_bar, second.alpha_bar)
