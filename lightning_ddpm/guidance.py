"""Classifier-free guidance (Ho & Salimans 2022): eps = eps_uncond + w (eps_cond - eps_uncond).

Every parameterization's output is an affine function of eps at fixed x_t (eps, x0, mu and v
all are), and the weights (1 - w, w) sum to one, so guiding the outputs directly is exactly
guiding eps, with no division by sqrt(alpha_bar) (safe at zero terminal SNR too). w = 0 is the
unconditional model, w = 1 the conditional one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ConditionalModel = Callable[[Tensor, Tensor, Tensor], Tensor]


def guided_denoiser(
    model: ConditionalModel, labels: Tensor, null_label: int, guidance_scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """``denoise_fn(x_t, t)`` for the samplers, guiding ``model(x_t, t, cond)`` towards ``labels``.

    Conditional and unconditional predictions come from one batched forward pass of 2B examples.
    For learned-variance outputs (2C channels) the mean half is guided and the conditional
    variance half is kept.
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    null = torch.full_like(labels, null_label)
    if guidance_scale == 0:
        return lambda x_t, t: model(x_t, t, null)
    if guidance_scale == 1:
        return lambda x_t, t: model(x_t, t, labels)

    def denoise_fn(x_t: Tensor, t: Tensor) -> Tensor:
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = both.chunk(2, dim=0)
        channels = x_t.shape[1] if x_t.ndim > 1 else 1
        mean = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([mean, cond[:, channels:]], dim=1) if cond.shape[1] > channels else mean

    return denoise_fn
