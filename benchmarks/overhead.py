"""Lightning overhead: DiffusionModule under Trainer.fit vs a minimal hand-written loop, same model and batches.

Three contenders do the same work per step (q_sample, loss, backward, gradient clipping, fused Adam):
- ``plain``: a hand-written loop;
- ``bare``: a minimal LightningModule doing exactly the plain loop's work under the same Trainer, i.e.
  what Lightning's own machinery (hooks, closures, optimizer wrappers) costs;
- ``ours``: DiffusionModule, which adds what the product adds (seeded per-step generators, the device-side
  non-finite guard, the epoch's loss metric by timestep quartile).
``overhead_pct`` (ours vs plain) is the figure the target is set on; ``lightning_pct`` (bare vs plain) and
``ours_vs_bare_pct`` split it into Lightning's part and ours.

On a shared machine the speed of the host drifts by tens of percent within a minute, far more than the
few percent measured here. So the contenders take short rounds in turn (the order rotating), each
round's median step time is compared with the other contenders' in the same round, and the figures are
the median over rounds of these paired ratios, with their interquartile range (``iqr``) as the spread.

    python -m benchmarks.overhead --model toy digits --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
from torch import Tensor

from benchmarks.common import device_name, print_table, write_json
from benchmarks.train_throughput import StepTimer
from lightning_ddpm import DiffusionModule

MODELS = {
    "toy": ({"name": "mlp", "init_args": {"hidden_dim": 256, "num_blocks": 4}}, [2], 256),
    "digits": (
        {
            "name": "unet",
            "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2, "attn_resolutions": [4], "dropout": 0.0},
        },
        [1, 8, 8],
        64,
    ),
}


def plain_loss(module: DiffusionModule, x0: Tensor) -> Tensor:
    t = torch.randint(0, module.diffusion.num_timesteps, (x0.shape[0],))
    return module.diffusion.training_losses(module.network(), x0, t)["loss"].mean()


class Bare(pl.LightningModule):
    """The plain loop's work as a LightningModule: Lightning's own cost, with nothing of ours."""

    def __init__(self, module: DiffusionModule) -> None:
        super().__init__()
        self.module = module

    def training_step(self, x0: Tensor, batch_idx: int) -> Tensor:
        return plain_loss(self.module, x0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.module.backbone.parameters(), lr=2e-4, fused=True)


def fit(model: pl.LightningModule, loader: torch.utils.data.DataLoader, steps: int, warmup: int) -> list[float]:
    timer = StepTimer(warmup)
    pl.Trainer(
        accelerator="cpu",
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[timer],
    ).fit(model, loader)
    return timer.times


def plain(module: DiffusionModule, loader: torch.utils.data.DataLoader, warmup: int) -> list[float]:
    # the optimizer DiffusionModule builds by default: fused Adam
    optimizer = torch.optim.Adam(module.backbone.parameters(), lr=2e-4, fused=True)
    times = []
    for i, x0 in enumerate(loader):
        start = time.perf_counter()
        loss = plain_loss(module, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.backbone.parameters(), 1.0)
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["toy", "digits"], choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    args = parser.parse_args()
    rows = []
    for name in args.model:
        backbone, shape, batch = MODELS[name]
        torch.manual_seed(0)
        module = DiffusionModule(backbone=backbone, data_shape=shape, lr_warmup_steps=0)
        data = torch.randn(batch * (args.steps + args.warmup), *shape)
        loader = torch.utils.data.DataLoader(data, batch_size=batch, drop_last=True)
        contenders = {
            "ours": lambda module=module, loader=loader: fit(module, loader, args.steps, args.warmup),
            "plain": lambda module=module, loader=loader: plain(module, loader, args.warmup),
            "bare": lambda module=module, loader=loader: fit(Bare(module), loader, args.steps, args.warmup),
        }
        medians: dict[str, list[float]] = {k: [] for k in contenders}
        for r in range(args.rounds):
            order = list(contenders)[r % 3 :] + list(contenders)[: r % 3]
            for key in order:
                medians[key].append(statistics.median(contenders[key]()))
        row = {"model": name, "batch": batch, **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in medians.items()}}
        for label, (a, b) in {
            "overhead": ("ours", "plain"),
            "lightning": ("bare", "plain"),
            "ours_vs_bare": ("ours", "bare"),
        }.items():
            ratios = [100 * (x / y - 1) for x, y in zip(medians[a], medians[b])]
            q1, q2, q3 = statistics.quantiles(ratios, n=4)
            row[f"{label}_pct"], row[f"{label}_iqr"] = q2, f"{q1:.1f}..{q3:.1f}"
        rows.append(row)
    device = device_name(torch.device("cpu"))
    print(f"device: {device}")
    print_table(
        rows,
        [
            "model",
            "batch",
            "plain_ms",
            "bare_ms",
            "ours_ms",
            "overhead_pct",
            "overhead_iqr",
            "lightning_pct",
            "lightning_iqr",
            "ours_vs_bare_pct",
            "ours_vs_bare_iqr",
        ],
    )
    write_json(args.out, {"device": device, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
