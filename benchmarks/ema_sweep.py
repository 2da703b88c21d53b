"""Post-hoc EMA on the digits model: which EMA length is best, measured after one training run.

Trains ``configs/digits.yaml`` (which tracks PostHocEMA's two profiles, sigma_rel 0.05 and 0.10, with snapshots
every 50 steps) once, or reads a run given with ``--run_dir``; then reconstructs the EMA for each sigma_rel of a
grid and scores it next to the classic ``EMA(decay=0.999)`` the config also keeps (the checkpoint's weights) and
the raw weights:

- the digits Frechet distance and KID (features of the shipped classifier, ``lightning_ddpm.metrics``) of
  ``--num_samples`` DDIM-50 samples against the training split, and the share of samples the classifier is
  confident about (p > 0.9); the held-out digits' own scores are the floor (KID is unbiased in the count; the
  Frechet distance is not, so it is also given for 180 samples, the held-out split's size, beside the floor);
- held-out bits/dim (the full bound, ``--bpd_examples`` held-out digits);
- a plot of all three against sigma_rel (``--plot``);
- with ``--spread N``, the mean and standard deviation of the sample scores over N more sampling seeds.

    python -m benchmarks.ema_sweep                          # train (about 7 minutes on 2 CPU threads), then sweep
    python -m benchmarks.ema_sweep --run_dir outputs/digits # sweep an existing run
    python -m benchmarks.ema_sweep --run_dir outputs/digits --sigma_rels 0.07 0.13 --spread 4 --no_bpd
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import device_name, print_table, write_json
from benchmarks.digits_classifier import digits_split
from benchmarks.metrics import DigitsScores, mean_sd
from lightning_ddpm import DDIMSampler, DiffusionModule
from lightning_ddpm.ema import list_snapshots, reconstruct

SIGMA_RELS = [0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25]


def train(run_dir: Path, steps: int) -> None:
    from lightning_ddpm.cli import run_cli

    run_cli(
        [
            "fit",
            "--config",
            "digits",
            f"--trainer.default_root_dir={run_dir}",
            f"--trainer.max_steps={steps}",
            "--trainer.enable_progress_bar=false",
        ]
    )


def score(
    module: DiffusionModule, scores: DigitsScores, held_out: torch.Tensor, args: Any, seed: int = 0, bpd: bool = True
) -> dict[str, float]:
    """The row's scores; sample i from seed 10000 * (seed + 1) + i (every row the same noise for one seed)."""
    generators = [torch.Generator().manual_seed(10_000 * (seed + 1) + i) for i in range(args.num_samples)]
    with torch.no_grad():
        samples = module.sample(args.num_samples, sampler=DDIMSampler(num_steps=50), generator=generators)
        row = scores(samples)
        row["frechet_180"] = scores(samples[: len(held_out)])["frechet"]
        if bpd:
            row["bpd_held_out"] = float(
                module.diffusion.mean_bits_per_dim(
                    module.denoiser(), [held_out[: args.bpd_examples]], generator=torch.Generator().manual_seed(0)
                )
            )
    return row


def spread(module: DiffusionModule, scores: DigitsScores, held_out: torch.Tensor, args: Any) -> dict[str, Any]:
    """Mean and standard deviation of the sample scores over ``args.spread`` sampling seeds (1, 2, ...)."""
    return mean_sd([score(module, scores, held_out, args, seed=s, bpd=False) for s in range(1, args.spread + 1)])


def load_params(module: DiffusionModule, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(state[name])


def plot(rows: list[dict[str, Any]], floor: dict[str, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [r for r in rows if isinstance(r["weights"], float)]
    x = [r["weights"] for r in swept]
    classic = next(r for r in rows if r["weights"] == "EMA(0.999)")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(
        axes, ("frechet", "kid", "bpd_held_out"), ("Frechet distance (digits features)", "KID", "held-out bits/dim")
    ):
        ax.plot(x, [r[key] for r in swept], "o-", label="post-hoc EMA")
        ax.axhline(classic[key], color="C1", ls="--", label="EMA(decay=0.999)")
        if key == "kid":  # unbiased in the count: the 180 held-out digits compare with the samples
            ax.axhline(floor[key], color="0.5", ls=":", label="held-out digits (floor)")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("sigma_rel")
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    axes[0].set_title("Frechet distance (digits features, 1000 samples)", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(step: int, device: str) -> str:
    return f"digits, {step} steps, post-hoc EMA from sigma_rel 0.05 and 0.10 snapshots every 50 steps ({device})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default=None, help="a digits run with PostHocEMA snapshots (default: train one)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps when training")
    parser.add_argument("--sigma_rels", type=float, nargs="+", default=SIGMA_RELS)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--bpd_examples", type=int, default=180)
    parser.add_argument("--spread", type=int, default=0, help="also score each row with this many more seeds")
    parser.add_argument("--no_bpd", action="store_true", help="skip bits/dim (and the plot): sample scores only")
    parser.add_argument("--out", default="benchmarks/results/ema_sweep.json")
    parser.add_argument("--plot", default="benchmarks/results/ema_sweep.png")
    parser.add_argument("--replot", default=None, help="redraw the plot from this JSON (written by a run) and stop")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        floor = next(r for r in saved["rows"] if r["weights"] == "held-out digits (floor)")
        plot(saved["rows"], floor, Path(args.plot), _title(saved["step"], saved["device"]))
        print(f"wrote {args.plot}")
        return

    run_dir = Path(args.run_dir or "benchmarks/results/ema_sweep_run")
    if args.run_dir is None:
        start = time.perf_counter()
        train(run_dir, args.steps)
        print(f"trained in {time.perf_counter() - start:.0f} s")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    module = DiffusionModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    (state,) = [s for k, s in checkpoint["callbacks"].items() if k.startswith("PostHocEMA")]
    snapshot_dir, run = Path(state["snapshot_dir"]), state["run"]
    step = max(s.step for s in list_snapshots(snapshot_dir) if s.run == run)

    train_images, held_out = digits_split("train")[0], digits_split("val")[0]
    scores = DigitsScores(train_images)
    floor = scores(held_out)
    floor["frechet_180"] = floor["frechet"]
    print(f"held-out digits (floor, {len(held_out)} images): {json.dumps(floor)}")
    classic = {k: v.clone() for k, v in module.state_dict().items()}
    rows: list[dict[str, Any]] = [{"weights": "held-out digits (floor)", **floor}]
    columns = ["weights", "frechet", "frechet_180", "kid", "confident", "bpd_held_out"]
    spreads: list[dict[str, Any]] = []
    for label, weights in (("EMA(0.999)", classic), ("raw", checkpoint["current_model_state"])):
        module.load_state_dict(weights)
        if args.spread and label != "raw":
            spreads.append({"weights": label, **spread(module, scores, held_out, args)})
        rows.append({"weights": label, **score(module, scores, held_out, args, bpd=not args.no_bpd)})
        print_table(rows[-1:], columns)
    for sigma_rel in args.sigma_rels:
        module.load_state_dict(classic)  # buffers; the parameters come next
        load_params(module, reconstruct(snapshot_dir, sigma_rel, run=run))
        if args.spread:
            spreads.append({"weights": sigma_rel, **spread(module, scores, held_out, args)})
        rows.append({"weights": sigma_rel, **score(module, scores, held_out, args, bpd=not args.no_bpd)})
        print_table(rows[-1:], columns)
    device = device_name(torch.device("cpu"))
    print(f"\ndevice: {device}; {step} training steps; {args.num_samples} DDIM-50 samples per row")
    print_table(rows, columns)
    if spreads:
        print(f"\nover {args.spread} more sampling seeds (mean, sd):")
        print_table(
            spreads, ["weights", *(f"{k}_{s}" for k in ("frechet", "kid", "confident") for s in ("mean", "sd"))]
        )
    payload = {"device": device, "step": step, "num_samples": args.num_samples, "rows": rows, "spread": spreads}
    write_json(args.out, payload)
    if args.no_bpd:
        return
    plot(rows, floor, Path(args.plot), _title(step, device))
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
