"""Far strays of the toy recipe on 2-D distributions it was not chosen on (issue 22, item 14).

Trains configs/toy2d.yaml's model settings (MLP 256 x 4, cosine, v, Adam 1e-3 with 100 warm-up steps,
batch 256, gradient clipping 1.0) in a plain loop on distributions that are not registered ones and
larger than the built-in ones (radius up to ~2.6), keeps the raw weights and an EMA 0.999 copy of one
run, and samples each with DDIM 50, DDPM 1000, DPM-Solver++ 2M 20 and UniPC 20. A sample's distance
to the support is its distance to the nearest of 20,000 fresh data points; the data-vs-data floor is
the largest such distance among 4000 further data points. Prints, per model and sampler, the counts
beyond the floor, beyond 0.25 and beyond 0.5, the count farther from the origin than the data's
largest radius plus the floor (outside the support's extent, not between its modes), the largest
distance, and where the far strays (> 0.5) started: the radius of their x_T.

    python -m benchmarks.toy_strays --distributions blobs6 --backbone '{"fourier_features": 64, "fourier_scale": 2.0}'
    python -m benchmarks.toy_strays --distributions blobs6 annulus plus --backbone '{}' --steps 1500
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from benchmarks.common import device_name, print_table, write_json
from lightning_ddpm import GaussianDiffusion, make_schedule
from lightning_ddpm.backbones import MLP
from lightning_ddpm.samplers import make_sampler


def blobs6(n: int, g: torch.Generator) -> torch.Tensor:
    """Six Gaussians (sd 0.1) on a circle of radius 2.2."""
    k = torch.randint(0, 6, (n,), generator=g).float() * (2 * math.pi / 6)
    return 2.2 * torch.stack([k.cos(), k.sin()], 1) + 0.1 * torch.randn(n, 2, generator=g)


def annulus(n: int, g: torch.Generator) -> torch.Tensor:
    """Uniform on the annulus 1.8 < r < 2.6."""
    r = (1.8**2 + (2.6**2 - 1.8**2) * torch.rand(n, generator=g)).sqrt()
    a = 2 * math.pi * torch.rand(n, generator=g)
    return r[:, None] * torch.stack([a.cos(), a.sin()], 1)


def plus(n: int, g: torch.Generator) -> torch.Tensor:
    """A plus sign: arms of half-length 2.5 along the axes, jitter sd 0.03."""
    s, j = 2.5 * (2 * torch.rand(n, generator=g) - 1), 0.03 * torch.randn(n, generator=g)
    horizontal = torch.rand(n, generator=g) < 0.5
    return torch.where(horizontal[:, None], torch.stack([s, j], 1), torch.stack([j, s], 1))


def grid9(n: int, g: torch.Generator) -> torch.Tensor:
    """A 3 x 3 grid of Gaussians (sd 0.08), 1.6 apart."""
    k = torch.randint(0, 9, (n,), generator=g)
    return 1.6 * torch.stack([(k % 3).float() - 1, (k // 3).float() - 1], 1) + 0.08 * torch.randn(n, 2, generator=g)


DISTRIBUTIONS = {"blobs6": blobs6, "annulus": annulus, "plus": plus, "grid9": grid9}
SAMPLERS = {
    "ddim50": {"name": "ddim", "init_args": {"num_steps": 50}},
    "ddpm1000": {"name": "ddpm"},
    "dpmpp20": {"name": "dpmpp_2m", "init_args": {"num_steps": 20}},
    "unipc20": {"name": "unipc", "init_args": {"num_steps": 20}},
}


def train(sample, backbone: dict, steps: int, seed: int = 0, ema_decay: float = 0.999):
    """The recipe in a plain loop; returns (raw model, EMA copy, diffusion, seconds)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = sample(100_000, g)
    diffusion = GaussianDiffusion(make_schedule("cosine", num_timesteps=1000), parameterization="v")
    model = MLP(**{"hidden_dim": 256, "num_blocks": 4, **backbone})
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    start, order, pos = time.perf_counter(), torch.randperm(len(data), generator=g), 0
    for _ in range(steps):
        if pos + 256 > len(data):
            order, pos = torch.randperm(len(data), generator=g), 0
        x0, pos = data[order[pos : pos + 256]], pos + 256
        t = torch.randint(0, 1000, (256,), generator=g)
        loss = diffusion.training_losses(model, x0, t, generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema_decay)
    return model.eval(), ema.eval(), diffusion, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--distributions", nargs="+", default=["blobs6", "annulus", "plus"], choices=list(DISTRIBUTIONS)
    )
    parser.add_argument(
        "--backbone", default='{"fourier_features": 64, "fourier_scale": 2.0}', help="MLP options, JSON"
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--out", default="benchmarks/results/toy_strays.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone, rows = json.loads(args.backbone), []
    for name in args.distributions:
        g = torch.Generator().manual_seed(123)
        reference, fresh = DISTRIBUTIONS[name](20_000, g), DISTRIBUTIONS[name](args.num_samples, g)
        floor = float(torch.cdist(fresh, reference).min(1).values.max())
        r_max = float(reference.norm(dim=1).max())
        model, ema, diffusion, train_s = train(DISTRIBUTIONS[name], backbone, args.steps)
        for weights, net in (("raw", model), ("ema", ema)):
            for sampler in args.samplers:
                x_T = torch.randn(args.num_samples, 2, generator=torch.Generator().manual_seed(1))
                with torch.no_grad():
                    samples = make_sampler(SAMPLERS[sampler], num_timesteps=1000).sample(
                        net, diffusion, x_T.clone(), generator=torch.Generator().manual_seed(2)
                    )
                d = torch.cdist(samples.float(), reference).min(1).values
                far = d > 0.5
                outside = samples.float().norm(dim=1) > r_max + floor
                rows.append(
                    {
                        "distribution": name,
                        "weights": weights,
                        "sampler": sampler,
                        "floor": floor,
                        "beyond_floor": int((d > floor).sum()),
                        "outside_r_max": int(outside.sum()),
                        "beyond_0.25": int((d > 0.25).sum()),
                        "beyond_0.5": int(far.sum()),
                        "max_distance": float(d.max()),
                        "far_x_T_radius_median": float(x_T.norm(dim=1)[far].median()) if far.any() else None,
                        "train_s": train_s,
                    }
                )
                print_table(rows[-1:], list(rows[-1]))
    print(
        f"\ndevice: {device_name(torch.device('cpu'))}; backbone {backbone}; {args.steps} steps; "
        f"{args.num_samples} samples; P(|x_T| > 3) = {math.exp(-4.5):.4f} for 2-D N(0, I)"
    )
    print_table(rows, list(rows[0]))
    write_json(
        args.out, {"device": device_name(torch.device("cpu")), "backbone": backbone, "steps": args.steps, "rows": rows}
    )


if __name__ == "__main__":
    main()
