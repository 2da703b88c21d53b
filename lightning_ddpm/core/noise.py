"""Standard normal noise from one generator or one per example.

With one generator per example, example i's noise depends on ``generators[i]`` alone: a sample (or a bits/dim
estimate) does not depend on how the examples were batched or shared across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Generators", "randn", "noise_like"]

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """Standard normal noise of ``shape`` (batch first) from one generator or one per example."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def noise_like(x: Tensor, generator: Generators) -> Tensor:
    return randn(x.shape, generator, x.device, x.dtype)
