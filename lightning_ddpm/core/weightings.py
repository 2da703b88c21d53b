"""Loss weightings: the per-example weight lambda_t of the MSE term, a registered object like the losses.

A weighting maps (diffusion, t, x) to a weight of shape (B,) on the parameterization's output-space MSE.
The x0-space weightings multiply by the parameterization's |d x0 / d output|^2 (``diffusion.x0_scale``),
so the same weighting means the same thing whatever the network predicts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Registry
from .types import Process
from .variances import Variance

__all__ = ["LossWeighting", "LOSS_WEIGHTINGS", "get_weighting", "available_weightings"]

LOSS_WEIGHTINGS: Registry[type[LossWeighting] | LossWeighting] = Registry("loss_weighting")


class LossWeighting:
    """Base class: ``weighting(diffusion, t, x) -> (B,)`` weights of the MSE term."""

    name: str = ""

    def check(self, variance: Variance) -> None:
        """Raise ``ValueError`` if this weighting is undefined for ``variance``."""

    def __call__(self, diffusion: Process, t: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@LOSS_WEIGHTINGS.register("none")
class NoWeighting(LossWeighting):
    """lambda_t = 1 on the output-space MSE: L_simple (Ho et al. 2020, eq. 14)."""

    name = "none"

    def __call__(self, diffusion: Process, t: Tensor, x: Tensor) -> Tensor:
        return torch.ones(t.shape[0], device=x.device, dtype=x.dtype)


@LOSS_WEIGHTINGS.register("elbo")
class ELBOWeighting(LossWeighting):
    """The weight that makes the MSE the bound's KL term (Ho et al. 2020, eq. 12 generalised):
    ||mu_tilde - mu_theta||^2 / (2 sigma_t^2) with d mu / d x0 = coef1; for eps it is
    beta^2 / (2 sigma^2 alpha (1 - alpha_bar)). Needs a fixed sigma_t^2."""

    name = "elbo"

    def check(self, variance: Variance) -> None:  # noqa: D102
        if variance.learned:
            raise ValueError(
                "loss_weighting='elbo' weights the MSE by 1 / (2 sigma_t^2) of a fixed variance, but "
                f"variance={variance.name!r} is learned; use loss='vlb' or 'hybrid' to train on the bound"
            )

    def __call__(self, diffusion: Process, t: Tensor, x: Tensor) -> Tensor:
        coef1 = diffusion.gather("posterior_mean_coef1", t, x).reshape(-1)
        return coef1**2 * diffusion.x0_scale(t, x) ** 2 / (2.0 * diffusion.elbo_sigma_sq(t, x))


@LOSS_WEIGHTINGS.register("min_snr")
class MinSNRWeighting(LossWeighting):
    """Min-SNR-gamma (Hang et al. 2023): the x0-space error weighted by min(snr_t, gamma)."""

    name = "min_snr"

    def __init__(self, min_snr_gamma: float = 5.0) -> None:
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.min_snr_gamma = float(min_snr_gamma)

    def __call__(self, diffusion: Process, t: Tensor, x: Tensor) -> Tensor:
        snr = diffusion.gather("snr", t, x).reshape(-1)
        return snr.clamp(max=self.min_snr_gamma) * diffusion.x0_scale(t, x) ** 2

    def __repr__(self) -> str:
        return f"MinSNRWeighting(min_snr_gamma={self.min_snr_gamma})"


def available_weightings() -> list[str]:
    return LOSS_WEIGHTINGS.names()


def get_weighting(name: str, **options: float) -> LossWeighting:
    """The weighting registered as ``name``, built with the ``options`` it takes (``min_snr_gamma``)."""
    return LOSS_WEIGHTINGS.build(name, **options)
