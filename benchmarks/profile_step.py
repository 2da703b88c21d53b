"""Where a training step's time goes: ours and the peer side by side, by kind of operation.

Profiles forward + backward + Adam of the DDPM CIFAR-10 U-Net (ours, through the same
``training_losses`` the module trains with) and diffusers' ``UNet2DModel`` with the same
architecture, under ``torch.profiler``, and sums each operator's *self* time into categories
(convolutions, GroupNorm, attention, matmuls, dropout RNG, activations, copies, the rest), so the
categories add up to the step and nothing is counted twice.

    python -m benchmarks.profile_step --precision bf16-mixed
    python -m benchmarks.profile_step --precision 32-true --no-channels-last
    python -m benchmarks.profile_step --accelerator cuda --precision bf16-mixed --batch-size 128
"""

from __future__ import annotations

import argparse
import contextlib
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import DTYPES, device_name, print_table, synchronize, write_json
from benchmarks.train_throughput import make_ours, make_peer

# First match wins: (category, substrings of the aten operator name).
CATEGORIES = [
    ("convolution", ("convolution",)),
    ("group norm", ("group_norm",)),
    ("attention", ("scaled_dot_product", "_efficient_attention", "_flash_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("dropout RNG", ("bernoulli", "native_dropout")),
    ("activation", ("silu",)),
    ("copy / layout", ("copy_", "cat", "contiguous", "clone", "upsample")),
    (
        "elementwise",
        (
            "aten::add",
            "aten::mul",
            "aten::sub",
            "aten::div",
            "aten::addcmul",
            "aten::addcdiv",
            "aten::sqrt",
            "aten::pow",
            "aten::lerp",
            "aten::_foreach",
        ),
    ),
]


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(key in name for key in keys):
            return label
    return "other"


def profile(step: Callable[[], None], device: torch.device, steps: int, warmup: int = 2) -> dict[str, float]:
    """Self time in ms per category of one call of ``step``, averaged over ``steps`` calls (device time on
    CUDA, CPU time elsewhere)."""
    from torch.profiler import ProfilerActivity

    for _ in range(warmup):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        totals[category(event.key)] += us / 1e3 / steps
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="bf16-mixed", choices=list(DTYPES))
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per implementation (averaged)")
    parser.add_argument("--out", default="benchmarks/results/profile_step.json")
    args = parser.parse_args()
    device = torch.device("cuda:0" if args.accelerator == "cuda" else "cpu")
    dtype = DTYPES[args.precision]
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    x0 = (torch.rand(args.batch_size, 3, 32, 32, device=device) * 2 - 1).contiguous(memory_format=memory)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)

    ours = make_ours(args.channels_last).to(device)
    peer = make_peer().to(device, memory_format=memory)

    def training_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

        def step() -> None:
            with autocast:
                loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    noise = torch.randn_like(x0)
    x_t = ours.diffusion.q_sample(x0, t, noise)
    results = {
        "lightning-ddpm": profile(
            training_step(ours.backbone, lambda: ours.diffusion.training_losses(ours.network(), x0, t)["loss"].mean()),
            device,
            args.steps,
        ),
        "diffusers UNet2DModel": profile(
            training_step(peer, lambda: (peer(x_t, t).sample.float() - noise).pow(2).mean()), device, args.steps
        ),
    }
    names = [label for label, _ in CATEGORIES] + ["other"]
    rows = []
    for name in names + ["total"]:
        row = {"category": name}
        for impl, totals in results.items():
            ms = sum(totals.values()) if name == "total" else totals.get(name, 0.0)
            row[f"{impl} ms"] = ms
            row[f"{impl} %"] = 100 * ms / sum(totals.values())
        rows.append(row)
    print(
        f"device: {device_name(device)}; {args.precision}, batch {args.batch_size}, "
        f"{'channels-last' if args.channels_last else 'contiguous'}; "
        f"self time per training step, mean of {args.steps}"
    )
    print_table(rows, ["category"] + [f"{impl} {unit}" for impl in results for unit in ("ms", "%")])
    write_json(args.out, {"device": device_name(device), "torch": torch.__version__, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
