"""Training throughput of DiffusionModule against diffusers' UNet2DModel (the DDPM CIFAR-10 network).

Ours runs the full Lightning training step (forward, loss, backward, optimizer, logging) through
``Trainer.fit``; the peer runs the same work in a minimal PyTorch loop. Rounds alternate between
the two in one process, and the median round is reported, so both see the same machine state.

    python -m benchmarks.train_throughput --precision 32-true bf16-mixed --batch-size 16
    python -m benchmarks.train_throughput --accelerator cuda --precision bf16-mixed --compile --batch-size 128
    python -m benchmarks.train_throughput --devices 2 --no-peer        # DDP, with scaling efficiency vs 1 device

Needs the bench extra for the peer: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks.common import DTYPES, count_flops, device_name, matmul_peak, print_table, synchronize, timed, write_json
from lightning_ddpm import DiffusionModule

CIFAR_UNET = {
    "name": "unet",
    "init_args": {"ch": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.1},
}


def make_ours(channels_last: bool) -> DiffusionModule:
    return DiffusionModule(
        backbone=CIFAR_UNET,
        data_shape=[3, 32, 32],
        schedule="linear",
        variance="fixed_large",
        channels_last=channels_last,
        lr_warmup_steps=0,
    )


def make_peer() -> nn.Module:
    from diffusers import UNet2DModel

    # up_block_types run from the lowest resolution up (4, 8, 16, 32), so attention at 16x16 is the
    # third entry. ("UpBlock2D", "AttnUpBlock2D", ...) puts it at 8x8: the same parameter count (all
    # three levels have 256 channels) but 3 of the 6 attention layers on 64 instead of 256 tokens,
    # which made the peer's step cheaper than ours. main() checks that both count the same FLOPs.
    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        dropout=0.1,
        attention_head_dim=None,
    )


class StepTimer(pl.Callback):
    """Seconds per training step after ``warmup`` steps (device-synchronised).

    The median also goes into ``trainer.callback_metrics["benchmark/step_s"]``, which Lightning's
    spawn launcher sends back from rank 0 to the main process (``times`` stays in the worker).
    """

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.times:
            trainer.callback_metrics["benchmark/step_s"] = torch.tensor(statistics.median(self.times))


def run_ours(args: argparse.Namespace, precision: str, module: DiffusionModule, devices: int) -> float:
    # Each of the `devices` ranks gets its own share (DistributedSampler) of warmup + steps batches.
    data = torch.rand(args.batch_size * devices * (args.warmup + args.steps), 3, 32, 32) * 2 - 1
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, drop_last=True)
    timer = StepTimer(args.warmup)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        precision=precision,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        strategy="ddp_spawn" if devices > 1 else "auto",
        callbacks=[timer],
    )
    trainer.fit(module, loader)
    step_s = trainer.callback_metrics.get("benchmark/step_s")
    return float(step_s) if step_s is not None else float("nan")


def run_peer(args: argparse.Namespace, precision: str, unet: nn.Module, device: torch.device) -> float:
    """The same training step in plain PyTorch: q_sample, eps MSE, backward, clip, Adam."""
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0).float().to(device)
    dtype = DTYPES[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    memory = torch.channels_last if args.channels_last else torch.contiguous_format

    def step() -> None:
        x0 = (torch.rand(args.batch_size, 3, 32, 32, device=device) * 2 - 1).to(memory_format=memory)
        t = torch.randint(0, 1000, (args.batch_size,), device=device)
        noise = torch.randn_like(x0)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        with autocast:
            pred = unet(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t).sample
            loss = nn.functional.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()

    for _ in range(args.warmup):
        step()
    return timed(step, device, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"], choices=list(DTYPES))
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action="store_true", help="torch.compile both backbones")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and the peer")
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    if args.accelerator == "cpu" and "16-mixed" in args.precision:
        # Lightning would silently train ours in bf16-mixed while the peer ran fp16 autocast.
        parser.error(
            "--precision 16-mixed needs --accelerator cuda: Lightning has no fp16 AMP on CPU "
            "(it falls back to bf16-mixed); use 32-true or bf16-mixed on CPU"
        )

    device = torch.device(args.accelerator if args.accelerator != "cuda" else "cuda:0")
    torch.manual_seed(0)
    ours = make_ours(args.channels_last)
    peer = make_peer().to(device) if args.peer else None
    if peer is not None and args.channels_last:
        peer = peer.to(memory_format=torch.channels_last)
    if args.compile:
        ours.backbone = torch.compile(ours.backbone)
        peer = torch.compile(peer) if peer is not None else None

    # FLOPs of one fp32 training step, per image (forward + backward), for both networks: a mismatch
    # means the two are not the same architecture and the comparison is void.
    probe = make_ours(False)
    x, t = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([10, 500])
    flops = count_flops(lambda: probe.diffusion.training_losses(probe.network(), x, t)["loss"].mean().backward()) / 2
    if args.peer:
        peer_probe = make_peer()
        peer_flops = count_flops(lambda: (peer_probe(x, t).sample - x).pow(2).mean().backward()) / 2
        if abs(peer_flops / flops - 1) > 0.01:
            raise RuntimeError(
                f"peer counts {peer_flops / 1e9:.2f} GFLOP per image, ours {flops / 1e9:.2f}: "
                "the two networks differ, fix make_peer() before comparing"
            )
    size = 4096 if device.type == "cuda" else 2048
    peaks = {p: matmul_peak(device, DTYPES[p] or torch.float32, size) for p in args.precision}

    def row(name: str, precision: str, devices: int, times: list[float]) -> dict[str, Any]:
        step_s = statistics.median(times)
        images = args.batch_size * devices / step_s
        achieved = images * flops
        # The peak is one device's, so the fraction is per device.
        return {
            "impl": name,
            "precision": precision,
            "batch": args.batch_size,
            "devices": devices,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "images_per_s": images,
            "step_ms": step_s * 1e3,
            "gflop_per_image": flops / 1e9,
            "achieved_tflops": achieved / 1e12,
            "peak_tflops": peaks[precision] / 1e12,
            "fraction_of_peak": achieved / devices / peaks[precision],
        }

    rows = []
    for precision in args.precision:
        ours_times, single_times, peer_times = [], [], []
        for _ in range(args.rounds):
            ours_times.append(run_ours(args, precision, ours, args.devices))
            if args.devices > 1:  # the 1-device reference for the scaling efficiency, in the same rounds
                single_times.append(run_ours(args, precision, ours, 1))
            if peer is not None:
                peer_times.append(run_peer(args, precision, peer, device))
        rows.append(row("lightning-ddpm", precision, args.devices, ours_times))
        if single_times:
            rows.append(row("lightning-ddpm", precision, 1, single_times))
            rows.append(
                {
                    "impl": f"scaling efficiency {args.devices} vs 1 device",
                    "precision": precision,
                    "images_per_s": rows[-2]["images_per_s"] / (args.devices * rows[-1]["images_per_s"]),
                }
            )
        if peer_times:
            rows.append(row("diffusers UNet2DModel", precision, 1, peer_times))
            rows.append(
                {
                    "impl": "ratio ours/peer (per device)",
                    "precision": precision,
                    "images_per_s": rows[-1]["step_ms"] / (1e3 * statistics.median(single_times or ours_times)),
                }
            )
    print(f"device: {device_name(device)}; training step {flops / 1e9:.1f} GFLOP per image")
    print_table(
        rows,
        [
            "impl",
            "precision",
            "batch",
            "devices",
            "images_per_s",
            "step_ms",
            "achieved_tflops",
            "peak_tflops",
            "fraction_of_peak",
        ],
    )
    write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
