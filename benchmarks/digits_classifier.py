"""Trains the digits classifier that ships with the package (``lightning_ddpm/metrics/digits_classifier.pt``): the
judge of whether a generated 8x8 digit is a digit, and the feature network of the digits Frechet distance.

Trained on the training split of ``ImageDataModule("digits")`` (the split ``configs/digits.yaml`` trains on),
deterministically (fixed seed; batch order and shifts from one generator; one thread), and scored on the held-out
split. ``--write`` stores the weights (float16) and that accuracy beside ``lightning_ddpm/metrics/digits.py``.

    python -m benchmarks.digits_classifier            # trains it and prints its held-out accuracy
    python -m benchmarks.digits_classifier --write    # ... and writes the package's weights file
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from lightning_ddpm.data import ImageDataModule
from lightning_ddpm.metrics import WEIGHTS, DigitsClassifier


def digits_split(split: str) -> tuple[Tensor, Tensor]:
    """Images in [-1, 1], (N, 1, 8, 8), and labels of the ``train`` or ``val`` split of the digits DataModule."""
    datamodule = ImageDataModule("digits", labels=True)
    datamodule.setup()
    dataset = datamodule._train if split == "train" else datamodule._val
    assert dataset is not None
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def train_digits_classifier(epochs: int = 40, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """The classifier trained on the training split (Adam, batch 64, random shifts of up to one pixel), rounded
    to float16 as the shipped file stores it, and its held-out accuracy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums in the same order on any machine with this torch build
    try:
        torch.manual_seed(seed)
        x, y = digits_split("train")
        model = DigitsClassifier()
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for start in range(0, len(x), 64):
                batch = order[start : start + 64]
                shift = torch.randint(-1, 2, (2,), generator=g).tolist()
                images = torch.roll(x[batch], shifts=shift, dims=(-2, -1))  # digits sit on a black background
                loss = nn.functional.cross_entropy(model(images), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model.eval().requires_grad_(False)
    held_x, held_y = digits_split("val")
    return model, accuracy(model, held_x, held_y)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    return float((model(images.float()).argmax(1) == labels).float().mean())


def write_weights(model: DigitsClassifier, held_out: float, epochs: int, seed: int) -> None:
    state = {k: v.half() for k, v in model.state_dict().items()}
    meta = {
        "held_out_accuracy": held_out,
        "epochs": epochs,
        "seed": seed,
        "torch": str(torch.__version__),
        # the CPU kernels torch picked (AVX2, AVX512, ...): they round differently, so bit-for-bit needs both
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    torch.save({"state_dict": state, "meta": meta}, WEIGHTS)
    print(f"wrote {WEIGHTS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="write the package's weights file")
    options = parser.parse_args()
    model, held_out = train_digits_classifier(options.epochs, options.seed)
    print(f"held-out accuracy {held_out:.4f} ({sum(p.numel() for p in model.parameters())} parameters)")
    if options.write:
        write_weights(model, held_out, options.epochs, options.seed)
