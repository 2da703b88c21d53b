"""The types the core's parts share, in a leaf module that imports nothing of the package.

The schedule constants at t (:class:`StepCoefficients`), the model's answer (:class:`Prediction`), the two
model signatures, and :class:`Process`: what a variance, a loss or a loss weighting reads from the diffusion.
Variances, losses and weightings type against :class:`Process` rather than ``GaussianDiffusion``, so none
of them imports the diffusion, not even for type checking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from torch import Tensor

__all__ = ["StepCoefficients", "Prediction", "DenoiseFn", "PredictFn", "Process"]


class StepCoefficients(NamedTuple):
    """Schedule constants gathered at t, each broadcastable against x_t."""

    sqrt_alpha_bar: Tensor
    sqrt_one_minus_alpha_bar: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor


class Prediction(NamedTuple):
    """What the model says about x_t at t.

    ``x0`` and ``eps`` satisfy x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps. ``variance_frac``
    is set for ``learned_range`` only: the weight v in log sigma^2 = v log beta + (1 - v) log beta_tilde
    (Nichol & Dhariwal 2021, eq. 15), kept as a fraction so a respaced process applies it to its
    own beta and beta_tilde.
    """

    x0: Tensor
    eps: Tensor
    variance_frac: Tensor | None = None


# A raw network ``denoise_fn(x_t, t) -> output`` (the output the parameterization interprets) ...
DenoiseFn = Callable[[Tensor, Tensor], Tensor]
# ... or a denoiser ``model(x_t, t) -> Prediction``. Samplers and bits/dim accept either.
PredictFn = Callable[[Tensor, Tensor], Prediction | Tensor]


class Process(Protocol):
    """What variances, losses, loss weightings and the denoiser read from a diffusion (``GaussianDiffusion`` is one)."""

    @property
    def num_timesteps(self) -> int: ...

    def gather(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """The schedule constant ``name`` at integer t, shaped (B, 1, ..., 1) in x's dtype."""
        ...

    def coefficients(self, t: Tensor, x: Tensor) -> StepCoefficients: ...

    def split_output(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]: ...

    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The network output that the true (x0, noise) map to: the regression target."""
        ...

    def predict(self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False) -> Prediction:
        """The network's output at (x_t, t) as a :class:`Prediction`."""
        ...

    def mse_weight(self, t: Tensor, x: Tensor) -> Tensor: ...

    def x0_scale(self, t: Tensor, x: Tensor) -> Tensor:
        """|d x0 / d output| of the parameterization at t, shape (B,)."""
        ...

    def elbo_sigma_sq(self, t: Tensor, x: Tensor) -> Tensor:
        """sigma_t^2 of a fixed reverse variance at t, shape (B,)."""
        ...

    def vlb_terms(
        self, model_output: Tensor | Prediction, x0: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> Tensor: ...
