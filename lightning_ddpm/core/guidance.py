"""Classifier-free guidance (Ho & Salimans 2022): eps = eps_uncond + w (eps_cond - eps_uncond).

The guided model is a denoiser like any other: it returns a :class:`Prediction`. At fixed x_t,
x0 is an affine function of eps, and the weights (1 - w, w) sum to one, so mixing x0 with the
same weights gives exactly the x0 of the guided eps, with no division by sqrt(alpha_bar) (safe
at zero terminal SNR too). w = 0 is the unconditional model, w = 1 the conditional one.
Clipping belongs after guidance: the samplers clip the guided prediction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .denoiser import Prediction

# model(x_t, t, cond) -> Prediction, e.g. a Denoiser.
ConditionalModel = Callable[[Tensor, Tensor, Tensor], Prediction]


def drop_labels(labels: Tensor, drop_prob: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """The training side: each label replaced by ``null_label`` with probability ``drop_prob``, so that one
    network learns the conditional and the unconditional model."""
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < drop_prob
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def guided_denoiser(
    model: ConditionalModel, labels: Tensor, null_label: int, guidance_scale: float
) -> Callable[[Tensor, Tensor], Prediction]:
    """``model(x_t, t) -> Prediction`` for the samplers, guiding ``model(x_t, t, cond)`` towards ``labels``.

    Conditional and unconditional predictions come from one batched forward pass of 2B examples.
    A learned variance (``variance_frac``) is the conditional model's.
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    null = torch.full_like(labels, null_label)
    if guidance_scale == 0:
        return lambda x_t, t: model(x_t, t, null)
    if guidance_scale == 1:
        return lambda x_t, t: model(x_t, t, labels)

    def guided(x_t: Tensor, t: Tensor) -> Prediction:
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
        frac = (None, None) if both.variance_frac is None else both.variance_frac.chunk(2, dim=0)
        cond, uncond = (Prediction(both.x0.chunk(2, dim=0)[i], both.eps.chunk(2, dim=0)[i], frac[i]) for i in (0, 1))
        return Prediction(
            torch.lerp(uncond.x0, cond.x0, guidance_scale),
            torch.lerp(uncond.eps, cond.eps, guidance_scale),
            cond.variance_frac,
        )

    return guided
