"""Inpainting (``Sampler.inpaint``, ``RePaintSampler``, ``DiffusionModule.inpaint``): the jump schedule against the
paper's algorithm, the edges (a mask of ones returns the input, a mask of zeros is plain sampling), the kept region
noised to each step's level, the Gaussian conditional in closed form, and diffusers' RePaintScheduler."""

import pytest
import torch

from lightning_ddpm import DiffusionModule, GaussianDiffusion, make_schedule
from lightning_ddpm.samplers import SAMPLERS, RePaintSampler, make_sampler
from lightning_ddpm.samplers.repaint import jump_schedule
from tests.conftest import sampler_spec, small_schedule


def _paper_schedule(t_T, jump_length, jump_n_sample):
    """Algorithm 1's schedule as the paper's code states it, written out here independently: timestep indices
    from t_T - 1 (x_T) to -1 (the data); at index j = 0, jump_length, ... below t_T - jump_length the path goes back
    up jump_length indices, jump_n_sample - 1 times."""
    remaining = {}
    for j in range(0, t_T - jump_length, jump_length):
        remaining[j] = jump_n_sample - 1
    t, ts = t_T, []
    while t >= 1:
        t -= 1
        ts.append(t)
        if remaining.get(t, 0) > 0:
            remaining[t] -= 1
            for _ in range(jump_length):
                t += 1
                ts.append(t)
    return [*ts, -1]


def _moves(levels):
    downs = sum(b < a for a, b in zip(levels, levels[1:]))
    return downs, len(levels) - 1 - downs


def test_the_jump_schedule_is_the_papers():
    """250 / 10 / 10 (the paper's setting): 24 jump points, 9 jumps of 10 levels each: 2160 levels up, 250 + 2160 =
    2410 network evaluations; and a case small enough to write out by hand."""
    levels = jump_schedule(250, 10, 10)
    assert levels == [t + 1 for t in _paper_schedule(250, 10, 10)]
    assert _moves(levels) == (2410, 2160) and RePaintSampler().evaluations(250) == 2410
    # N = 5, jumps of 2 from levels 1 and 3, once each: 5 4 3 | 4 5 | 4 3 2 1 | 2 3 | 2 1 0
    assert jump_schedule(5, 2, 2) == [5, 4, 3, 4, 5, 4, 3, 2, 1, 2, 3, 2, 1, 0]
    assert _moves(jump_schedule(5, 2, 2)) == (9, 4)
    assert jump_schedule(7, 3, 1) == list(range(7, -1, -1))  # jump_n_sample = 1: no jumps, plain DDPM


@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 10, 11, 49, 50, 61, 250])
def test_every_jump_schedule_is_a_valid_path(num_steps):
    """Every step count, jump length and count: the paper's schedule, moves of one level, inside [0, N], from N to the
    data, which is reached once at the end; evaluations = N + levels gone up."""
    for jump_length in range(1, min(num_steps, 12)):
        for jump_n_sample in (1, 2, 3, 10):
            levels = jump_schedule(num_steps, jump_length, jump_n_sample)
            assert levels == [t + 1 for t in _paper_schedule(num_steps, jump_length, jump_n_sample)]
            assert levels[0] == num_steps and levels[-1] == 0 and levels.count(0) == 1
            assert all(abs(a - b) == 1 for a, b in zip(levels, levels[1:]))
            assert min(levels) >= 0 and max(levels) <= num_steps
            downs, ups = _moves(levels)
            assert downs == num_steps + ups
            jumps = len(range(0, num_steps - jump_length, jump_length)) * (jump_n_sample - 1)
            assert ups == jumps * jump_length


def _model(x, t):
    """A deterministic stand-in eps network that mixes the coordinates (as a U-Net mixes pixels)."""
    return 0.3 * torch.tanh(x.flip(-1)) + 0.01 * t.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)


def _spec(name, n, spacing):
    return make_sampler(sampler_spec(name, num_steps=n, spacing=spacing))


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_the_edges_for_every_sampler_spacing_and_step_count(name):
    """A mask of ones returns the input bit for bit; a mask of zeros is ``sample`` from the same start and
    generator bit for bit (the kept region draws no noise of its own where nothing is kept: replacement uses the
    starting noise, RePaint the step's own draw); a half mask keeps its half exactly and stays finite."""
    d = GaussianDiffusion(small_schedule("cosine", 30), parameterization="eps")
    x0 = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    half = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    for spacing in SAMPLERS.get(name).spacings:
        for n in (2, 3, 7, 30):
            sampler = _spec(name, n, spacing)
            x_T = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            gen = lambda: [torch.Generator().manual_seed(10 + i) for i in range(3)]  # noqa: E731
            ones = sampler.inpaint(_model, d, x0, torch.ones(4, dtype=torch.float64), gen(), x_T=x_T)
            assert torch.equal(ones, x0), (spacing, n)
            zeros = sampler.inpaint(_model, d, x0, torch.zeros(1, 4, dtype=torch.float64), gen(), x_T=x_T)
            assert torch.equal(zeros, sampler.sample(_model, d, x_T, generator=gen())), (spacing, n)
            out = sampler.inpaint(_model, d, x0, half, gen(), x_T=x_T)
            assert torch.equal(out[:, :2], x0[:, :2]) and torch.isfinite(out).all(), (spacing, n)
            assert not torch.equal(out[:, 2:], zeros[:, 2:])  # the kept half reached the generated one


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_an_inpainted_example_depends_on_its_own_generator_only(name):
    d = GaussianDiffusion(small_schedule("cosine", 30), parameterization="v")
    sampler = _spec(name, 9, SAMPLERS.get(name).spacings[0])
    x0 = torch.rand(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    together = sampler.inpaint(_model, d, x0, mask, generator=gens(range(4)))
    alone = torch.cat([sampler.inpaint(_model, d, x0[i : i + 1], mask, generator=gens([i])) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_repaint_without_jumps_is_ddpm_and_its_evaluations_follow_the_schedule():
    d = GaussianDiffusion(small_schedule("linear", 40), parameterization="eps")
    x_T = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for spacing in ("leading", "trailing", "linspace"):
        for n in (1, 4, 13, 40):
            plain = make_sampler({"name": "ddpm", "init_args": {"num_steps": n, "spacing": spacing}})
            repaint = RePaintSampler(num_steps=n, jump_length=1, jump_n_sample=1, spacing=spacing)
            g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
            assert torch.equal(repaint.sample(_model, d, x_T, g()), plain.sample(_model, d, x_T, g()))
    seen, reported = [], []

    def model(x, t):
        seen.append(int(t[0]))
        return _model(x, t)

    sampler = RePaintSampler(num_steps=8, jump_length=3, jump_n_sample=3)
    grid = sampler.grid(d)
    sampler.inpaint(model, d, x_T, torch.tensor([1.0, 0.0]), callback=lambda i, k, x, p: reported.append((i, k)))
    levels = jump_schedule(8, 3, 3)
    assert seen == [int(grid.t[8 - a]) for a, b in zip(levels, levels[1:]) if b < a]
    assert reported == [(i, len(seen)) for i in range(1, len(seen) + 1)] and len(seen) == sampler.evaluations(8)


@pytest.mark.parametrize("name", ["repaint", "ddpm", "ddim"])
def test_the_kept_region_is_noised_to_the_level_of_each_step(name):
    """After every step down to a grid point with alpha_bar a, the kept coordinate is distributed as
    q(x_a | x0) = N(sqrt(a) x0, 1 - a) (the typo of the paper's Algorithm 1, (1 - a) for its scale, and the
    level before the step instead of after it, both fail this on a 10-step grid)."""
    d = GaussianDiffusion(make_schedule("linear", num_timesteps=1000), parameterization="eps")
    sampler = make_sampler(
        sampler_spec(name, num_steps=10, jump_length=3, jump_n_sample=2)
        if name == "repaint"
        else {"name": name, "init_args": {"num_steps": 10}}
    )
    grid = sampler.grid(d)
    b, value = 20_000, 0.7
    x0 = torch.full((b, 2), value, dtype=torch.float64)
    kept, alpha_bar = [], []
    if isinstance(sampler, RePaintSampler):
        levels = jump_schedule(10, 3, 2)
        alpha_bar = [float(grid.alpha_bar[10 - b_]) for a_, b_ in zip(levels, levels[1:]) if b_ < a_]
    else:
        alpha_bar = grid.alpha_bar[1:].tolist()

    def model(x, t):
        return torch.zeros_like(x)

    if isinstance(sampler, RePaintSampler):
        cb = lambda i, k, x, p: kept.append(x[:, 0].clone())  # noqa: E731
        sampler.inpaint(model, d, x0, torch.tensor([1.0, 0.0]), generator=torch.Generator().manual_seed(0), callback=cb)
    else:  # replacement: the kept region the network sees before evaluation i >= 1 is at grid point i
        seen = []
        sampler.inpaint(
            lambda x, t: seen.append(x[:, 0].clone()) or model(x, t),
            d,
            x0,
            torch.tensor([1.0, 0.0]),
            generator=torch.Generator().manual_seed(0),
        )
        kept, alpha_bar = seen[1:], grid.alpha_bar[1:-1].tolist()
    assert len(kept) == len(alpha_bar)
    for x, a in zip(kept, alpha_bar):
        assert x.mean().item() == pytest.approx(a**0.5 * value, abs=4 * ((1 - a) / b) ** 0.5 + 1e-12)
        assert x.std().item() == pytest.approx((1 - a) ** 0.5, rel=0.03, abs=1e-12)


class _GaussianData:
    """3-D Gaussian data N(mu, S): the exact denoiser E[x0 | x_t] and the conditional of x0[1:] given x0[0]."""

    mu = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    A = torch.tensor([[0.5, 0, 0], [0.36, 0.17, 0], [0.3, -0.2, 0.25]], dtype=torch.float64)
    S = A @ A.T

    def __init__(self, diffusion):
        self.d = diffusion

    def __call__(self, x_t, t):  # x0 parameterization; every t of a call is the same grid point
        a = float(self.d.alpha_bar_at(t[:1]))
        gain = a**0.5 * self.S @ torch.linalg.inv(a * self.S + (1 - a) * torch.eye(3, dtype=torch.float64))
        return self.mu + (x_t - a**0.5 * self.mu) @ gain.T

    def conditional(self, kept):
        s_uk, s_kk = self.S[1:, :1], self.S[:1, :1]
        mean = self.mu[1:] + (s_uk / s_kk).squeeze(1) * (kept - self.mu[0])
        return mean, self.S[1:, 1:] - s_uk @ s_uk.T / s_kk


def test_repaint_approaches_the_gaussian_conditional_and_replacement_does_not():
    """Closed form. Keep x0[0] = 0.8 of 3-D correlated Gaussian data (the exact denoiser as the network, T = N =
    1000): the conditional of the other two coordinates is N(m, C). RePaint's error in the mean falls as
    jump_n_sample grows, 1 -> 3 -> 10, to within Monte Carlo error at 10 (covariance too); inpainting by
    replacement (DDPM ancestral, DDIM) stays biased by more than 15 standard errors. Measured here (3000 samples,
    standard error 0.006): mean error 0.091 / 0.029 / 0.011 and covariance error 0.013 / 0.003 / 0.004 for RePaint,
    0.090 / 0.021 (ddpm) and 0.149 / 0.035 (ddim) for replacement."""
    d = GaussianDiffusion(make_schedule("linear", num_timesteps=1000), parameterization="x0")
    data = _GaussianData(d)
    m, c = data.conditional(0.8)
    b = 3000
    x0 = torch.tensor([[0.8, 0.0, 0.0]], dtype=torch.float64).expand(b, 3).contiguous()
    mask = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    se = (c.diag().max() / b) ** 0.5

    def errors(spec):
        out = make_sampler(spec).inpaint(data, d, x0, mask, generator=torch.Generator().manual_seed(1))
        assert torch.equal(out[:, 0], x0[:, 0])
        out = out[:, 1:]
        return float((out.mean(0) - m).abs().max()), float((torch.cov(out.T) - c).abs().max())

    repaint = [errors(sampler_spec("repaint", num_steps=1000, jump_length=10, jump_n_sample=r)) for r in (1, 3, 10)]
    assert repaint[0][0] > repaint[1][0] > repaint[2][0]
    assert repaint[2][0] < 3 * se and repaint[2][1] < 0.01  # entries of C up to 0.10, standard error 0.003
    assert repaint[0][0] > 10 * se  # no resampling: replacement with the paper's fresh noise, biased
    for name in ("ddpm", "ddim"):
        assert errors({"name": name, "init_args": {"num_steps": 1000}})[0] > 15 * se, name


def test_the_module_inpaints_with_labels_guidance_and_repaint_by_default():
    unet = {"name": "unet", "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}}
    module = DiffusionModule(backbone=unet, data_shape=[1, 8, 8], num_classes=3, num_timesteps=20, clip_denoised=True)
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.ones(8, 8)
    mask[4:] = 0
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    calls = []
    out = module.inpaint(
        images, mask, labels=[0, 2], guidance_scale=2.0, generator=gens(), callback=lambda i, k, x, p: calls.append(k)
    )
    assert out.shape == images.shape and torch.equal(out[..., :4, :], images[..., :4, :])
    # the default: repaint with its 250 steps capped at T = 20 and jumps of 10 levels, ten times each
    assert calls[0] == RePaintSampler(num_steps=20).evaluations(20) == 20 + 9 * 10
    again = module.inpaint(images, mask, labels=[0, 2], guidance_scale=2.0, generator=gens())
    assert torch.equal(out, again) and module.training
    zeros = module.inpaint(images, torch.zeros(1, 1, 8, 8), sampler="ddim", generator=gens())
    assert torch.equal(zeros, module.sample(2, sampler="ddim", generator=gens()))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda m, x: m.inpaint(x, torch.ones(3, 8)),
            r"mask of shape \(3, 8\) does not broadcast to the examples' shape \(2, 1, 8, 8\)",
        ),
        (
            lambda m, x: m.inpaint(x, torch.full((8, 8), 2.0)),
            r"mask values must lie in \[0, 1\] \(1 keeps, 0 generates\), got range \[2, 2\]",
        ),
        (
            lambda m, x: m.inpaint(x, torch.ones(8, 8), sampler={"name": "repaint", "init_args": {"num_steps": 5}}),
            r"jump_length=10 does not fit a grid of 5 steps",
        ),
        (
            lambda m, x: m.inpaint(x, torch.ones(8, 8), sampler={"name": "repaint", "init_args": {"jump_n_sample": 0}}),
            r"jump_n_sample must be an integer >= 1, got 0",
        ),
        (lambda m, x: m.inpaint(x * 255, torch.ones(8, 8)), r"images must hold values in \[-1, 1\]"),
    ],
)
def test_the_refusals(call, match):
    unet = {"name": "unet", "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}}
    module = DiffusionModule(backbone=unet, data_shape=[1, 8, 8], num_timesteps=20)
    with pytest.raises(ValueError, match=match):
        call(module, torch.rand(2, 1, 8, 8) * 2 - 1)
