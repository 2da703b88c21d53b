"""The likelihood bound: Gaussian KL divergence and the discretized Gaussian decoder likelihood (in nats), and
the loops that add the bound's T terms up in bits/dim over a batch and over a dataset."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .dtypes import precise_dtype
from .noise import Generators
from .types import PredictFn, Prediction

__all__ = [
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "LN2",
    "BitsPerDim",
    "bits_per_dim_terms",
    "mean_bits_per_dim",
]

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


class BitsPerDim(NamedTuple):
    """NLL upper bound split into its terms, all in bits/dim: total = prior + terms.sum(1)."""

    total: Tensor  # (B,)
    prior: Tensor  # (B,) KL(q(x_T | x0) || N(0, I))
    terms: Tensor  # (B, T): decoder NLL at t = 0, KL terms at t > 0


class BoundProcess(Protocol):
    """What the bound's loops read from a diffusion (``GaussianDiffusion`` is one)."""

    @property
    def num_timesteps(self) -> int: ...

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None, generator: Generators = None) -> Tensor: ...

    def vlb_terms(
        self, model_output: Tensor | Prediction, x0: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> Tensor: ...

    def prior_bpd(self, x0: Tensor) -> Tensor: ...


@torch.no_grad()
def bits_per_dim_terms(
    diffusion: BoundProcess,
    denoise_fn: PredictFn,
    x0: Tensor,
    clip_denoised: bool = False,
    generator: Generators = None,
    callback: Callable[[int, int], None] | None = None,
) -> BitsPerDim:
    """The full bound L = L_T + sum_t L_{t-1} + L_0 in bits/dim, one model call per t.

    ``denoise_fn`` returns a raw network output or a :class:`Prediction` (e.g. a ``Denoiser``).
    Each term uses its own noise draw (unbiased, as in improved-diffusion), from ``generator`` or, given one
    generator per example, from example i's own (then its estimate does not depend on the batch). ``callback(i, T)``
    is called after each of the T terms, e.g. to drive a progress bar.
    """
    batch, T = x0.shape[0], diffusion.num_timesteps
    total_dtype = precise_dtype(x0.device)  # the sum of T terms: float64 where the device has it
    terms = torch.zeros(batch, T, device=x0.device, dtype=total_dtype)
    for i, step in enumerate(reversed(range(T))):
        t = torch.full((batch,), step, device=x0.device, dtype=torch.long)
        x_t = diffusion.q_sample(x0, t, generator=generator)
        terms[:, step] = diffusion.vlb_terms(denoise_fn(x_t, t), x0, x_t, t, clip_denoised=clip_denoised).to(
            total_dtype
        )
        if callback is not None:
            callback(i + 1, T)
    prior = diffusion.prior_bpd(x0).to(total_dtype)
    return BitsPerDim(prior + terms.sum(dim=1), prior, terms)


def mean_bits_per_dim(
    diffusion: BoundProcess,
    denoise_fn: PredictFn,
    batches: Iterable[Tensor],
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
) -> float:
    """Average bits/dim per example over an iterable of data batches (e.g. a dataloader's images)."""
    total, count = 0.0, 0
    for i, x0 in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        total += float(bits_per_dim_terms(diffusion, denoise_fn, x0, clip_denoised, generator).total.sum())
        count += x0.shape[0]
    if count == 0:
        raise ValueError("mean_bits_per_dim got no data")
    return total / count
