"""Lightning overhead: DiffusionModule under Trainer.fit vs a minimal hand-written loop, same model and batches.

Both do the same work per step (q_sample, loss, backward, gradient clipping, Adam); the
Lightning side adds what the product adds (logging, quartile metrics, the non-finite check,
callbacks hooks). Rounds alternate; per-step times are pooled over the rounds. On a shared machine
other tenants only ever add time, so next to the median the 20th percentile (the less disturbed
steps) is reported as well; trust a figure only when the two agree.

    python benchmarks/overhead.py --model digits --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch

from benchmarks.common import device_name, print_table, write_json
from benchmarks.train_throughput import StepTimer
from lightning_ddpm import DiffusionModule

MODELS = {
    "toy": ({"name": "mlp", "init_args": {"hidden_dim": 256, "num_blocks": 4}}, [2], 256),
    "digits": ({"name": "unet", "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2,
                                              "attn_resolutions": [4], "dropout": 0.0}}, [1, 8, 8], 64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["toy", "digits"], choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    args = parser.parse_args()
    rows = []
    for name in args.model:
        backbone, shape, batch = MODELS[name]
        torch.manual_seed(0)
        module = DiffusionModule(backbone=backbone, data_shape=shape, lr_warmup_steps=0)
        data = torch.randn(batch * (args.steps + args.warmup), *shape)
        loader = torch.utils.data.DataLoader(data, batch_size=batch, drop_last=True)
        # the optimizer DiffusionModule builds by default: fused Adam
        optimizer = torch.optim.Adam(module.backbone.parameters(), lr=2e-4, fused=True)
        lightning_times, plain_times = [], []
        for _ in range(args.rounds):
            timer = StepTimer(args.warmup)
            pl.Trainer(accelerator="cpu", max_steps=args.steps + args.warmup, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                       callbacks=[timer]).fit(module, loader)
            lightning_times.extend(timer.times)
            times = []
            for i, x0 in enumerate(loader):
                start = time.perf_counter()
                t = torch.randint(0, 1000, (x0.shape[0],))
                loss = module.diffusion.training_losses(module.network(), x0, t)["loss"].mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.backbone.parameters(), 1.0)
                optimizer.step()
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
            plain_times.extend(times)
        lightning_s, plain_s = statistics.median(lightning_times), statistics.median(plain_times)
        lightning_p20, plain_p20 = (statistics.quantiles(x, n=5)[0] for x in (lightning_times, plain_times))
        rows.append({"model": name, "batch": batch, "plain_ms": plain_s * 1e3, "lightning_ms": lightning_s * 1e3,
                     "overhead_pct": 100 * (lightning_s / plain_s - 1),
                     "overhead_pct_p20": 100 * (lightning_p20 / plain_p20 - 1)})
    device = device_name(torch.device("cpu"))
    print(f"device: {device}")
    print_table(rows, ["model", "batch", "plain_ms", "lightning_ms", "overhead_pct", "overhead_pct_p20"])
    write_json(args.out, {"device": device, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
