"""Does the seeding rule of the starting noise change the digits Frechet distance?

The callbacks, ``predict`` and the editing requests give sample i a generator seeded ``seed + i``; the peer and
most loops draw a batch's noise from one generator. Both give independent standard normal noise, so the sample
scores should agree up to their spread over noise sets. This script measures that on one digits checkpoint:
``--sets`` noise sets of ``--num-samples`` per rule, each mapped by the same deterministic sampler (DDIM,
``--ddim-steps``) and scored with the shipped digits classifier (``benchmarks.metrics.DigitsScores``):

- ``batch``: one generator for the whole set (seed 9000000 + 7919 k for set k);
- ``seed+i``: the library's rule, sample i from seed 100000 (k + 1) + 37 + i;
- ``random seeds``: a generator per sample, seeded with independent random 62-bit integers.

``--draw d`` takes sets k + 1000 d in these formulas (and random seeds from another stream), so a second draw
repeats the comparison on noise disjoint from the first; ``--first-set K`` starts at set K instead of 0 (seed + i
seeds of the same size as draw 0's, other sets; the random seeds stay the draw's own stream). The rules take
turns in a rotating order. Prints each rule's mean and standard deviation, Welch's t-test between rules and the
predicted-class counts (chi-square), and writes the rows to ``--out``.

    python -m benchmarks.noise_rules --ckpt outputs/digits/checkpoints/last.ckpt --sets 15
    python -m benchmarks.noise_rules --ckpt outputs/digits/checkpoints/last.ckpt --sets 15 --draw 1
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import device_name, print_table, write_json
from benchmarks.digits_classifier import digits_split
from benchmarks.metrics import DigitsScores
from lightning_ddpm import DDIMSampler, DiffusionModule

RULES = ("batch", "seed+i", "random seeds")
SHAPE = (1, 8, 8)
DRAW_STRIDE = 1000  # set k of draw d is set k + 1000 d of draw 0: seeds stay below 2**32 for d < 40


def per_sample(seeds: Any) -> Tensor:
    """One generator per sample, as the library's callbacks draw."""
    return torch.cat([torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def noise(rule: str, k: int, n: int, rng: np.random.Generator, draw: int = 0) -> Tensor:
    """Noise set ``k`` of ``draw``; draws take disjoint seeds, and draw 0 is the one the first runs used."""
    k = k + DRAW_STRIDE * draw
    if rule == "batch":
        return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(9_000_000 + 7919 * k))
    if rule == "seed+i":
        base = 100_000 * (k + 1) + 37
        return per_sample(range(base, base + n))
    return per_sample(rng.integers(0, 2**62, n))


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rule: mean and standard deviation of each score, and Welch's p-value of its Frechet distance against
    the ``batch`` rule."""
    from scipy import stats

    frechet = {rule: [r["frechet"] for r in rows if r["rule"] == rule] for rule in RULES}
    out = []
    for rule in RULES:
        mine = [r for r in rows if r["rule"] == rule]
        row: dict[str, Any] = {"rule": rule, "sets": len(mine)}
        for key in ("frechet", "kid", "confident"):
            values = np.array([r[key] for r in mine])
            row[f"{key}_mean"], row[f"{key}_sd"] = values.mean(), values.std(ddof=1)
        row["p_vs_batch"] = stats.ttest_ind(frechet[rule], frechet["batch"], equal_var=False).pvalue
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a digits checkpoint (its state_dict: the EMA weights)")
    parser.add_argument("--sets", type=int, default=15, help="noise sets per rule")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--ddim-steps", type=int, default=10)
    parser.add_argument("--draw", type=int, default=0, help="which noise sets: 0 the first runs', 1, 2, ... fresh ones")
    parser.add_argument("--first-set", type=int, default=0, help="sets k = first_set .. first_set + sets - 1")
    parser.add_argument("--out", default="benchmarks/results/noise_rules.json")
    args = parser.parse_args()
    from scipy import stats

    module = DiffusionModule.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    scores = DigitsScores(digits_split("train")[0])
    rng = np.random.default_rng(12345 + args.draw)
    rows: list[dict[str, Any]] = []
    for k in range(args.first_set, args.first_set + args.sets):
        for rule in RULES[k % 3 :] + RULES[: k % 3]:
            start = time.perf_counter()
            with torch.no_grad():
                x_T = noise(rule, k, args.num_samples, rng, args.draw)
                samples = module.sample(args.num_samples, sampler=DDIMSampler(num_steps=args.ddim_steps), x_T=x_T)
                classes = scores.classifier(samples.clamp(-1, 1)).argmax(1).bincount(minlength=10)
            seconds = time.perf_counter() - start
            rows.append({"rule": rule, "set": k, **scores(samples), "classes": classes.tolist(), "s": seconds})
            print_table(rows[-1:], ["rule", "set", "frechet", "kid", "confident", "s"])
    table = summary(rows)
    counts = np.stack([np.sum([r["classes"] for r in rows if r["rule"] == rule], axis=0) for rule in RULES])
    p_classes = float(stats.chi2_contingency(counts).pvalue)
    device = device_name(torch.device("cpu"))
    print(f"\ndevice: {device}; {args.num_samples} DDIM-{args.ddim_steps} samples per set")
    print_table(table, ["rule", "sets", "frechet_mean", "frechet_sd", "p_vs_batch", "kid_mean", "confident_mean"])
    print(f"predicted classes per rule {counts.tolist()}: chi-square p {p_classes:.3f}")
    write_json(args.out, {"device": device, "args": vars(args), "rows": rows, "summary": table, "p_classes": p_classes})


if __name__ == "__main__":
    main()
