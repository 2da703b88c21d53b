"""The peer DDPM library of the digits ablation: lucidrains' denoising-diffusion-pytorch, trained in the same
Lightning loop as this library's models (same batches, optimizer, warm-up, EMA callback, gradient clipping).

It is an optional benchmark dependency (``pip install denoising-diffusion-pytorch``); nothing in the package
imports it. Two adapters:

- :class:`PeerModule`: the peer's own ``GaussianDiffusion`` (its loss, its weighting, its DDIM sampler) as a
  ``LightningModule``;
- the backbone ``peer_unet``: the peer's ``Unet`` behind this library's backbone contract, so that a
  ``DiffusionModule`` can train it, or sample and score a network the peer trained.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_ddpm.backbones import register_backbone
from lightning_ddpm.backbones.registry import BACKBONES
from lightning_ddpm.training.optim import make_optimizer

__all__ = ["PEER_UNET", "PeerModule", "peer_available", "register_peer_unet"]

# The peer's default U-Net at the digits' size: 0.83 M parameters (this library's digits U-Net: 1.0 M).
PEER_UNET: dict[str, Any] = {"name": "peer_unet", "init_args": {"dim": 32, "dim_mults": [1, 2]}}


def peer_available() -> bool:
    """Whether denoising-diffusion-pytorch can be imported."""
    try:
        import denoising_diffusion_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class PeerUnet(nn.Module):
    """The peer's ``Unet`` as a backbone: ``forward(x, t, cond=None)``; unconditional only."""

    def __init__(self, dim: int = 32, dim_mults: Sequence[int] = (1, 2), in_channels: int = 1) -> None:
        super().__init__()
        from denoising_diffusion_pytorch import Unet

        self.unet = Unet(dim=dim, dim_mults=tuple(dim_mults), channels=in_channels)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is not None:
            raise ValueError("peer_unet is unconditional; got class labels")
        return self.unet(x, t)


def register_peer_unet() -> None:
    """Register :class:`PeerUnet` as the backbone ``peer_unet`` (once)."""
    if "peer_unet" not in BACKBONES.names():
        register_backbone("peer_unet")(PeerUnet)


class PeerModule(pl.LightningModule):
    """The peer's default recipe on 8x8 digits: its ``Unet(dim=32, dim_mults=(1, 2))``, ``pred_v`` with its loss
    weight (alpha_bar_t on the v error, which makes it the eps-space error), the sigmoid schedule, T = 1000 and its
    DDIM sampler (eta 0, x0 clipped) over ``sampling_steps`` steps. Batches are (images in [-1, 1], labels)."""

    def __init__(self, lr: float = 1e-3, lr_warmup_steps: int = 200, sampling_steps: int = 50) -> None:
        super().__init__()
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet

        self.diffusion = GaussianDiffusion(
            Unet(dim=32, dim_mults=(1, 2), channels=1),
            image_size=8,
            timesteps=1000,
            sampling_timesteps=sampling_steps,
            objective="pred_v",
            beta_schedule="sigmoid",
        )
        self.lr, self.lr_warmup_steps = lr, lr_warmup_steps

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.diffusion((batch[0] + 1) / 2)  # the peer normalises [0, 1] images to [-1, 1] itself

    def configure_optimizers(self) -> Any:
        spec = {"name": "torch.optim.Adam", "init_args": {"lr": self.lr}}
        return make_optimizer(spec, list(self.diffusion.model.parameters()), self.lr_warmup_steps)

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> Tensor:
        """``n`` samples of the peer's own sampler in [-1, 1]; it draws from the global generator, seeded here."""
        os.environ.setdefault("TQDM_DISABLE", "1")  # the peer's sampling loop has a progress bar
        torch.manual_seed(seed)
        return self.diffusion.sample(batch_size=n) * 2 - 1
