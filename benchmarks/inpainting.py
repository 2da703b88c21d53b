"""Inpainting held-out digits: does the completion keep the digit? RePaint against replacement and chance.

With a trained digits model (``lightning-ddpm fit --config digits``), complete the hidden part of held-out digits
(the split the model never saw) and ask the shipped digits classifier (``lightning_ddpm.metrics``, trained on
the training split by ``benchmarks/digits_classifier.py``) which digit each completion is:

- the originals (the classifier's ceiling) and the masked inputs alone (the hole grey: what the kept part tells);
- ``repaint`` (250 steps, jumps of 10, 10 times: 2410 evaluations), ``repaint`` without resampling
  (jump_n_sample 1: replacement with ancestral DDPM, 250 evaluations), DDIM 50 by replacement;
- unconditional samples from the same seeds (a mask of zeros): the agreement chance gives.

Writes a grid (original, masked, RePaint completion, DDIM replacement) and a JSON of the figures.

    python -m benchmarks.inpainting --ckpt outputs/digits/checkpoints/last.ckpt --mask bottom_half
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import device_name, print_table, write_json
from benchmarks.digits_classifier import accuracy, digits_split
from lightning_ddpm import DiffusionModule
from lightning_ddpm.data import named_mask
from lightning_ddpm.metrics import load_digits_classifier
from lightning_ddpm.training.plotting import save_edits_grid

METHODS = {
    "repaint 250/10/10": {"name": "repaint", "init_args": {"num_steps": 250, "jump_length": 10, "jump_n_sample": 10}},
    "repaint, no resampling": {"name": "repaint", "init_args": {"num_steps": 250, "jump_n_sample": 1}},
    "ddim 50, replacement": {"name": "ddim", "init_args": {"num_steps": 50}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a digits checkpoint (lightning-ddpm fit --config digits)")
    parser.add_argument("--mask", default="bottom_half", help="a named mask (lightning_ddpm.data.MASKS)")
    parser.add_argument("--num-images", type=int, default=180, help="held-out digits to complete (180: all)")
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--picture", default="docs/inpainting_digits.png")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    classifier, meta = load_digits_classifier()
    held_out_accuracy = meta["held_out_accuracy"]
    images, labels = digits_split("val")
    images, labels = images[: args.num_images], labels[: args.num_images]
    mask = named_mask(args.mask, 8, 8)
    module = DiffusionModule.load_from_checkpoint(args.ckpt, map_location="cpu")  # the EMA weights
    rows = [
        {"method": "originals (ceiling)", "accuracy": accuracy(classifier, images, labels), "evaluations": 0},
        {"method": "masked input alone", "accuracy": accuracy(classifier, images * mask, labels), "evaluations": 0},
    ]
    results = {}
    for name, spec in {**METHODS, "unconditional samples (chance)": "ddim_zero_mask"}.items():
        zero = spec == "ddim_zero_mask"
        sampler = METHODS["ddim 50, replacement"] if zero else spec
        out, start, calls = [], time.perf_counter(), [0]
        for first in range(0, len(images), args.batch_size):
            batch = images[first : first + args.batch_size]
            seeds = [torch.Generator().manual_seed(args.seed + first + i) for i in range(len(batch))]
            given = torch.zeros_like(mask) if zero else mask
            counter = (lambda i, n, x, p, calls=calls: calls.__setitem__(0, n)) if first == 0 else None  # noqa: E731
            out.append(module.inpaint(batch, given, sampler=sampler, generator=seeds, callback=counter))
        completed = torch.cat(out)
        results[name] = completed
        rows.append(
            {
                "method": name,
                "accuracy": accuracy(classifier, completed, labels),
                "evaluations": calls[0],
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(f"{name}: {rows[-1]['accuracy']:.3f}", flush=True)
    print(f"{device_name(torch.device('cpu'))}; classifier held-out accuracy {held_out_accuracy:.3f}")
    print_table(rows, ["method", "accuracy", "evaluations", "seconds"])
    shown = slice(0, 16)
    save_edits_grid(
        [
            images[shown],
            images[shown] * mask,
            results["repaint 250/10/10"][shown],
            results["ddim 50, replacement"][shown],
        ],
        Path(args.picture),
    )
    write_json(
        args.json,
        {
            "device": device_name(torch.device("cpu")),
            "mask": args.mask,
            "num_images": len(images),
            "classifier_held_out_accuracy": held_out_accuracy,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
