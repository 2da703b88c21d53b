"""What a batch may look like, and the checks on it (shared by the module and the callbacks)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["unpack_batch", "check_labels", "check_image_range"]

IMAGE_KEYS = ("x", "image", "images")
LABEL_KEYS = ("y", "label", "labels")


def unpack_batch(batch: Any, data_shape: Sequence[int] | None = None) -> tuple[Tensor, Tensor | None]:
    """``(x, labels or None)`` from a tensor, an ``(x, y)`` pair or a dict with 'x'/'image'/'images'
    and optional 'y'/'label'/'labels'. Checks ``x``'s example shape against ``data_shape`` (metadata
    only: nothing is read back from the device)."""
    if isinstance(batch, Tensor):
        x, y = batch, None
    elif isinstance(batch, (list, tuple)) and batch:
        x, y = batch[0], batch[1] if len(batch) > 1 else None
    elif isinstance(batch, dict):
        x = next((batch[k] for k in IMAGE_KEYS if k in batch), None)  # type: ignore[assignment]  # checked below
        y = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        if x is None:
            raise ValueError(f"dict batch needs one of the keys 'x', 'image', 'images'; got {sorted(batch)}")
    else:
        raise ValueError(f"batch must be a tensor, an (x, y) pair or a dict, got {type(batch).__name__}")
    if data_shape is not None and tuple(x.shape[1:]) != tuple(data_shape):
        raise ValueError(f"batch examples have shape {tuple(x.shape[1:])}, the model expects {tuple(data_shape)}")
    return x, y


def check_labels(labels: Tensor | None, batch_size: int, num_classes: int | None, values: bool = True) -> Tensor | None:
    """Labels for a model with ``num_classes`` (``None``: unconditional, labels are ignored).

    ``values=True`` also checks the range, which reads the labels back from the device: the training
    step does it on the first batch of each epoch only.
    """
    if num_classes is None:
        return None  # an unconditional model ignores dataset labels
    if labels is None:
        raise ValueError(f"the model is class-conditional (num_classes={num_classes}) but the batch has no labels")
    if labels.shape != (batch_size,) or labels.is_floating_point():
        raise ValueError(f"labels must be integers of shape ({batch_size},), got {labels.dtype} {tuple(labels.shape)}")
    if values and labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got range [{low}, {high}]")
    return labels.long()


def check_image_range(x: Tensor) -> None:
    """Image batches (B, C, H, W) should hold values in [-1, 1]: [0, 255] is refused, [0, 1] and other ranges
    (standardised images) are warned about.

    Reads the batch's range back from the device: the training step does it on the first batch of each epoch
    only. Other data (2-D points, vectors) is left alone, its scale is the user's."""
    if x.ndim != 4 or not x.is_floating_point() or not x.numel():
        return
    low, high = float(x.min()), float(x.max())
    if high > 10.0 or low < -10.0:
        raise ValueError(
            f"image batches must hold values in [-1, 1], got range [{low:.4g}, {high:.4g}]; "
            "scale [0, 255] images with x / 127.5 - 1 (the image DataModules do)"
        )
    if low >= 0.0 and 0.5 < high <= 1.0:
        warnings.warn(
            f"the image batch lies in [{low:.3g}, {high:.3g}], as [0, 1] images do; the model expects "
            "[-1, 1] (x * 2 - 1), which the image DataModules give",
            stacklevel=3,
        )
    elif high > 1.5 or low < -1.5:
        warnings.warn(
            f"the image batch lies in [{low:.3g}, {high:.3g}], outside [-1, 1]: image models expect [-1, 1] "
            "(clip_denoised clips samples to it); scale the images as the image DataModules do",
            stacklevel=3,
        )
