"""Pictures of samples: image grids (torchvision) and 2-D scatter plots over the data (matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None, min_size: int = 32) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid; images smaller than ``min_size`` pixels are
    enlarged by an integer factor (nearest neighbour), so 8x8 digits stay visible."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    images = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    factor = math.ceil(min_size / min(images.shape[-2:]))
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    save_image(images, path, nrow=nrow, padding=max(1, factor))
    return path


def save_edits_grid(rows: list[Tensor], path: str | Path, per_row: int = 16) -> Path:
    """Before/after pictures: ``rows`` are equally shaped (N, C, H, W) image batches (e.g. originals, what the
    model was given, results) shown one above the other, ``per_row`` examples wide, in blocks of ``len(rows)``."""
    n = rows[0].shape[0]
    blocks = []
    for start in range(0, n, per_row):
        for row in rows:
            part = row[start : start + per_row]
            pad = per_row - part.shape[0] if n > per_row else 0  # the last block filled with black
            blocks.append(torch.cat([part, part.new_full((pad, *part.shape[1:]), -1.0)]) if pad else part)
    return save_image_grid(torch.cat(blocks), path, nrow=min(n, per_row))


def save_scatter(
    samples: Tensor,
    path: str | Path,
    reference: Tensor | None = None,
    labels: Tensor | None = None,
    title: str = "",
) -> Path:
    """Scatter (N, 2) samples (coloured by label when given) over reference data points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = samples.detach().float().cpu()
    fig, ax = plt.subplots(figsize=(5, 5))
    if reference is not None:
        ref = reference.detach().float().cpu()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="lightgray", alpha=0.6, label="data")
    if labels is not None:
        points = ax.scatter(samples[:, 0], samples[:, 1], s=2, c=labels.cpu(), cmap="tab10", alpha=0.7)
        ax.legend(*points.legend_elements(), loc="upper right", fontsize=7, title="class")
    else:
        ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:blue", alpha=0.6, label="samples")
        ax.legend(loc="upper right", markerscale=4)
    ax.set_title(title)
    ax.set_aspect("equal")
    lim = 1.5 if reference is None else float(reference.abs().max()) * 1.3
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_samples_picture(
    samples: Tensor, path: str | Path, reference: Tensor | None = None, labels: Tensor | None = None, title: str = ""
) -> Path:
    """A grid for image samples, a scatter plot for 2-D ones."""
    if samples.ndim == 4:
        return save_image_grid(samples, path)
    if samples.ndim == 2 and samples.shape[1] == 2:
        return save_scatter(samples, path, reference, labels, title)
    raise ValueError(f"no picture for samples of shape {tuple(samples.shape)} (images or 2-D points)")


def load_png(path: str | Path) -> Tensor:
    """(C, H, W) uint8 tensor of a PNG, for loggers that take images."""
    from torchvision.io import ImageReadMode, read_image

    return read_image(str(path), mode=ImageReadMode.RGB)
