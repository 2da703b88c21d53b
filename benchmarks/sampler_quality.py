"""Sample quality against network evaluations: every sampler at 5/10/20/50 steps on two models.

Two models trained here (or loaded with ``--toy-ckpt`` / ``--digits-ckpt``):

- two moons: the recipe of configs/toy2d.yaml (its ``model:`` section and ``max_steps``);
- digits: scikit-learn's 8x8 digits with the recipe of configs/digits.yaml (the row v_sigmoid_g8_film_no_zero of
  benchmarks/digits_quality.py: v, sigmoid, its U-Net), ``--digits-steps`` steps.

Each sampler's samples are compared with data and with DDPM-1000's samples from the same model:
sliced W2 against 4000 fresh points for two moons; for digits, the Frechet distance in the shipped digits
classifier's features against the 1617 training images. The floors: two fresh draws of two moons against each
other; for digits, a second DDPM-1000 draw (other noise) against the first, the distance below which "vs DDPM"
cannot separate a sampler from DDPM-1000 at this sample count (the Frechet distance is biased by the count, so
every digits row uses the same count). The target of issue 13: at 10 network evaluations the best sampler
within 10% of DDPM-1000's metric.

    python -m benchmarks.sampler_quality
    python -m benchmarks.sampler_quality --steps 5 10 --toy-ckpt outputs/toy2d/checkpoints/last.ckpt

The trained models are saved beside ``--out`` (EMA weights) for reuse with ``--toy-ckpt``/``--digits-ckpt``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from torch import Tensor

from benchmarks.common import device_name, print_table, write_json
from benchmarks.digits_quality import COMMON as DIGITS_COMMON
from benchmarks.digits_quality import CONFIGS as DIGITS_CONFIGS
from benchmarks.digits_quality import DIGITS_YAML_ROW, images
from benchmarks.metrics import digits_frechet, sliced_w2
from lightning_ddpm import DiffusionModule
from lightning_ddpm.callbacks import EMA, ema_weights
from lightning_ddpm.data import ImageDataModule, Toy2DDataModule, sample_toy2d
from lightning_ddpm.samplers import Sampler, make_sampler

ROOT = Path(__file__).resolve().parents[1]
DIGITS_RECIPE = DIGITS_YAML_ROW  # configs/digits.yaml
METRICS = {"two moons": "sliced W2", "digits": "digits Frechet distance"}
OTHER_NOISE = "ddpm, other noise"  # a second DDPM-1000 draw: the floor of "vs DDPM" where no data floor is given
# label -> sampler spec without num_steps; each runs at every --steps
SAMPLERS: dict[str, dict[str, Any]] = {
    "ddpm": {"name": "ddpm"},
    "ddim": {"name": "ddim"},
    "ddim trailing": {"name": "ddim", "init_args": {"spacing": "trailing"}},
    "euler": {"name": "euler"},
    "heun": {"name": "heun"},
    "heun karras": {"name": "heun", "init_args": {"spacing": "karras"}},
    "dpmpp_2m": {"name": "dpmpp_2m"},
    "dpmpp_2m karras": {"name": "dpmpp_2m", "init_args": {"spacing": "karras"}},
    "dpmpp_2m_sde": {"name": "dpmpp_2m_sde"},
    "unipc": {"name": "unipc"},
    "unipc order 3": {"name": "unipc", "init_args": {"order": 3}},
}


def network_evaluations(sampler: Sampler, steps: int) -> int:
    return 2 * steps - 1 if type(sampler).__name__ == "HeunSampler" else steps


def train_toy(args: argparse.Namespace) -> tuple[DiffusionModule, pl.Trainer | None]:
    config = yaml.safe_load((ROOT / "configs/toy2d.yaml").read_text())
    settings = dict(config["model"])
    if args.toy_ckpt:
        return DiffusionModule.load_from_checkpoint(args.toy_ckpt), None
    pl.seed_everything(0, verbose=False)
    module = DiffusionModule(data_shape=[2], **settings)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=config["trainer"]["max_steps"],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        gradient_clip_val=config["trainer"].get("gradient_clip_val"),
        callbacks=[EMA(decay=0.999)],
    )
    trainer.fit(module, datamodule=Toy2DDataModule("two_moons", num_train=100_000, batch_size=256))
    trainer.save_checkpoint(Path(args.out).with_name("sampler_quality_two_moons.ckpt"))  # EMA weights as state_dict
    return module, trainer


def train_digits(args: argparse.Namespace) -> tuple[DiffusionModule, pl.Trainer | None]:
    if args.digits_ckpt:
        return DiffusionModule.load_from_checkpoint(args.digits_ckpt), None
    pl.seed_everything(0, verbose=False)
    module = DiffusionModule(**{**DIGITS_COMMON, **DIGITS_CONFIGS[DIGITS_RECIPE][1]})
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.digits_steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        enable_progress_bar=False,
        callbacks=[EMA(decay=0.999)],
    )
    trainer.fit(module, datamodule=ImageDataModule("digits", batch_size=64, val_fraction=0.1))
    trainer.save_checkpoint(Path(args.out).with_name("sampler_quality_digits.ckpt"))  # EMA weights as state_dict
    return module, trainer


def sweep(
    name: str,
    module: DiffusionModule,
    trainer: pl.Trainer | None,
    num_samples: int,
    steps: list[int],
    metric,
    held_out: Tensor,
    repeat_reference: bool = False,
) -> list[dict[str, Any]]:
    """Every sampler at every step count; the metric against held-out data and against DDPM-1000 (generator seed
    1). With ``repeat_reference``, first a second DDPM-1000 draw (seed 2), the row ``ddpm, other noise``: its
    ``vs_ddpm`` is the floor of that column at this sample count."""
    rows = []
    module.eval()
    with ema_weights(trainer, module), torch.no_grad():  # a loaded checkpoint is used with its saved weights

        def draw(sampler):
            return module.sample(num_samples, sampler=sampler, generator=torch.Generator().manual_seed(1))

        start = time.perf_counter()
        reference = draw(make_sampler("ddpm"))
        rows.append(
            {
                "model": name,
                "sampler": "ddpm",
                "steps": module.diffusion.num_timesteps,
                "nfe": module.diffusion.num_timesteps,
                "vs_data": metric(reference, held_out),
                "vs_ddpm": 0.0,
                "seconds": time.perf_counter() - start,
            }
        )
        if repeat_reference:
            start = time.perf_counter()
            again = module.sample(num_samples, sampler=make_sampler("ddpm"), generator=torch.Generator().manual_seed(2))
            rows.append(
                {
                    **rows[-1],
                    "sampler": OTHER_NOISE,
                    "vs_data": metric(again, held_out),
                    "vs_ddpm": metric(again, reference),
                    "seconds": time.perf_counter() - start,
                }
            )
            print_table(rows[-2:], ["model", "sampler", "steps", "nfe", "vs_data", "vs_ddpm", "seconds"])
        for label, spec in SAMPLERS.items():
            for n in steps:
                sampler = make_sampler(
                    {"name": spec["name"], "init_args": {**spec.get("init_args", {}), "num_steps": n}}
                )
                start = time.perf_counter()
                samples = draw(sampler)
                rows.append(
                    {
                        "model": name,
                        "sampler": label,
                        "steps": n,
                        "nfe": network_evaluations(sampler, n),
                        "vs_data": metric(samples, held_out),
                        "vs_ddpm": metric(samples, reference),
                        "seconds": time.perf_counter() - start,
                    }
                )
            print_table(rows[-len(steps) :], ["model", "sampler", "steps", "nfe", "vs_data", "vs_ddpm", "seconds"])
    return rows


def best_at(rows: list[dict[str, Any]], model: str, nfe: int) -> dict[str, Any]:
    candidates = [
        r for r in rows if r["model"] == model and r["nfe"] <= nfe and r["steps"] != 1000 and r["sampler"] in SAMPLERS
    ]
    return min(candidates, key=lambda r: r["vs_data"])


def plot(rows: list[dict[str, Any]], floors: dict[str, float], metrics: dict[str, str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(max(7.5, 6.2 * len(models)), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        ddpm1000 = next(r for r in mine if r["nfe"] == r["steps"] and r["sampler"] == "ddpm" and r["vs_ddpm"] == 0.0)
        for label in SAMPLERS:
            line = sorted((r["nfe"], r["vs_data"]) for r in mine if r["sampler"] == label and r is not ddpm1000)
            style = "--" if "karras" in label or "trailing" in label or "order 3" in label else "-"
            ax.plot(*zip(*line), style, marker="o", markersize=3, label=label)
        ax.axhline(ddpm1000["vs_data"], color="black", linewidth=1, label=f"DDPM {ddpm1000['nfe']} steps")
        ax.axhline(ddpm1000["vs_data"] * 1.1, color="black", linewidth=0.8, linestyle=":", label="DDPM-1000 + 10%")
        if model in floors:
            ax.axhline(floors[model], color="gray", linewidth=1, linestyle="-.", label="data vs data (floor)")
        again = [r for r in mine if r["sampler"] == OTHER_NOISE]
        if again:  # the spread of DDPM-1000's own score over noise
            ax.axhline(again[0]["vs_data"], color="gray", linewidth=1, linestyle="--", label="DDPM 1000, other noise")
        ax.axvline(10, color="lightgray", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations")
        ax.set_ylabel(f"{metrics[model]} vs data (lower is better)")
        ax.set_title(model, fontsize=10)
    legend: dict[str, Any] = {}  # every panel's lines, once each (the floors differ between panels)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.suptitle(title, fontsize=10)
    columns = 7 if len(models) > 1 else 4  # one panel is too narrow for a 7-wide legend
    fig.tight_layout(rect=(0, 0.12 if len(models) > 1 else 0.2, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def replot(path: str, figure: str) -> Path:
    """Redraw the figure from a saved JSON (``--replot``)."""
    import json

    saved = json.loads(Path(path).read_text())
    return plot(
        saved["rows"],
        saved["floors"],
        METRICS,
        Path(figure),
        f"sample quality against network evaluations (EMA weights; {saved['device']})",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--models", nargs="+", default=["two_moons", "digits"], choices=["two_moons", "digits"])
    parser.add_argument("--toy-ckpt", help="a toy2d.yaml checkpoint instead of training one")
    parser.add_argument("--digits-ckpt", help="a digits checkpoint instead of training one")
    parser.add_argument("--digits-steps", type=int, default=1500, help="training steps of the digits model")
    parser.add_argument("--toy-samples", type=int, default=4000)
    parser.add_argument("--digits-samples", type=int, default=400)
    parser.add_argument("--out", default="benchmarks/results/sampler_quality.json")
    parser.add_argument("--figure", default="benchmarks/results/sampler_quality.png")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from --out")
    args = parser.parse_args()
    if args.replot:
        print(f"wrote {replot(args.out, args.figure)}")
        return
    rows: list[dict[str, Any]] = []
    floors: dict[str, float] = {}
    metrics = METRICS
    seconds: dict[str, float] = {}
    if "two_moons" in args.models:
        g = torch.Generator().manual_seed(123)
        held_out, other = (sample_toy2d("two_moons", args.toy_samples, g)[0] for _ in range(2))
        floors["two moons"] = sliced_w2(other, held_out)
        start = time.perf_counter()
        module, trainer = train_toy(args)
        seconds["two moons"] = time.perf_counter() - start
        rows += sweep("two moons", module, trainer, args.toy_samples, args.steps, sliced_w2, held_out)
    if "digits" in args.models:
        data = ImageDataModule("digits", batch_size=64, val_fraction=0.1)
        data.setup("fit")
        train = images(data.train_dataloader())
        start = time.perf_counter()
        module, trainer = train_digits(args)
        seconds["digits"] = time.perf_counter() - start
        rows += sweep("digits", module, trainer, args.digits_samples, args.steps, digits_frechet, train, True)
    device = device_name(torch.device("cpu"))
    print(f"\ndevice: {device}; training seconds {seconds}; floors {floors}")
    print_table(rows, ["model", "sampler", "steps", "nfe", "vs_data", "vs_ddpm", "seconds"])
    summary = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ddpm1000 = next(r for r in rows if r["model"] == model and r["vs_ddpm"] == 0.0)
        again = [r for r in rows if r["model"] == model and r["sampler"] == OTHER_NOISE]
        best = best_at(rows, model, 10)
        summary.append(
            {
                "model": model,
                "ddpm_1000": ddpm1000["vs_data"],
                "best_at_10_nfe": best["vs_data"],
                "sampler": f"{best['sampler']} {best['steps']}",
                "ratio": best["vs_data"] / ddpm1000["vs_data"],
                "best_vs_ddpm": best["vs_ddpm"],
                # the noise floor of vs_ddpm: data vs data, or DDPM-1000 against itself from other noise
                "vs_ddpm_floor": floors[model] if model in floors else again[0]["vs_ddpm"],
            }
        )
    print_table(summary, ["model", "ddpm_1000", "best_at_10_nfe", "sampler", "ratio", "best_vs_ddpm", "vs_ddpm_floor"])
    write_json(
        args.out, {"device": device, "train_seconds": seconds, "floors": floors, "rows": rows, "summary": summary}
    )
    figure = plot(
        rows, floors, metrics, Path(args.figure), f"sample quality against network evaluations (EMA weights; {device})"
    )
    print(f"wrote {figure}")


if __name__ == "__main__":
    main()
