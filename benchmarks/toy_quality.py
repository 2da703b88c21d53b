"""Sample quality on 2-D toy data for a fixed training budget: sliced Wasserstein-2 and MMD.

For each distribution x schedule x parameterization, train the toy model for ``--steps`` steps,
then compare 10k samples per sampler with 10k fresh data points, next to the data-vs-data floor
(two independent 10k draws of the data). Writes a JSON file, a table and one scatter plot per run.

    python benchmarks/toy_quality.py --distributions two_moons eight_gaussians --steps 1500
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks.common import device_name, print_table, write_json
from benchmarks.metrics import mmd_rbf, sliced_w2
from lightning_ddpm import DDIMSampler, DDPMSampler, DiffusionModule
from lightning_ddpm.data import Toy2DDataModule, sample_toy2d
from lightning_ddpm.plotting import save_scatter

# MMD on the first 4000 points of each set (quadratic cost), kernel bandwidth 0.1 in data units.
MMD_BANDWIDTH, MMD_POINTS = 0.1, 4000


def save_overview(panels: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]], path: str | Path,
                  title: str) -> Path:
    """One figure: a row per distribution, a column per model; each panel scatters samples over data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(d for d, _ in panels))
    cols = list(dict.fromkeys(m for _, m in panels))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.4 * len(cols), 2.4 * len(rows)), squeeze=False)
    for (distribution, model), (samples, reference) in panels.items():
        ax = axes[rows.index(distribution)][cols.index(model)]
        ax.scatter(reference[:, 0], reference[:, 1], s=0.5, c="lightgray")
        ax.scatter(samples[:, 0], samples[:, 1], s=0.5, c="tab:blue", alpha=0.5)
        lim = float(reference.abs().max()) * 1.3
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xticks([])
        ax.set_yticks([])
        if distribution == rows[0]:
            ax.set_title(model, fontsize=9)
        if model == cols[0]:
            ax.set_ylabel(distribution, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distributions", nargs="+", default=["two_moons", "eight_gaussians", "swiss_roll",
                                                               "checkerboard", "rings"])
    parser.add_argument("--schedules", nargs="+", default=["linear", "cosine"])
    parser.add_argument("--parameterizations", nargs="+", default=["eps", "v"])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--out", default="benchmarks/results/toy_quality.json")
    parser.add_argument("--plots", default="benchmarks/results/toy_quality")
    args = parser.parse_args()
    rows, overview = [], {}
    for distribution in args.distributions:
        g = torch.Generator().manual_seed(123)
        reference = sample_toy2d(distribution, args.num_samples, g)[0]
        floor = sample_toy2d(distribution, args.num_samples, g)[0]
        rows.append({"distribution": distribution, "model": "data vs data (floor)", "sampler": "-",
                     "sliced_w2": sliced_w2(floor, reference),
                     "mmd": mmd_rbf(floor, reference, MMD_BANDWIDTH, MMD_POINTS)})
        for schedule, parameterization in itertools.product(args.schedules, args.parameterizations):
            pl.seed_everything(0, verbose=False)
            module = DiffusionModule(backbone={"name": "mlp", "init_args": {"hidden_dim": 256, "num_blocks": 4}},
                                     data_shape=[2], schedule=schedule, parameterization=parameterization,
                                     optimizer={"name": "torch.optim.Adam", "init_args": {"lr": 1e-3}},
                                     lr_warmup_steps=100)
            pl.Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                       gradient_clip_val=1.0).fit(module, datamodule=Toy2DDataModule(distribution, num_train=256 * 400))
            samplers = [("DDPM 1000", DDPMSampler())]
            samplers += [(f"DDIM {n}", DDIMSampler(num_steps=n)) for n in args.ddim_steps]
            for name, sampler in samplers:
                samples = module.sample(args.num_samples, sampler=sampler, generator=torch.Generator().manual_seed(1))
                model = f"{schedule}/{parameterization}"
                rows.append({"distribution": distribution, "model": model, "sampler": name,
                             "sliced_w2": sliced_w2(samples, reference),
                             "mmd": mmd_rbf(samples, reference, MMD_BANDWIDTH, MMD_POINTS)})
                plot = Path(args.plots) / f"{distribution}_{schedule}_{parameterization}_{name.replace(' ', '')}.png"
                save_scatter(samples[:3000], plot, reference[:3000], title=f"{distribution} {model} {name}")
                if isinstance(sampler, DDPMSampler):
                    overview[distribution, model] = samples[:2000], reference[:2000]
            print_table(rows[-len(samplers):], ["distribution", "model", "sampler", "sliced_w2", "mmd"])
    device = device_name(torch.device("cpu"))
    print(f"\ndevice: {device}; {args.steps} training steps of batch 256 per model")
    print_table(rows, ["distribution", "model", "sampler", "sliced_w2", "mmd"])
    write_json(args.out, {"device": device, "steps": args.steps, "rows": rows})
    figure = save_overview(overview, Path(args.plots) / "overview.png",
                           f"DDPM samples (blue) over data (grey), {args.steps} training steps per model")
    print(f"wrote {figure}")


if __name__ == "__main__":
    main()
