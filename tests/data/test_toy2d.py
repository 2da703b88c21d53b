"""The fine-structure toy distributions and the recipe bookkeeping of benchmarks/toy_quality.py.

The shape / determinism / label checks every toy distribution gets are in test_data.py
(parametrized over TOY_DISTRIBUTIONS); here: the geometry that makes the new ones hard.
"""

import math
from pathlib import Path

import pytest
import torch

from benchmarks.toy_quality import BEFORE, ablation_steps, recipe_from_config, within_3sd
from lightning_ddpm.data import sample_toy2d

ROOT = Path(__file__).resolve().parents[2]


def test_pentagram_points_lie_on_the_five_strokes():
    x, labels = sample_toy2d("pentagram", 20_000, torch.Generator().manual_seed(0))
    angle = torch.arange(5) * 2 * math.pi / 5 + math.pi / 2
    corners = torch.stack([angle.cos(), angle.sin()], dim=1)
    start, end = corners[labels], corners[(labels + 2) % 5]
    direction = (end - start) / (end - start).norm(dim=1, keepdim=True)
    offset = x - start
    across = offset[:, 0] * direction[:, 1] - offset[:, 1] * direction[:, 0]  # signed distance to the stroke
    assert across.std().item() == pytest.approx(0.01, rel=0.05)  # jitter sd 0.01 across each stroke
    along = (offset * direction).sum(1) / (end - start).norm(dim=1)
    assert along.min() > -0.05 and along.max() < 1.05 and along.std().item() == pytest.approx(12**-0.5, rel=0.05)


def test_spiral_arms_are_thin_archimedean_arms_uniform_along_the_arc():
    x, labels = sample_toy2d("spiral_arms", 5000, torch.Generator().manual_seed(0))
    radius = x.norm(dim=1)
    s_ = torch.linspace(0, 1, 4000)
    arms = [
        s_[:, None]
        * torch.stack(
            [(3 * math.pi * s_ + k * 2 * math.pi / 3).cos(), (3 * math.pi * s_ + k * 2 * math.pi / 3).sin()], dim=1
        )
        for k in range(3)
    ]
    distance = torch.stack([torch.cdist(x, arm).min(dim=1).values for arm in arms], dim=1)  # (N, 3)
    own = distance.gather(1, labels[:, None]).squeeze(1)
    other = distance.masked_fill(torch.nn.functional.one_hot(labels, 3).bool(), math.inf).min(dim=1).values
    # the distance to the own arm is the jitter across it: |N(0, 0.015^2)| has median 0.675 * 0.015
    assert own.median().item() == pytest.approx(0.675 * 0.015, rel=0.1)
    outer = radius > 0.3  # away from the centre, where the arms meet
    assert (other[outer] > 0.1).float().mean() > 0.95  # the arms lie 2 pi / 3 / (3 pi) = 0.22 apart
    # uniform along the arc: the radius r = sqrt(u) has P(r < 1/2) = 1/4
    assert (radius < 0.5).float().mean().item() == pytest.approx(0.25, abs=0.02)


def test_within_3sd_counts_the_eight_gaussians_data_as_a_2d_gaussian_predicts():
    x, _ = sample_toy2d("eight_gaussians", 50_000, torch.Generator().manual_seed(0))
    assert within_3sd(x) == pytest.approx(1 - math.exp(-4.5), abs=0.003)  # P(|z| < 3) for a 2-D N(0, I)
    ring = torch.stack([torch.linspace(0, 2 * math.pi, 1000).cos(), torch.linspace(0, 2 * math.pi, 1000).sin()], 1)
    # a ring through the centres: the arcs within 0.24 of one, 2 * 2 asin(0.12) radians around each of 8
    assert within_3sd(ring) == pytest.approx(8 * 4 * math.asin(0.12) / (2 * math.pi), abs=0.01)


def test_benchmark_reads_the_toy_configs_recipe_and_ablates_one_change_at_a_time():
    after = recipe_from_config(ROOT / "configs/toy2d.yaml")
    assert after.keys() == BEFORE.keys()
    # the class-conditional config trains with the same recipe
    assert recipe_from_config(ROOT / "configs/toy2d_cond.yaml") == after
    steps = ablation_steps(BEFORE, after)
    assert steps[0] == ("before", BEFORE) and steps[-1][1] == after
    for (_, a), (_, b) in zip(steps, steps[1:]):
        assert sum(a[k] != b[k] for k in a) == 1
    assert after["fourier_features"] > 0 and BEFORE["fourier_features"] == 0  # the change that matters (README)


def _far_strays(x_scale: float, steps: int = 1500) -> tuple[int, float]:
    """A small recipe model (Fourier features 64, scale 2) trained briefly on six blobs at radius 2.2, a
    distribution that is not built in; DDIM 50 from 500 x_T in the tail of N(0, I) (radius 2.9-3.5, where
    the far strays start): how many samples end more than 0.5 beyond the data's radius, and the largest radius."""
    from benchmarks.toy_strays import blobs6
    from lightning_ddpm import GaussianDiffusion, make_schedule
    from lightning_ddpm.backbones import MLP
    from lightning_ddpm.samplers import make_sampler

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = blobs6(20_000, g)
    diffusion = GaussianDiffusion(make_schedule("cosine", num_timesteps=1000), parameterization="v")
    model = MLP(hidden_dim=128, num_blocks=2, fourier_features=64, fourier_scale=2.0, fourier_x_scale=x_scale)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        opt.param_groups[0]["lr"] = 1e-3 * min(1.0, (step + 1) / 100)
        x0 = data[torch.randint(0, len(data), (256,), generator=g)]
        t = torch.randint(0, 1000, (256,), generator=g)
        loss = diffusion.training_losses(model, x0, t, generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    gs = torch.Generator().manual_seed(1)
    angle, radius = 2 * math.pi * torch.rand(500, generator=gs), 2.9 + 0.6 * torch.rand(500, generator=gs)
    x_T = radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
    with torch.no_grad():
        out = make_sampler({"name": "ddim", "init_args": {"num_steps": 50}}, num_timesteps=1000).sample(
            model.eval(), diffusion, x_T, generator=gs
        )
    r = out.norm(dim=1)
    return int((r > data.norm(dim=1).max() + 0.5).sum()), float(r.max())


def test_toy_recipe_leaves_no_far_strays_on_data_it_was_not_chosen_on():
    """Issue 22 item 14: with fourier_x_scale 1 (before the option) most of these tail starts end far
    outside the six blobs (the sinusoids repeat, so a far point looks like an inner one); with
    configs/toy2d.yaml's 32 the raw x tells the first layer how far out a point is."""
    x_scale = recipe_from_config(ROOT / "configs/toy2d.yaml")["fourier_x_scale"]
    assert x_scale == 32.0
    far, largest = _far_strays(x_scale)
    assert far == 0, (far, largest)
