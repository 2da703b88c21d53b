"""Gaussian KL divergence and the discretized Gaussian decoder likelihood, in nats."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["normal_kl", "discretized_gaussian_log_likelihood", "mean_flat", "LN2"]

LN2 = math.log(2.0)

# Half a bin of 8-bit data scaled to [-1, 1] (Ho et al. 2020, eq. 13).
_HALF_BIN = 1.0 / 255.0


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) of 8-bit data in [-1, 1] under N(means, exp(log_scales)^2) integrated over x's bin.

    The edge bins extend to +-infinity (Ho et al. 2020, eq. 13). Elementwise, in nats.
    """
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (x - means + _HALF_BIN)
    lower = inv_std * (x - means - _HALF_BIN)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    # log(Phi(upper) - Phi(lower)) computed as log Phi(upper) + log1p(-Phi(lower)/Phi(upper)).
    log_prob_mid = log_cdf_upper + torch.log1p(
        -torch.exp(torch.special.log_ndtr(lower) - log_cdf_upper).clamp(max=1.0 - 1e-12)
    )
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_prob_mid))

