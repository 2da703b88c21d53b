"""The DDPM U-Net (Ho et al. 2020, appendix B), with the options of improved-diffusion.

Wide ResNet blocks with GroupNorm and dropout, the timestep embedding added in every block,
self-attention at chosen resolutions, skip connections between mirrored levels. With the
CIFAR-10 settings (ch=128, ch_mult=(1, 2, 2, 2), 2 blocks, attention at 16x16, dropout 0.1)
it has 35,746,307 parameters, the paper's 35.7 M.

Built for speed: attention through ``scaled_dot_product_attention`` on a channels-last view
(no copies), no data-dependent Python control flow in ``forward`` (``torch.compile`` traces
it whole), and nothing that breaks under bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .embeddings import TimestepEmbedding
from .registry import register_backbone

__all__ = ["UNet"]


def _zero(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Zero-initialise the last layer of a residual branch (Ho et al.'s init_scale=0), unless not ``enabled``."""
    if enabled:
        for p in module.parameters():
            nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> (+ time embedding) -> GroupNorm -> SiLU -> dropout -> conv, plus skip."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        embed_dim: int,
        dropout: float,
        groups: int,
        scale_shift: bool,
        eps: float,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(embed_dim, out_ch * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1), zero_init)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            # FiLM as in improved-diffusion: norm(h) * (1 + scale) + shift.
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, num_heads: int, groups: int, eps: float, zero_init: bool = True) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels), zero_init)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, HW, C): a free view when x is channels_last.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        q, k, v = self.qkv(tokens).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Strided 3x3 conv; ``bottom_right`` pads one pixel only after each axis (TensorFlow's 'SAME')."""

    def __init__(self, channels: int, padding: str = "symmetric") -> None:
        super().__init__()
        self.bottom_right = padding == "bottom_right"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.bottom_right else 1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if self.bottom_right:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@register_backbone("unet")
class UNet(nn.Module):
    """DDPM U-Net: x (B, C, H, W), t (B,), optional class labels cond (B,) -> (B, out_channels, H, W).

    Args:
        in_channels: image channels (3 for RGB, 1 for grey).
        out_channels: output channels; defaults to ``in_channels`` (use 2x for learned_range).
        image_size: ``H`` or ``(H, W)``; each must be divisible by 2^(len(ch_mult) - 1).
        ch: base channel count.
        ch_mult: channel multiplier per resolution level.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attn_resolutions: feature-map heights at which to add self-attention.
        dropout: dropout in every ResBlock.
        num_heads: attention heads (ignored when ``num_head_channels`` is set).
        num_head_channels: channels per attention head, instead of a fixed head count.
        scale_shift_norm: FiLM-style conditioning of the second GroupNorm (improved-diffusion).
        num_classes: class-conditional with this many classes plus one "null" label.
        norm_groups: GroupNorm groups (32 in the paper); every channel count must be divisible.
        gradient_checkpointing: recompute blocks in backward to save memory.
        norm_eps: epsilon of every GroupNorm (PyTorch's 1e-5 by default; the DDPM reference code
            and diffusers' DDPM checkpoints use 1e-6).
        downsample_padding: ``"symmetric"`` pads the strided downsampling conv by one pixel on every
            side; ``"bottom_right"`` pads one pixel only at the bottom and right, as TensorFlow's
            'SAME' padding in the DDPM reference code (diffusers' ``downsample_padding=0``).
        time_embed_cos_first: order the sinusoidal timestep features [cos, sin] instead of the
            reference code's [sin, cos] (diffusers' ``flip_sin_to_cos``).
        time_embed_freq_shift: frequencies w_k = 10000^(-k / (ch/2 - shift)); 1 is the reference
            code's spacing, 0 diffusers' default (its ``freq_shift``).
        conv_in_kernel: kernel size (odd) of the first convolution; 7 as in denoising-diffusion-pytorch.
        final_res_block: one more ResBlock, on the last decoder features concatenated with the first
            convolution's output, before the output head (denoising-diffusion-pytorch's ``final_res_block``).
        zero_init: zero-initialise the last layer of every residual branch and of the output head
            (Ho et al.); ``False`` keeps PyTorch's default initialisation everywhere.

    ``norm_eps`` to ``time_embed_freq_shift`` only exist to load weights trained with other conventions
    exactly (see ``lightning_ddpm.interop``); their defaults change nothing in the parameters or their
    names. The last three are architecture options; diffusers' ``UNet2DModel`` has no equivalent of
    their non-default values.

    The CIFAR-10 configuration ``UNet()`` (all defaults) has exactly 35,746,307 parameters.
    """

    # FSDP units under ModelParallelStrategy (backbones/sharding.py)
    shard_units = (ResBlock, AttentionBlock)

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        image_size: int | Sequence[int] = 32,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        num_head_channels: int | None = None,
        scale_shift_norm: bool = False,
        num_classes: int | None = None,
        norm_groups: int = 32,
        gradient_checkpointing: bool = False,
        norm_eps: float = 1e-5,
        downsample_padding: Literal["symmetric", "bottom_right"] = "symmetric",
        time_embed_cos_first: bool = False,
        time_embed_freq_shift: float = 1.0,
        conv_in_kernel: int = 3,
        final_res_block: bool = False,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if conv_in_kernel < 1 or conv_in_kernel % 2 == 0:
            raise ValueError(f"conv_in_kernel {conv_in_kernel} is not a positive odd number (3 by default)")
        if downsample_padding not in ("symmetric", "bottom_right"):
            raise ValueError(f"downsample_padding {downsample_padding!r} is not one of 'symmetric', 'bottom_right'")
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        factor = 2 ** (len(ch_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"image_size {height}x{width} is not divisible by 2^(len(ch_mult)-1) = {factor} "
                f"(ch_mult={tuple(ch_mult)}); pick a size that is, or fewer levels"
            )
        heights = [height // 2**i for i in range(len(ch_mult))]
        missing = sorted(set(attn_resolutions) - set(heights))
        if missing:
            raise ValueError(f"attn_resolutions {missing} are not feature-map heights of this U-Net: {heights}")
        widths = {ch * m for m in ch_mult} | {ch}
        bad = sorted(c for c in widths if c % norm_groups)
        if bad:
            raise ValueError(f"channel counts {bad} are not divisible by norm_groups={norm_groups}")

        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.image_size = (height, width)
        self.num_classes = num_classes
        self.gradient_checkpointing = gradient_checkpointing
        self._factor = factor
        embed_dim = 4 * ch
        self.embed = TimestepEmbedding(ch, embed_dim, num_classes, time_embed_cos_first, time_embed_freq_shift)

        def heads(channels: int) -> int:
            return channels // num_head_channels if num_head_channels else num_heads

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, embed_dim, dropout, norm_groups, scale_shift_norm, norm_eps, zero_init)

        def attn(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, heads(channels), norm_groups, norm_eps, zero_init)

        self.conv_in = nn.Conv2d(in_channels, ch, conv_in_kernel, padding=conv_in_kernel // 2)
        self.down = nn.ModuleList()
        skip_channels = [ch]
        current = ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(current, ch * mult)]
                current = ch * mult
                if heights[level] in attn_resolutions:
                    layers.append(attn(current))
                self.down.append(nn.ModuleList(layers))
                skip_channels.append(current)
            if level != len(ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(current, downsample_padding)]))
                skip_channels.append(current)

        self.mid = nn.ModuleList([res(current, current), attn(current), res(current, current)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for block in range(num_res_blocks + 1):
                layers = [res(current + skip_channels.pop(), ch * mult)]
                current = ch * mult
                if heights[level] in attn_resolutions:
                    layers.append(attn(current))
                if level != 0 and block == num_res_blocks:
                    layers.append(Upsample(current))
                self.up.append(nn.ModuleList(layers))

        # the decoder's output beside the first convolution's, as in denoising-diffusion-pytorch
        self.final = nn.ModuleList([res(current + ch, ch)]) if final_res_block else None
        current = ch if final_res_block else current
        self.out = nn.Sequential(
            nn.GroupNorm(norm_groups, current, eps=norm_eps),
            nn.SiLU(),
            _zero(nn.Conv2d(current, self.out_channels, 3, padding=1), zero_init),
        )

    def _run(self, layers: Any, h: Tensor, emb: Tensor) -> Tensor:  # an nn.ModuleList of (h, emb) layers
        for layer in layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, emb, use_reentrant=False)
            else:
                h = layer(h, emb)
        return h

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self._factor or x.shape[3] % self._factor:
            raise ValueError(f"input size {x.shape[2]}x{x.shape[3]} is not divisible by {self._factor}")
        emb = self.embed(t, cond)
        h = first = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb)
        if self.final is not None:
            h = self._run(self.final, torch.cat([h, first], dim=1), emb)
        return self.out(h)
