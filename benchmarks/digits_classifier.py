"""A small digits classifier for the benchmarks: a judge of whether a generated 8x8 digit is the digit it should be.

Trained on the training split of ``ImageDataModule("digits")`` (the split ``configs/digits.yaml`` trains on),
deterministically (fixed seed, full-batch order from a generator), and scored on the held-out split.

    python -m benchmarks.digits_classifier        # trains it and prints its held-out accuracy
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ddpm.data import ImageDataModule


def digits_split(split: str) -> tuple[Tensor, Tensor]:
    """Images in [-1, 1], (N, 1, 8, 8), and labels of the ``train`` or ``val`` split of the digits DataModule."""
    datamodule = ImageDataModule("digits", labels=True)
    datamodule.setup()
    dataset = datamodule._train if split == "train" else datamodule._val
    assert dataset is not None
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


class DigitsClassifier(nn.Module):
    """Two 3x3 convolutions and a linear layer (about 25 k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.SiLU(),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(64 * 16, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def train_digits_classifier(epochs: int = 40, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """The classifier trained on the training split (Adam, batch 64, small random shifts), and its held-out
    accuracy."""
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
    model.eval()
    held_x, held_y = digits_split("val")
    return model, accuracy(model, held_x, held_y)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    return float((model(images.float()).argmax(1) == labels).float().mean())


if __name__ == "__main__":
    _, held_out = train_digits_classifier()
    print(f"held-out accuracy {held_out:.3f}")
