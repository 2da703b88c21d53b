"""SDEdit (``Sampler.edit``, ``DiffusionModule.edit``): the grid's tail for every sampler, spacing, step count
and strength; strength 1 is plain sampling from the same noised start; a deterministic sampler maps data to data
(closed form: Gaussian data with its exact denoiser); per-sample generators; the refusals."""

import pytest
import torch

from lightning_ddpm import DiffusionModule, GaussianDiffusion, make_schedule
from lightning_ddpm.samplers import SAMPLERS, RePaintSampler, make_sampler
from lightning_ddpm.samplers.repaint import jump_schedule
from tests.conftest import sampler_spec, small_schedule

STRENGTHS = (0.02, 0.1, 0.29, 0.5, 0.77, 0.999, 1.0)
STOCHASTIC = {"ddpm", "dpmpp_2m_sde", "repaint"}


def _sampler(name, n, spacing="leading"):
    return make_sampler(sampler_spec(name, num_steps=n, spacing=spacing))


def _gaussian(m=0.4, s=0.5, T=1000):
    """N(m, s^2) data and its exact x0 denoiser, E[x0 | x_t], at integer or fractional t."""
    d = GaussianDiffusion(make_schedule("linear", num_timesteps=T), parameterization="x0")

    def exact_x0(x_t, t):
        ab = d.alpha_bar_at(t).reshape(-1, 1).to(x_t.dtype)
        return m + ab.sqrt() * s**2 / (ab * s**2 + 1 - ab) * (x_t - ab.sqrt() * m)

    return d, exact_x0


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_an_edit_runs_the_tail_of_the_grid_for_every_spacing_steps_and_strength(name):
    """floor(N strength) steps, from the grid's (N - k)-th timestep on: the model sees exactly the tail of a valid
    grid (decreasing, in range), the first evaluation at alpha_bar of the point the input was noised to."""
    d = GaussianDiffusion(small_schedule("cosine", 50), parameterization="v")
    for spacing in SAMPLERS.get(name).spacings:
        for n in range(1, 51):
            if spacing == "karras" and n == 1:
                continue  # a Karras grid needs two sigmas
            sampler = _sampler(name, n, spacing)
            grid = sampler.grid(d)
            for strength in STRENGTHS:
                k = sampler.edit_steps(d, strength)
                assert k == min(n, int(round(n * strength, 6) // 1)), (spacing, n, strength)
                seen, steps = [], []

                def model(x_t, t, seen=seen):
                    seen.append(float(t[0]))
                    return torch.zeros_like(x_t)

                x0 = torch.rand(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
                out = sampler.edit(
                    model,
                    d,
                    x0,
                    strength,
                    generator=torch.Generator().manual_seed(1),
                    callback=lambda i, total, x, p, steps=steps: steps.append((i, total)),
                )
                assert torch.isfinite(out).all()
                if k == 0:
                    assert torch.equal(out, x0) and not seen
                    continue
                tail = grid.t[n - k :].float().tolist()  # the model sees fractional t in float32
                if isinstance(sampler, RePaintSampler):  # the tail's levels, down and back up its jumps
                    levels = jump_schedule(k, sampler.jump_length, sampler.jump_n_sample)
                    assert seen == [tail[k - a] for a, b in zip(levels, levels[1:]) if b < a], (spacing, n, strength)
                else:
                    assert all(a >= b for a, b in zip(seen, seen[1:])), (spacing, n, strength)
                reported = len(seen) if isinstance(sampler, RePaintSampler) else k  # RePaint: after every evaluation
                assert steps == [(i, reported) for i in range(1, reported + 1)], (spacing, n, strength)
                assert len(seen) >= k and seen[0] == tail[0] and set(seen) <= set(tail), (spacing, n, strength)
                assert min(seen) >= 0 and max(seen) <= 49


def test_edit_steps_count_every_boundary_strength():
    """Strength j / N runs exactly j steps for every N in 1..1000 and every j (floating point: 0.29 * 100 is
    28.999...), and just below j / N runs j - 1."""
    from lightning_ddpm.samplers.base import edit_count

    for n in range(1, 1001):
        for j in range(1, n + 1):
            assert edit_count(n, j / n) == j, (n, j)
            assert edit_count(n, j / n - 1e-6) == j - 1, (n, j)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_strength_one_is_plain_sampling_from_the_same_noised_start(name):
    """With per-sample generators: the edit's noise is each generator's first draw, and the sampler's own draws
    (stochastic samplers) follow from the same generators, exactly as plain sampling from that start."""
    d = GaussianDiffusion(small_schedule("cosine", 50), parameterization="eps")
    net = torch.nn.Linear(3, 2).double()
    model = lambda x, t: net(torch.cat([x, t[:, None].double() / 50], 1))
    sampler = _sampler(name, 10)
    x0 = torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    edited = sampler.edit(model, d, x0, 1.0, generator=[torch.Generator().manual_seed(10 + i) for i in range(4)])
    gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    noise = torch.stack([torch.randn(2, generator=g, dtype=torch.float64) for g in gens])
    ab = float(sampler.grid(d).alpha_bar[0])
    start = ab**0.5 * x0 + (1 - ab) ** 0.5 * noise
    torch.testing.assert_close(edited, sampler.sample(model, d, start, generator=gens), rtol=0, atol=0)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_a_sample_depends_on_its_own_generator_only(name):
    d = GaussianDiffusion(small_schedule("cosine", 50), parameterization="v")
    model = lambda x, t: 0.1 * x
    sampler = _sampler(name, 8)
    x0 = torch.rand(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]
    together = sampler.edit(model, d, x0, 0.6, generator=gens(range(5)))
    alone = torch.cat([sampler.edit(model, d, x0[i : i + 1], 0.6, generator=gens([i])) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "unipc", "euler", "heun"])
@pytest.mark.parametrize("strength", [0.25, 0.6, 1.0])
def test_a_deterministic_sampler_maps_data_to_data(name, strength):
    """Closed form: for N(0.4, 0.5^2) data with its exact denoiser, edits of data points are distributed as the
    data at every strength (the noised input is distributed as the forward marginal at that grid point)."""
    m, s = 0.4, 0.5
    d, exact_x0 = _gaussian(m, s)
    data = m + s * torch.randn(4000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = _sampler(name, 200).edit(exact_x0, d, data, strength, generator=torch.Generator().manual_seed(1))
    assert out.mean().item() == pytest.approx(m, abs=0.03)
    assert out.std().item() == pytest.approx(s, rel=0.06)


UNET = {"name": "unet", "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}}


def test_the_module_edits_with_labels_guidance_and_its_default_sampler():
    module = DiffusionModule(backbone=UNET, data_shape=[1, 8, 8], num_classes=3, num_timesteps=20, clip_denoised=True)
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]
    out = module.edit(images, 0.5, labels=[0, 1, 2, 0], guidance_scale=2.0, generator=gens())
    assert out.shape == images.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    again = module.edit(images, 0.5, labels=[0, 1, 2, 0], guidance_scale=2.0, generator=gens())
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    assert module.training  # back in the mode it was in
    small = module.edit(images, 0.01, sampler={"name": "ddim", "init_args": {"num_steps": 20}})
    assert torch.equal(small, images)  # floor(20 * 0.01) = 0 steps: the input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strength": 0.0}, r"strength must lie in \(0, 1\]"),
        ({"strength": 1.5}, r"strength must lie in \(0, 1\]"),
        ({"images": torch.zeros(2, 1, 4, 4)}, r"images must have shape \(B, \*data_shape\) = \(B, 1, 8, 8\)"),
        ({"images": torch.full((2, 1, 8, 8), 255.0)}, r"images must hold values in \[-1, 1\]"),
    ],
)
def test_bad_edits_are_refused_with_the_field(kwargs, match):
    module = DiffusionModule(backbone=UNET, data_shape=[1, 8, 8], num_timesteps=20)
    args = {"images": torch.zeros(2, 1, 8, 8), "strength": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        module.edit(**args)


def test_the_editing_page_examples_run():
    """docs/editing.md's Python blocks (SDEdit, inpainting), with a small class-conditional module and four images
    in scope; repaint's 250 steps are capped at this module's T = 50."""
    import re

    from tests.helpers import ROOT

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "editing.md").read_text(), flags=re.S)
    assert len(blocks) == 2
    module = DiffusionModule(backbone=UNET, data_shape=[1, 8, 8], num_classes=4, num_timesteps=50, clip_denoised=True)
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    scope = {"module": module, "images": images, "torch": torch}
    for block in blocks:
        exec(block, scope)
    assert scope["edited"].shape == (4, 1, 8, 8) and torch.isfinite(scope["edited"]).all()
    assert torch.equal(scope["completed"][..., :4, :], images[..., :4, :])
