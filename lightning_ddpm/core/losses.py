"""Training losses: callables from (network output, x0, noise, x_t, t) to per-example terms.

In the manner of EDM's ``training/loss.py``: each loss is a few lines over what the diffusion
provides (the parameterization's target, the ELBO/Min-SNR weights, the bound's term at t).
Every loss returns ``loss`` (what to minimise, shape (B,)) and its parts (``mse``, ``vlb``); a loss
with a hyperparameter owns it (``HybridLoss(hybrid_lambda)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .likelihood import mean_flat
from .registry import Registry
from .types import Process

__all__ = ["Loss", "LOSSES", "get_loss", "available_losses"]

LOSSES: Registry[type[Loss] | Loss] = Registry("loss")


class Loss:
    """Base class."""

    name: str = ""
    needs_learned_variance: bool = False

    def __call__(
        self, diffusion: Process, output: Tensor, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@LOSSES.register("simple")
class SimpleLoss(Loss):
    """L_simple: the (weighted) MSE between the output and the parameterization's target (Ho et al. 2020, eq. 14)."""

    name = "simple"

    def __call__(self, diffusion, output, x0, noise, x_t, t):  # noqa: D102
        mean_out, _ = diffusion.split_output(output, x_t)
        mse = mean_flat((diffusion.target(x0, noise, x_t, t) - mean_out) ** 2)
        return {"mse": mse, "loss": diffusion.mse_weight(t, x_t) * mse}


@LOSSES.register("vlb")
class VLBLoss(Loss):
    """L_vlb: the bound's term at t in bits/dim (Ho et al. 2020, eq. 5)."""

    name = "vlb"

    def __call__(self, diffusion, output, x0, noise, x_t, t):  # noqa: D102
        vlb = diffusion.vlb_terms(output, x0, x_t, t)
        return {"vlb": vlb, "loss": vlb}


@LOSSES.register("hybrid")
class HybridLoss(Loss):
    """L_hybrid = L_simple + lambda L_vlb with the mean detached in L_vlb (Nichol & Dhariwal 2021, sec. 3.1):
    the bound trains only the variance channels. L_vlb = T E_t[L_t], so per example it is lambda T L_t."""

    name = "hybrid"
    needs_learned_variance = True

    def __init__(self, hybrid_lambda: float = 1e-3) -> None:
        self.hybrid_lambda = float(hybrid_lambda)

    def __call__(self, diffusion, output, x0, noise, x_t, t):  # noqa: D102
        terms = SimpleLoss()(diffusion, output, x0, noise, x_t, t)
        mean_out, var_out = diffusion.split_output(output, x_t)
        terms["vlb"] = diffusion.vlb_terms(torch.cat([mean_out.detach(), var_out], dim=1), x0, x_t, t)
        terms["loss"] = terms["loss"] + self.hybrid_lambda * diffusion.num_timesteps * terms["vlb"]
        return terms

    def __repr__(self) -> str:
        return f"HybridLoss(hybrid_lambda={self.hybrid_lambda})"


def available_losses() -> list[str]:
    return LOSSES.names()


def get_loss(name: str, **options: float) -> Loss:
    """The loss registered as ``name``, built with the ``options`` it takes (``hybrid_lambda``)."""
    return LOSSES.build(name, **options)
