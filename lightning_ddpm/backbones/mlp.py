"""A residual MLP for low-dimensional vector data (2-D toy distributions)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .embeddings import TimestepEmbedding
from .registry import register_backbone


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(embed_dim, width)
        self.fc2 = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width))

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(self.fc1(nn.functional.silu(self.norm(h))) + self.emb(emb))


class FourierFeatures(nn.Module):
    """x -> [x, sin(2 pi B x), cos(2 pi B x)] with a fixed random B ~ N(0, scale^2) (Tancik et al. 2020):
    lets a small MLP resolve fine 2-D structure that it would otherwise smooth over.

    Args:
        x_scale: multiplies the x passed through beside the features (1: x as it is). The sinusoids
            repeat, so far from the data they look like some point inside it; only x itself says how far
            out a point lies, and among 2 * num_features sinusoids it gets little weight unless scaled up
            (MLP's ``fourier_x_scale``).
    """

    def __init__(self, in_features: int, num_features: int, scale: float, seed: int = 0, x_scale: float = 1.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("B", torch.randn(in_features, num_features, generator=g) * scale)
        self.out_features = in_features + 2 * num_features
        self.x_scale = x_scale

    B: Tensor  # the random frequencies, a buffer

    def forward(self, x: Tensor) -> Tensor:
        proj = 2 * math.pi * x @ self.B.to(x.dtype)
        return torch.cat([x * self.x_scale if self.x_scale != 1 else x, proj.sin(), proj.cos()], dim=-1)


@register_backbone("mlp")
class MLP(nn.Module):
    """Residual MLP denoiser: x (B, in_channels), t (B,) -> (B, out_channels).

    Args:
        in_channels: data dimension (2 for 2-D toy data).
        out_channels: output dimension; defaults to ``in_channels`` (2x for learned_range).
        hidden_dim: width of the residual stream.
        num_blocks: number of residual blocks, each with the time embedding added.
        time_embed_dim: width of the sinusoidal features and of the embedding MLP.
        num_classes: enables class conditioning (with one extra "null" label).
        dropout: dropout inside each block.
        fourier_features: map x through this many random Fourier features first (0: x as it is).
            ``configs/toy2d.yaml`` uses 64 with ``fourier_scale`` 2.0, which is what lets the MLP separate
            eight Gaussians in 3000 steps (docs/benchmarks.md, "Sample quality"). Off by default so that checkpoints
            saved without the option keep loading.
        fourier_scale: standard deviation of the Fourier frequencies, in cycles per data unit (data
            about [-1, 1]; larger scales resolve finer detail and fit noisier).
        fourier_x_scale: with ``fourier_features``, multiplies the raw x that enters beside the features.
            At 1 (the default, as before the option) samples on data the recipe was not chosen on left
            ~0.1-0.4% far strays: started in the tail of x_T, they stay outside the data while the
            features, which repeat, make the far points look like inner ones. ``configs/toy2d.yaml`` uses
            32, so that the first layer sees how far out a point is (docs/benchmarks.md, "Far strays"). No parameters
            change: checkpoints load either way.
    """

    # FSDP units under ModelParallelStrategy (backbones/sharding.py)
    shard_units = (_ResidualBlock,)

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int | None = None,
        hidden_dim: int = 256,
        num_blocks: int = 4,
        time_embed_dim: int = 128,
        num_classes: int | None = None,
        dropout: float = 0.0,
        fourier_features: int = 0,
        fourier_scale: float = 1.0,
        fourier_x_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.embed = TimestepEmbedding(time_embed_dim, time_embed_dim, num_classes)
        self.features = (
            FourierFeatures(in_channels, fourier_features, fourier_scale, x_scale=fourier_x_scale)
            if fourier_features
            else None
        )
        self.inp = nn.Linear(self.features.out_features if self.features else in_channels, hidden_dim)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden_dim, time_embed_dim, dropout) for _ in range(num_blocks))
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, self.out_channels))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"MLP expects x of shape (B, {self.in_channels}), got {tuple(x.shape)}")
        emb = self.embed(t, cond)
        h = self.inp(self.features(x) if self.features is not None else x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
