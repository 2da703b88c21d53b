"""Sample quality on 2-D toy data for a fixed training budget: sliced Wasserstein-2 and MMD.

Three modes, each comparing samples with fresh data points next to the data-vs-data floor (two
independent draws of the data, so SW2 / floor = 1 means "as close as another draw of the data"):

``compare`` (default): the recipe of ``configs/toy2d.yaml`` ("after") against the quick start's earlier
recipe (``BEFORE``: no Fourier features, lr 1e-3), same steps and seeds, on every registered
distribution; then the ablation: from ``BEFORE`` to the config, one changed setting at a time in
``ABLATION_ORDER``. DDPM sampling (all 1000 steps). Writes JSON, prints the tables, and draws the
before/after figure (``--figure``, e.g. docs/toy_quality.png).

``run``: one recipe (the config's, with ``--set key=value`` overrides) on chosen distributions and
seeds: the sweep that chose the recipe.

``grid``: schedule x parameterization x sampler with the config's recipe (and ``--set``) otherwise.

Every training run is cached in ``--cache`` (a JSON line per distribution, recipe, seed and sample
count), so an interrupted ``compare`` resumes and ``run`` sweeps are reused.

    python -m benchmarks.toy_quality                                      # before/after + ablation
    python -m benchmarks.toy_quality run --set fourier_scale=4 --distributions pentagram --seeds 0 1
    python -m benchmarks.toy_quality grid --distributions two_moons --steps 1500
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from benchmarks.common import device_name, print_table, write_json
from benchmarks.metrics import mmd_rbf, sliced_w2
from lightning_ddpm import DDIMSampler, DDPMSampler, DiffusionModule
from lightning_ddpm.backbones import MLP
from lightning_ddpm.callbacks import EMA
from lightning_ddpm.data import TOY_DISTRIBUTIONS, Toy2DDataModule, sample_toy2d

# MMD on the first 4000 points of each set (quadratic cost), kernel bandwidth 0.1 in data units.
MMD_BANDWIDTH, MMD_POINTS = 0.1, 4000
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy2d.yaml"
BACKBONE_KEYS = [
    k for k in inspect.signature(MLP).parameters if k not in ("in_channels", "out_channels", "num_classes")
]

# The quick start's recipe before issue 17 (configs/toy2d.yaml at commit f745615), every setting spelled out.
BEFORE: dict[str, Any] = {
    **{k: p.default for k, p in inspect.signature(MLP).parameters.items() if k in BACKBONE_KEYS},
    "hidden_dim": 256,
    "num_blocks": 4,
    "time_embed_dim": 128,
    "dropout": 0.0,
    "fourier_features": 0,
    "fourier_scale": 1.0,
    "schedule": "cosine",
    "num_timesteps": 1000,
    "parameterization": "v",
    "lr": 1e-3,
    "lr_warmup_steps": 100,
    "batch_size": 256,
    "ema_decay": 0.999,
    "gradient_clip_val": 1.0,
    "max_steps": 3000,
}
# The ablation applies the differences between BEFORE and the config in this order (others after them).
ABLATION_ORDER = [
    "fourier_features",
    "fourier_scale",
    "lr",
    "lr_warmup_steps",
    "ema_decay",
    "batch_size",
    "hidden_dim",
    "num_blocks",
    "time_embed_dim",
    "schedule",
    "parameterization",
    "max_steps",
]
# eight_gaussians: the components' centres (unit circle) and standard deviation, from lightning_ddpm/data/toy2d.py.
EIGHT_GAUSSIANS_SD = 0.08


def _typed(recipe: dict[str, Any]) -> dict[str, Any]:
    """Floats where ``BEFORE`` has floats (YAML reads ``2`` as an int), so equal recipes have equal cache keys."""
    return {k: float(v) if isinstance(BEFORE.get(k), float) and isinstance(v, int) else v for k, v in recipe.items()}


def recipe_from_config(path: str | Path = CONFIG) -> dict[str, Any]:
    """The training recipe a toy config describes, as flat settings (MLP defaults filled in)."""
    cfg = yaml.safe_load(Path(path).read_text())
    model, trainer = cfg["model"], cfg["trainer"]
    backbone = model["backbone"]
    backbone_args = backbone.get("init_args", {}) if isinstance(backbone, dict) else {}
    defaults = {k: p.default for k, p in inspect.signature(MLP).parameters.items() if k in BACKBONE_KEYS}
    ema = [c["init_args"] for c in trainer.get("callbacks", []) if c["class_path"].endswith(".EMA")]
    return _typed(
        {
            **defaults,
            **backbone_args,
            "schedule": model["schedule"],
            "num_timesteps": model["num_timesteps"],
            "parameterization": model["parameterization"],
            "lr": model["optimizer"]["init_args"]["lr"],
            "lr_warmup_steps": model["lr_warmup_steps"],
            "batch_size": cfg["data"]["init_args"]["batch_size"],
            "ema_decay": ema[0].get("decay", 0.9999) if ema else None,
            "gradient_clip_val": trainer.get("gradient_clip_val"),
            "max_steps": trainer["max_steps"],
        }
    )


def train(distribution: str, recipe: dict[str, Any], seed: int) -> tuple[DiffusionModule, float]:
    """Train one toy model with ``recipe``; returns it (EMA weights in place) and the training seconds."""
    pl.seed_everything(seed, verbose=False)
    module = DiffusionModule(
        backbone={"name": "mlp", "init_args": {k: recipe[k] for k in BACKBONE_KEYS}},
        data_shape=[2],
        schedule=recipe["schedule"],
        num_timesteps=recipe["num_timesteps"],
        parameterization=recipe["parameterization"],
        variance="fixed_small",
        clip_denoised=False,
        optimizer={"name": "torch.optim.Adam", "init_args": {"lr": recipe["lr"]}},
        lr_warmup_steps=recipe["lr_warmup_steps"],
    )
    callbacks = [EMA(decay=recipe["ema_decay"])] if recipe["ema_decay"] is not None else []
    data = Toy2DDataModule(distribution, num_train=100_000, batch_size=recipe["batch_size"], seed=seed)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=recipe["max_steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=recipe["gradient_clip_val"],
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return module, time.perf_counter() - start  # EMA copies its average into the module at the end of fit


def reference_and_floor(distribution: str, n: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Fresh data to compare against, and the data-vs-data floor (a second independent draw)."""
    g = torch.Generator().manual_seed(123)
    reference, second = sample_toy2d(distribution, n, g)[0], sample_toy2d(distribution, n, g)[0]
    return reference, second, sliced_w2(second, reference), mmd_rbf(second, reference, MMD_BANDWIDTH, MMD_POINTS)


def within_3sd(points: torch.Tensor) -> float:
    """Fraction of points within 3 sd of one of the eight Gaussians' centres (98.9% for the data itself)."""
    angle = torch.arange(8) * (2 * math.pi / 8)
    centres = torch.stack([angle.cos(), angle.sin()], dim=1)
    return float((torch.cdist(points.float(), centres).min(dim=1).values < 3 * EIGHT_GAUSSIANS_SD).float().mean())


def evaluate(samples: torch.Tensor, distribution: str, n: int) -> dict[str, Any]:
    reference, _, floor_w2, floor_mmd = reference_and_floor(distribution, n)
    row = {
        "sliced_w2": sliced_w2(samples, reference),
        "floor": floor_w2,
        "mmd": mmd_rbf(samples, reference, MMD_BANDWIDTH, MMD_POINTS),
        "floor_mmd": floor_mmd,
    }
    row["ratio"] = row["sliced_w2"] / floor_w2
    if distribution == "eight_gaussians":
        row["within_3sd"] = within_3sd(samples)
    return row


class RunCache:
    """Finished runs as JSON lines keyed by (distribution, recipe, seed, samples), with their samples."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index = self.folder / "runs.jsonl"
        self.rows: dict[str, dict[str, Any]] = {}
        if self.index.exists():
            for line in self.index.read_text().splitlines():
                row = json.loads(line)
                self.rows[row["key"]] = row

    @staticmethod
    def key(distribution: str, recipe: dict[str, Any], seed: int, n: int, sampler: str) -> str:
        return json.dumps([distribution, sorted(recipe.items()), seed, n, sampler])

    def run(self, distribution: str, recipe: dict[str, Any], seed: int, n: int) -> dict[str, Any]:
        """Train and sample (DDPM, all steps), or read the cached result; the samples are saved beside."""
        key = self.key(distribution, recipe, seed, n, "ddpm")
        if key in self.rows:
            return self.rows[key]
        module, train_s = train(distribution, recipe, seed)
        start = time.perf_counter()
        with torch.no_grad():
            samples = module.sample(n, sampler=DDPMSampler(), generator=torch.Generator().manual_seed(1000 + seed))
        row = {
            "key": key,
            "distribution": distribution,
            "seed": seed,
            "recipe": recipe,
            "train_s": train_s,
            "sample_s": time.perf_counter() - start,
            **evaluate(samples, distribution, n),
        }
        row["samples"] = f"{len(self.rows):04d}_{distribution}_s{seed}.pt"
        torch.save(samples[:2000].clone(), self.folder / row["samples"])
        with self.index.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows[key] = row
        return row

    def samples(self, row: dict[str, Any]) -> torch.Tensor:
        return torch.load(self.folder / row["samples"])


def save_overview(
    panels: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, str]], path: str | Path, title: str
) -> Path:
    """One figure: a row per first key (model), a column per second key (distribution); each panel scatters
    samples (blue) over data (grey) with a caption (e.g. SW2 / floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(r for r, _ in panels))
    cols = list(dict.fromkeys(c for _, c in panels))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.1 * len(cols), 2.2 * len(rows) + 0.3), squeeze=False)
    for (row, col), (samples, reference, caption) in panels.items():
        ax = axes[rows.index(row)][cols.index(col)]
        ax.scatter(reference[:1500, 0], reference[:1500, 1], s=0.3, c="lightgray", rasterized=True)
        ax.scatter(samples[:1500, 0], samples[:1500, 1], s=0.3, c="tab:blue", alpha=0.6, rasterized=True)
        lim = float(reference.abs().max()) * 1.25
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.03, 0.03, caption, transform=ax.transAxes, fontsize=7, va="bottom")
        if row == rows[0]:
            ax.set_title(col, fontsize=9)
        if col == cols[0]:
            ax.set_ylabel(row, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _caption(row: dict[str, Any]) -> str:
    text = f"SW2/floor {row['ratio']:.2f}"
    return text + (f", {row['within_3sd']:.1%} in modes" if "within_3sd" in row else "")


def ablation_steps(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, recipe) from ``before`` to ``after``, one changed setting at a time."""
    changed = [k for k in ABLATION_ORDER if before[k] != after[k]]
    changed += [k for k in after if before.get(k) != after[k] and k not in changed]
    steps, recipe = [("before", dict(before))], dict(before)
    for k in changed:
        recipe = {**recipe, k: after[k]}
        steps.append((f"+ {k}={after[k]}", dict(recipe)))
    return steps


def compare(args: argparse.Namespace, cache: RunCache) -> None:
    after = {**recipe_from_config(args.config), **_parse_set(args.set)}
    before = {**BEFORE, "max_steps": after["max_steps"]}  # same budget: the comparison is about the recipe
    steps = ablation_steps(before, after)
    print("recipe changes:", [label for label, _ in steps[1:]])
    table, ablation, panels = [], [], {}
    for distribution in args.distributions:
        for seed in args.seeds:
            ablate = args.ablation and distribution in (args.ablation_distributions or args.distributions)
            for label, recipe in steps if ablate else [steps[0], steps[-1]]:
                row = cache.run(distribution, recipe, seed, args.num_samples)
                ablation.append({"distribution": distribution, "seed": seed, "recipe": label, **_public(row)})
                print_table(ablation[-1:], ["distribution", "seed", "recipe", "ratio", "within_3sd", "train_s"])
        for label, recipe in (steps[0], steps[-1]):
            rows = [cache.run(distribution, recipe, s, args.num_samples) for s in args.seeds]
            name = "before" if label == "before" else "after"
            table.append(
                {
                    "distribution": distribution,
                    "recipe": name,
                    "seeds": len(rows),
                    **{k: sum(r[k] for r in rows) / len(rows) for k in _metrics(rows[0])},
                    "ratio_max": max(r["ratio"] for r in rows),
                }
            )
            reference = reference_and_floor(distribution, args.num_samples)[0][:2000]
            panels[f"{name}, seed {args.seeds[0]}", distribution] = cache.samples(rows[0]), reference, _caption(rows[0])
    device = device_name(torch.device("cpu"))
    print(
        f"\ndevice: {device}; {after['max_steps']} training steps per model; DDPM 1000 sampling, "
        f"{args.num_samples} samples vs {args.num_samples} fresh data points; seeds {args.seeds}"
    )
    print("\nbefore / after (mean over seeds):")
    print_table(
        table,
        [
            "distribution",
            "recipe",
            "seeds",
            "ratio",
            "ratio_max",
            "sliced_w2",
            "floor",
            "mmd",
            "within_3sd",
            "train_s",
            "sample_s",
        ],
    )
    if args.ablation:
        print("\nablation, one change at a time:")
        print_table(ablation, ["distribution", "seed", "recipe", "ratio", "within_3sd", "mmd", "train_s"])
    write_json(
        args.out,
        {
            "device": device,
            "before": before,
            "after": after,
            "seeds": args.seeds,
            "num_samples": args.num_samples,
            "table": table,
            "ablation": ablation,
        },
    )
    if args.figure:
        figure = save_overview(
            panels,
            args.figure,
            f"DDPM samples (blue) over data (grey), {after['max_steps']} training steps; "
            "top: before, bottom: configs/toy2d.yaml",
        )
        print(f"wrote {figure} ({figure.stat().st_size // 1024} KB)")


def _metrics(row: dict[str, Any]) -> list[str]:
    return [
        k for k in ("ratio", "sliced_w2", "floor", "mmd", "floor_mmd", "within_3sd", "train_s", "sample_s") if k in row
    ]


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in _metrics(row)}


def _parse_set(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in BEFORE:
            raise SystemExit(f"--set {key}: unknown setting; choose one of: {', '.join(BEFORE)}")
        try:
            overrides[key] = int(value)
        except ValueError:
            try:
                overrides[key] = float(value)  # YAML would read 2e-3 as a string
            except ValueError:
                overrides[key] = yaml.safe_load(value)
    return _typed(overrides)


def run(args: argparse.Namespace, cache: RunCache) -> None:
    recipe = {**recipe_from_config(args.config), **_parse_set(args.set)}
    rows = []
    for distribution in args.distributions:
        for seed in args.seeds:
            row = cache.run(distribution, recipe, seed, args.num_samples)
            rows.append({"distribution": distribution, "seed": seed, **_public(row)})
            print_table(rows[-1:], ["distribution", "seed", "ratio", "within_3sd", "mmd", "train_s", "sample_s"])
    print(f"\nrecipe: {recipe}")
    print_table(rows, ["distribution", "seed", "ratio", "within_3sd", "mmd", "train_s", "sample_s"])


def grid(args: argparse.Namespace, cache: RunCache) -> None:
    base = {**recipe_from_config(args.config), **_parse_set(args.set)}
    rows = []
    for distribution in args.distributions:
        reference, _, floor_w2, floor_mmd = reference_and_floor(distribution, args.num_samples)
        rows.append(
            {
                "distribution": distribution,
                "model": "data vs data (floor)",
                "sampler": "-",
                "sliced_w2": floor_w2,
                "mmd": floor_mmd,
            }
        )
        for schedule in args.schedules:
            for parameterization in args.parameterizations:
                recipe = {**base, "schedule": schedule, "parameterization": parameterization}
                module, _ = train(distribution, recipe, args.seeds[0])
                samplers = [("DDPM 1000", DDPMSampler())] + [
                    (f"DDIM {n}", DDIMSampler(num_steps=n)) for n in args.ddim_steps
                ]
                for name, sampler in samplers:
                    with torch.no_grad():
                        samples = module.sample(
                            args.num_samples, sampler=sampler, generator=torch.Generator().manual_seed(1)
                        )
                    rows.append(
                        {
                            "distribution": distribution,
                            "model": f"{schedule}/{parameterization}",
                            "sampler": name,
                            "sliced_w2": sliced_w2(samples, reference),
                            "mmd": mmd_rbf(samples, reference, MMD_BANDWIDTH, MMD_POINTS),
                        }
                    )
                print_table(rows[-len(samplers) :], ["distribution", "model", "sampler", "sliced_w2", "mmd"])
    print(f"\ndevice: {device_name(torch.device('cpu'))}; {base['max_steps']} training steps per model")
    print_table(rows, ["distribution", "model", "sampler", "sliced_w2", "mmd"])
    write_json(args.out, {"device": device_name(torch.device("cpu")), "recipe": base, "rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=["compare", "run", "grid"], default="compare")
    parser.add_argument("--config", default=str(CONFIG), help="the toy config whose recipe is 'after'")
    parser.add_argument("--distributions", nargs="+", default=list(TOY_DISTRIBUTIONS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--no-ablation", dest="ablation", action="store_false", help="compare: only before and after")
    parser.add_argument("--ablation-distributions", nargs="+", help="compare: ablate these only (default: all)")
    parser.add_argument("--set", nargs="*", default=[], help="overrides of the config's recipe, key=value")
    parser.add_argument("--steps", type=int, help="override max_steps (every mode)")
    parser.add_argument("--schedules", nargs="+", default=["linear", "cosine"], help="grid")
    parser.add_argument("--parameterizations", nargs="+", default=["eps", "v"], help="grid")
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[20, 50], help="grid")
    parser.add_argument("--cache", default="benchmarks/results/toy_quality")
    parser.add_argument("--out", default="benchmarks/results/toy_quality.json")
    parser.add_argument("--figure", default="benchmarks/results/toy_quality/overview.png")
    args = parser.parse_args()
    if args.steps is not None:
        args.set = [*args.set, f"max_steps={args.steps}"]
        BEFORE["max_steps"] = args.steps
    cache = RunCache(args.cache)
    {"compare": compare, "run": run, "grid": grid}[args.mode](args, cache)


if __name__ == "__main__":
    main()
