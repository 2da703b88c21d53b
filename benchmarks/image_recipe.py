"""An image recipe on a folder of shapes (benchmarks/shapes.py), trained through the CLI, then sampled.

    python -m benchmarks.image_recipe --config configs/imagefolder_cpu.yaml --steps 1500
    python -m benchmarks.image_recipe --config configs/imagefolder_cpu.yaml --steps 1500 \\
        --set model.parameterization=eps --set model.schedule=linear --set model.variance=fixed_large

Trains ``lightning-ddpm fit --config C`` on 2000 renders of 16x16 class-labelled shapes for ``--steps``
steps, then samples the EMA weights of its last checkpoint with each sampler: 64 per class with the
config's guidance. Per sampler: the share of pixels at +-1 (the data has none), the accuracy of a
classifier trained on fresh renders on the samples' requested classes (recognisable shapes), the
pixel std, seconds, and a grid PNG. ``--diagnose`` adds the error of the x0 prediction at high t on
fresh data: eps prediction divides eps errors by sqrt(alpha_bar_t), which is 0.0064 at t = T - 1 of the
linear schedule.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from benchmarks.common import device_name, print_table, write_json
from benchmarks.shapes import CLASSES, render_batch, train_classifier, write_folder

SAMPLERS = {
    "ddim50": {"name": "ddim", "init_args": {"num_steps": 50}},
    "dpmpp20": {"name": "dpmpp_2m", "init_args": {"num_steps": 20}},
    "unipc20": {"name": "unipc", "init_args": {"num_steps": 20}},
    "ddpm100": {"name": "ddpm", "init_args": {"num_steps": 100}},
    "ddpm1000": {"name": "ddpm"},
}


def train(config: str, folder: Path, root: Path, steps: int, sets: list[str]) -> tuple[Path, float]:
    from lightning_ddpm.cli import run_cli

    args = [
        "fit",
        "--config",
        config,
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.root={folder}",
        f"--trainer.max_steps={steps}",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.labels=true",
        *[f"--{s}" for s in sets],
    ]
    start = time.perf_counter()
    run_cli(args)
    return root / "checkpoints" / "last.ckpt", time.perf_counter() - start


@torch.no_grad()
def diagnose(module, image_size: int) -> list[dict]:
    """RMSE of the x0 prediction (unclipped) and of the implied eps on fresh renders, at high t."""
    x0, labels = render_batch(256, image_size, seed=777)
    denoiser, diffusion, rows = module.denoiser(), module.diffusion, []
    T = diffusion.num_timesteps
    for t_value in (T - 1, int(0.95 * T), int(0.8 * T), T // 2):
        g = torch.Generator().manual_seed(t_value)
        t = torch.full((len(x0),), t_value, dtype=torch.long)
        eps = torch.randn(x0.shape, generator=g)
        x_t = diffusion.q_sample(x0, t, eps)
        p = denoiser(x_t, t, labels)
        alpha_bar = float(diffusion.alphas_cumprod[t_value])
        rows.append(
            {
                "t": t_value,
                "sqrt_alpha_bar": math.sqrt(alpha_bar),
                "eps_rmse": float((p.eps - eps).pow(2).mean().sqrt()),
                "x0_rmse": float((p.x0 - x0).pow(2).mean().sqrt()),
                "x0_beyond_1": float((p.x0.abs() > 1).float().mean()),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/imagefolder_cpu.yaml")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="a CLI override without the leading --, e.g. model.parameterization=eps (repeatable)",
    )
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--per-class", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--work", default="benchmarks/results/image_recipe")
    parser.add_argument("--ckpt", help="sample this checkpoint instead of training")
    parser.add_argument("--diagnose", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/image_recipe.json")
    args = parser.parse_args()
    from torchvision.utils import save_image

    from lightning_ddpm import DiffusionModule

    work = Path(args.work)
    name = "_".join([Path(args.config).stem, str(args.steps), *[s.split(".")[-1].replace("=", "-") for s in args.set]])
    folder = work / f"shapes{args.image_size}"
    if not folder.is_dir():
        write_folder(folder, 2000, args.image_size, seed=0)
    train_s = None
    ckpt = Path(args.ckpt) if args.ckpt else None
    if ckpt is None:
        ckpt, train_s = train(args.config, folder, work / name, args.steps, args.set)
    classifier, accuracy = train_classifier(args.image_size)
    print(f"classifier accuracy on fresh renders: {accuracy:.4f}")
    module = DiffusionModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    h = module.hparams
    labels = torch.arange(len(CLASSES)).repeat_interleave(args.per_class)
    data, _ = render_batch(len(labels), args.image_size, seed=555)
    rows = [
        {
            "sampler": "data",
            "saturated_%": 100 * float((data.abs() > 0.98).float().mean()),
            "classifier_accuracy": accuracy,
            "std": float(data.std()),
            "seconds": 0.0,
        }
    ]
    for sampler in args.samplers:
        generators = [torch.Generator().manual_seed(i) for i in range(len(labels))]
        start = time.perf_counter()
        samples = module.sample(len(labels), sampler=SAMPLERS[sampler], generator=generators, labels=labels)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            predicted = classifier(samples.clamp(-1, 1)).argmax(1)
        save_image(
            (samples[:: max(1, args.per_class // 8)].clamp(-1, 1) + 1) / 2, work / f"{name}_{sampler}.png", nrow=8
        )
        rows.append(
            {
                "sampler": sampler,
                "saturated_%": 100 * float((samples.abs() > 0.98).float().mean()),
                "classifier_accuracy": float((predicted == labels).float().mean()),
                "std": float(samples.std()),
                "seconds": seconds,
            }
        )
        print_table(rows[-1:], list(rows[-1]))
    settings = {k: h[k] for k in ("parameterization", "schedule", "variance", "clip_denoised", "guidance_scale")}
    print(
        f"\n{name}: {settings}; {args.steps} steps, trained in {train_s} s; device {device_name(torch.device('cpu'))}"
    )
    print_table(rows, list(rows[0]))
    result = {
        "name": name,
        "settings": settings,
        "steps": args.steps,
        "train_s": train_s,
        "rows": rows,
        "device": device_name(torch.device("cpu")),
    }
    if args.diagnose:
        result["diagnosis"] = diagnose(module, args.image_size)
        print_table(result["diagnosis"], list(result["diagnosis"][0]))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
