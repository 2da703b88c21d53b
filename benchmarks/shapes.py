"""A folder of small RGB images to try the image recipes on: coloured shapes on grey, one subfolder per class.

    python -m benchmarks.shapes data/shapes --num-images 2000 --image-size 16

Four classes (``disc``, ``square``, ``ring``, ``cross``), each a shape of a random colour, size and
position on a grey background, saved as PNG under ``<folder>/<class>/``: the layout
``ImageDataModule(dataset="imagefolder", labels=True)`` maps to labels 0-3 in sorted folder order.
``ShapeClassifier`` is a small CNN trained on fresh renders; its accuracy on a model's class-conditional
samples says whether they show the shape they were asked for.
"""

from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import torch
from torch import nn

CLASSES = ("cross", "disc", "ring", "square")  # sorted: the labels ImageDataModule gives the subfolders


def render(label: int, size: int, g: torch.Generator) -> torch.Tensor:
    """One image of class ``label`` in [0, 1], shape (3, size, size)."""
    hue, value = torch.rand(2, generator=g).tolist()
    colour = torch.tensor(colorsys.hsv_to_rgb(hue, 0.85, 0.6 + 0.4 * value))
    r = size * (0.22 + 0.12 * torch.rand((), generator=g).item())
    cx, cy = (size / 2 + (size / 2 - r - 1) * (2 * torch.rand(2, generator=g) - 1)).tolist()
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx, dy = xs - cx, ys - cy
    name = CLASSES[label]
    if name == "disc":
        mask = dx**2 + dy**2 <= r**2
    elif name == "ring":
        mask = (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.5 * r) ** 2)
    elif name == "square":
        mask = (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    else:
        arm = max(0.3 * r, 1.0)
        mask = ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    image = torch.full((3, size, size), 0.5)
    return torch.where(mask, colour[:, None, None], image)


def render_batch(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images in [-1, 1] and their labels, class ``i % 4`` for image ``i``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    return torch.stack([render(int(k), size, g) for k in labels]) * 2 - 1, labels


def write_folder(folder: str | Path, num_images: int = 2000, image_size: int = 16, seed: int = 0) -> Path:
    """``num_images`` PNGs under ``folder/<class>/``; returns the folder."""
    from PIL import Image

    folder = Path(folder)
    images, labels = render_batch(num_images, image_size, seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        pixels = ((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / CLASSES[label] / f"{i:05d}.png")
    return folder


class ShapeClassifier(nn.Module):
    """A small CNN for the four shapes (any image size divisible by 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, len(CLASSES)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifier(image_size: int, steps: int = 600, seed: int = 1000) -> tuple[ShapeClassifier, float]:
    """A classifier trained on fresh renders (other seeds than any folder's); returns it and its held-out accuracy."""
    torch.manual_seed(seed)
    model = ShapeClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    images, labels = render_batch(8192, image_size, seed)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (128,))
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out, held_labels = render_batch(2000, image_size, seed + 1)
    with torch.no_grad():
        accuracy = float((model(held_out).argmax(1) == held_labels).float().mean())
    return model.eval(), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = write_folder(args.folder, args.num_images, args.image_size, args.seed)
    print(
        f"wrote {args.num_images} images of {args.image_size}x{args.image_size} under {folder}/{{{','.join(CLASSES)}}}"
    )


if __name__ == "__main__":
    main()
