"""What the library asks of a backbone: ``forward(x, t, cond=None) -> output`` (a Protocol).

``tests/backbones/test_backbone_contract.py`` runs every registered backbone, and the custom one of
docs/backbones.md, over the inputs below.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Backbone"]


@runtime_checkable
class Backbone(Protocol):
    """The network a ``DiffusionModule`` trains and samples.

    Args of ``forward``:
        x: ``(B, *data_shape)``, the noisy data x_t.
        t: ``(B,)`` timesteps: int64 indices in [0, T) from training and the integer grids
            (DDPM, DDIM, leading / trailing / linspace), or floating values between two indices from
            Karras sigmas (``spacing: karras``), so the embedding of ``t`` must take fractions
            (sinusoidal features do; a lookup table such as ``nn.Embedding(T, d)`` does not).
        cond: ``None`` (unconditional), or ``(B,)`` int64 class labels in ``[0, num_classes]`` for a
            class-conditional backbone, where ``num_classes`` itself is the null label that
            classifier-free guidance trains and samples with.

    Returns ``(B, out_channels, *data_shape[1:])``: ``out_channels`` is the data's channels, twice
    that with ``variance: learned_range``. Constructor arguments named ``in_channels``,
    ``out_channels``, ``image_size`` or ``num_classes`` are filled from the data when a config
    leaves them out (``build_backbone(..., defaults=...)``).
    """

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor: ...
