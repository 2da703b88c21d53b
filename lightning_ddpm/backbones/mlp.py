"""A residual MLP for low-dimensional vector data (2-D toy distributions)."""

from __future__ import annotations

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
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int | None = None,
        hidden_dim: int = 256,
        num_blocks: int = 4,
        time_embed_dim: int = 128,
        num_classes: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.embed = TimestepEmbedding(time_embed_dim, time_embed_dim, num_classes)
        self.inp = nn.Linear(in_channels, hidden_dim)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden_dim, time_embed_dim, dropout) for _ in range(num_blocks))
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, self.out_channels))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"MLP expects x of shape (B, {self.in_channels}), got {tuple(x.shape)}")
        emb = self.embed(t, cond)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
