"""Sinusoidal timestep embedding (Vaswani et al. 2017, as used by Ho et al. 2020)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, cos_first: bool = False, freq_shift: float = 1.0
) -> Tensor:
    """(B,) timesteps -> (B, dim) features [sin(t w_k), cos(t w_k)], w_k = max_period^(-k / (dim/2 - freq_shift)).

    The defaults are the DDPM reference code's frequency spacing and order; ``cos_first`` and
    ``freq_shift=0`` give the other conventions in use (diffusers' ``flip_sin_to_cos`` and
    ``freq_shift``). An odd ``dim`` gets one zero pad.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
    exponent = exponent / max(half - freq_shift, 1)
    args = t.float()[:, None] * exponent.exp()[None, :]
    parts = [torch.cos(args), torch.sin(args)] if cos_first else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear, plus an optional class embedding.

    With ``num_classes`` set, the class table has ``num_classes + 1`` rows: the last one is the
    "null" label used for unconditional / classifier-free-guidance training. ``cond=None`` means null.
    """

    def __init__(
        self,
        base_dim: int,
        embed_dim: int,
        num_classes: int | None = None,
        cos_first: bool = False,
        freq_shift: float = 1.0,
    ) -> None:
        super().__init__()
        self.base_dim = base_dim
        self.cos_first = cos_first
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(base_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.num_classes = num_classes
        self.class_embedding = nn.Embedding(num_classes + 1, embed_dim) if num_classes is not None else None

    @property
    def null_label(self) -> int | None:
        return self.num_classes

    def forward(self, t: Tensor, cond: Tensor | None = None) -> Tensor:
        features = timestep_embedding(t, self.base_dim, cos_first=self.cos_first, freq_shift=self.freq_shift)
        emb = self.mlp(features.to(self.mlp[0].weight.dtype))  # type: ignore[arg-type]  # an nn.Linear's weight
        if self.class_embedding is None:
            if cond is not None:
                raise ValueError("cond (class labels) given to a backbone built without num_classes")
            return emb
        if cond is None:  # the null label (class_embedding exists: num_classes is set)
            cond = torch.full_like(t, self.num_classes or 0, dtype=torch.long)
        elif cond.shape != t.shape:
            raise ValueError(
                f"cond must hold one class label per example, shape {tuple(t.shape)}; got {tuple(cond.shape)}"
            )
        return emb + self.class_embedding(cond.long())
