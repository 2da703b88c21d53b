"""Sampling speed: samples/s and wall time of DDPM (all T steps) and DDIM (10, 20, 50, 100 steps), fp32 and bf16.

    python benchmarks/sampling.py --model digits --batch-size 64
    python benchmarks/sampling.py --model cifar --accelerator cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from benchmarks.common import device_name, print_table, synchronize, write_json
from benchmarks.train_throughput import CIFAR_UNET
from lightning_ddpm import DDIMSampler, DDPMSampler, DiffusionModule

MODELS = {
    "cifar": (CIFAR_UNET, [3, 32, 32]),
    "digits": ({"name": "unet", "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2,
                                              "attn_resolutions": [4], "dropout": 0.1}}, [1, 8, 8]),
    "toy": ({"name": "mlp", "init_args": {"hidden_dim": 256, "num_blocks": 4}}, [2]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", choices=list(MODELS))
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--ddpm", action=argparse.BooleanOptionalAction, default=True, help="also all-T DDPM")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--out", default="benchmarks/results/sampling.json")
    args = parser.parse_args()
    device = torch.device(args.accelerator)
    backbone, shape = MODELS[args.model]
    module = DiffusionModule(backbone=backbone, data_shape=shape, clip_denoised=len(shape) == 3).to(device).eval()
    samplers = [(f"DDIM {n}", DDIMSampler(num_steps=n)) for n in args.ddim_steps]
    if args.ddpm:
        samplers.append((f"DDPM {module.diffusion.num_timesteps}", DDPMSampler()))
    rows = []
    for precision in args.precision:
        bf16 = precision == "bf16"
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        for name, sampler in samplers:
            with autocast:
                module.sample(args.batch_size, sampler=DDIMSampler(num_steps=2))  # warm-up
                synchronize(device)
                start = time.perf_counter()
                module.sample(args.batch_size, sampler=sampler, generator=torch.Generator(device).manual_seed(0))
                synchronize(device)
            wall = time.perf_counter() - start
            rows.append({"model": args.model, "sampler": name, "precision": precision, "batch": args.batch_size,
                         "wall_s": wall, "samples_per_s": args.batch_size / wall})
    print(f"device: {device_name(device)}")
    print_table(rows, ["model", "sampler", "precision", "batch", "wall_s", "samples_per_s"])
    write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
