"""Sampling speed: samples/s and wall time of any registered sampler at chosen step counts, fp32 and bf16.

``--samplers`` takes ``name:steps`` (``ddim:50``, ``dpmpp_2m:10``, ``heun:10``) or a bare name for its
default (``ddpm``: all T steps). The network evaluations (NFE) are listed next to the steps: Heun
costs 2N - 1 for N steps. Each figure is the median of ``--repeats`` timed runs after a warm-up run.

    python -m benchmarks.sampling --model digits --batch-size 64
    python -m benchmarks.sampling --model cifar --accelerator cuda --batch-size 256 1024 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time

import torch

from benchmarks.common import device_name, print_table, synchronize, write_json
from benchmarks.train_throughput import CIFAR_UNET
from lightning_ddpm import DiffusionModule
from lightning_ddpm.samplers import make_sampler

MODELS = {
    "cifar": (CIFAR_UNET, [3, 32, 32]),
    "digits": (
        {
            "name": "unet",
            "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2, "attn_resolutions": [4], "dropout": 0.1},
        },
        [1, 8, 8],
    ),
    "toy": ({"name": "mlp", "init_args": {"hidden_dim": 256, "num_blocks": 4}}, [2]),
}
DEFAULT_SAMPLERS = ["ddim:10", "ddim:20", "ddim:50", "dpmpp_2m:10", "dpmpp_2m:20", "unipc:10", "heun:10", "ddpm"]


def sampler_of(spec: str, num_timesteps: int) -> tuple[str, object, int]:
    """``name[:steps]`` -> (label, sampler, network evaluations)."""
    name, _, steps = spec.partition(":")
    sampler = make_sampler({"name": name, "init_args": {"num_steps": int(steps)} if steps else {}}, num_timesteps)
    n = sampler.num_steps or num_timesteps
    return f"{name} {n}", sampler, 2 * n - 1 if name == "heun" else n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", choices=list(MODELS))
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64])
    parser.add_argument("--samplers", nargs="+", default=DEFAULT_SAMPLERS, help="name[:steps], e.g. dpmpp_2m:10")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (module option compile)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (median)")
    parser.add_argument("--out", default="benchmarks/results/sampling.json")
    args = parser.parse_args()
    device = torch.device(args.accelerator)
    backbone, shape = MODELS[args.model]
    module = (
        DiffusionModule(backbone=backbone, data_shape=shape, clip_denoised=len(shape) == 3, compile=args.compile)
        .to(device)
        .eval()
    )
    samplers = [sampler_of(spec, module.diffusion.num_timesteps) for spec in args.samplers]
    rows = []
    for precision, batch, (name, sampler, nfe) in itertools.product(args.precision, args.batch_size, samplers):
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        )
        with autocast:
            module.sample(batch, sampler=make_sampler({"name": "ddim", "init_args": {"num_steps": 2}}))  # warm-up
            walls = []
            for _ in range(args.repeats):
                synchronize(device)
                start = time.perf_counter()
                module.sample(batch, sampler=sampler, generator=torch.Generator(device).manual_seed(0))
                synchronize(device)
                walls.append(time.perf_counter() - start)
        wall = statistics.median(walls)
        rows.append(
            {
                "model": args.model,
                "sampler": name,
                "nfe": nfe,
                "precision": precision,
                "batch": batch,
                "wall_s": wall,
                "samples_per_s": batch / wall,
            }
        )
        print(f"{name} (NFE {nfe}), {precision}, batch {batch}: {wall:.3g} s, {batch / wall:.4g} samples/s", flush=True)
    print(f"device: {device_name(device)}")
    print_table(rows, ["model", "sampler", "nfe", "precision", "batch", "wall_s", "samples_per_s"])
    write_json(
        args.out, {"device": device_name(device), "torch": torch.__version__, "compile": args.compile, "rows": rows}
    )


if __name__ == "__main__":
    main()
