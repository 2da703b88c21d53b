"""The most precise float dtype a device has: float64 for the schedule constants and likelihood sums,
float32 on a device without float64 (Apple's MPS refuses it)."""

from __future__ import annotations

import torch

__all__ = ["NO_FLOAT64", "precise_dtype"]

# Device types without float64 (a test adds "cpu" to walk these paths on a CPU).
NO_FLOAT64 = {"mps"}


def precise_dtype(device: torch.device | str) -> torch.dtype:
    """float64 where ``device`` has it, else float32."""
    return torch.float32 if torch.device(device).type in NO_FLOAT64 else torch.float64
