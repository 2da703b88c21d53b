"""GaussianDiffusion: the forward process, the posterior, the reverse step and respacing.

Plain PyTorch. The network is any ``denoise_fn(x_t, t) -> output`` whose output the chosen
parameterization interprets (2x channels on dim 1 for ``learned_range``); :meth:`GaussianDiffusion.predict`
turns that output into a :class:`~lightning_ddpm.core.denoiser.Prediction`, the only thing samplers,
guidance and bits/dim look at.

What lives elsewhere, with entry points here of the same names: reading the network's output
(``core/denoiser.py``), the losses and their weightings (``core/losses.py``, ``core/weightings.py``),
the bits/dim loops (``core/likelihood.py``) and the sigma <-> t map (``core/sigmas.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .denoiser import clip_x0, interpret, split_output
from .dtypes import precise_dtype
from .likelihood import (
    LN2,
    BitsPerDim,
    bits_per_dim_terms,
    discretized_gaussian_log_likelihood,
    mean_bits_per_dim,
    mean_flat,
    normal_kl,
)
from .losses import Loss, available_losses, get_loss
from .noise import Generators, randn
from .parameterizations import available_parameterizations, get_parameterization
from .schedules import NoiseSchedule
from .sigmas import log_sigma_at, log_sigmas_of
from .types import DenoiseFn, PredictFn, Prediction, StepCoefficients
from .variances import available_variances, get_variance
from .weightings import LossWeighting, available_weightings, get_weighting

__all__ = ["GaussianDiffusion", "ReverseStep", "BitsPerDim", "VARIANCES", "LOSSES", "LOSS_WEIGHTINGS"]

# The built-in names (the registries in variances.py, losses.py and weightings.py take more).
VARIANCES = tuple(available_variances())
LOSSES = tuple(available_losses())
LOSS_WEIGHTINGS = tuple(available_weightings())


class ReverseStep(NamedTuple):
    """p(x_{t-1} | x_t) = N(mean, variance) and the predictions it was built from."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_x0: Tensor
    pred_eps: Tensor


class GaussianDiffusion(nn.Module):
    """DDPM forward/reverse process over a :class:`NoiseSchedule`.

    Args:
        schedule: the noise schedule (T steps).
        parameterization: ``eps``, ``x0``, ``mu`` or ``v``.
        variance: ``fixed_small`` (beta_tilde), ``fixed_large`` (beta) or ``learned_range``
            (Nichol & Dhariwal 2021, eq. 15; the model outputs 2x channels).
        loss: ``simple`` (MSE on the target), ``vlb`` (the true bound's term at t, bits/dim)
            or ``hybrid`` (simple + hybrid_lambda * T * vlb with the mean detached); any name in
            ``core.losses.LOSSES``, or a :class:`~lightning_ddpm.core.losses.Loss`.
        loss_weighting: ``none``, ``elbo`` (Ho et al.'s lambda_t, so the MSE equals the KL
            term) or ``min_snr`` (Hang et al. 2023). Applies to the MSE term. Any name in
            ``core.weightings.LOSS_WEIGHTINGS``, or a :class:`~lightning_ddpm.core.weightings.LossWeighting`.
        min_snr_gamma: gamma of Min-SNR-gamma (given to a weighting by name that takes it).
        hybrid_lambda: lambda of L_hybrid, 0.001 in Nichol & Dhariwal (given to a loss by name that takes it).
        clip_denoised: default for clipping pred_x0 to [-1, 1] when sampling and in bits/dim.
    """

    # The schedule constants, registered as (non-persistent) buffers in __init__ (see _constants).
    betas: Tensor
    alphas_cumprod: Tensor
    log_sigmas: Tensor

    def __init__(
        self,
        schedule: NoiseSchedule,
        parameterization: str = "eps",
        variance: str = "fixed_small",
        loss: str | Loss = "simple",
        loss_weighting: str | LossWeighting = "none",
        min_snr_gamma: float = 5.0,
        hybrid_lambda: float = 1e-3,
        clip_denoised: bool = False,
    ) -> None:
        super().__init__()
        param = get_parameterization(parameterization)
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.var = get_variance(variance)
        self.loss_fn = loss if isinstance(loss, Loss) else get_loss(loss, hybrid_lambda=hybrid_lambda)
        self.weighting = (
            loss_weighting
            if isinstance(loss_weighting, LossWeighting)
            else get_weighting(loss_weighting, min_snr_gamma=min_snr_gamma)
        )
        if self.loss_fn.needs_learned_variance and not self.var.learned:
            raise ValueError(
                "loss='hybrid' trains the variance through the VLB term and needs variance='learned_range'; "
                f"got variance={variance!r} (use loss='simple' or 'vlb' with a fixed variance)"
            )
        self.weighting.check(self.var)
        if schedule.has_zero_terminal_snr and not param.zero_terminal_snr:
            usable = " or ".join(
                repr(n) for n in available_parameterizations() if get_parameterization(n).zero_terminal_snr
            )
            raise ValueError(
                f"a zero-terminal-SNR schedule cannot recover x0 from parameterization={parameterization!r} "
                f"at the last step; use parameterization={usable} (Lin et al. 2024)"
            )
        self.schedule = schedule
        self.parameterization = parameterization
        self.param = param
        self.variance = variance
        self.loss_type = loss if isinstance(loss, str) else loss.name
        self.loss_weighting = loss_weighting if isinstance(loss_weighting, str) else loss_weighting.name
        self.min_snr_gamma = float(getattr(self.weighting, "min_snr_gamma", min_snr_gamma))
        self.hybrid_lambda = float(getattr(self.loss_fn, "hybrid_lambda", hybrid_lambda))
        self.clip_denoised = clip_denoised
        for name, value in self._constants().items():
            self.register_buffer(name, value, persistent=False)

    # -- constants -------------------------------------------------------------------------

    def _constants(self) -> dict[str, Tensor]:
        s = self.schedule
        ab = s.alphas_cumprod
        # fixed_large uses beta_t, but beta_tilde_2 at t = 0 for a better decoder (Ho et al.'s code).
        large = torch.cat([s.posterior_variance[1:2], s.betas[1:]]) if s.num_timesteps > 1 else s.betas
        return {
            "betas": s.betas,
            "log_betas": s.betas.log(),
            "alphas_cumprod": ab,
            "sqrt_alphas_cumprod": ab.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ab).sqrt(),
            "posterior_variance": s.posterior_variance,
            "posterior_log_variance_clipped": s.posterior_log_variance_clipped,
            "posterior_mean_coef1": s.posterior_mean_coef1,
            "posterior_mean_coef2": s.posterior_mean_coef2,
            "large_variance": large,
            "large_log_variance": large.log(),
            "snr": s.snr,
            # log sigma = log sqrt((1 - alpha_bar) / alpha_bar): fractional timesteps interpolate it.
            "log_sigmas": log_sigmas_of(ab),
        }

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GaussianDiffusion:
        # Moving is fine, casting is not: the constants never go through ``fn`` (``.half()`` or bf16-true would
        # round them, and a device without float64, MPS, refuses them). ``fn`` moves empty float32 stand-ins,
        # which tell the new device; the constants are re-derived in float64 on the host and moved there, in
        # float64 where the device has it and float32 elsewhere.
        constants = self._constants()
        for name in constants:
            self._buffers[name] = torch.empty(0, device=self.betas.device)
        super()._apply(fn, recurse)
        device = self.betas.device
        dtype = precise_dtype(device)
        for name, value in constants.items():
            self._buffers[name] = value.to(dtype).to(device)  # cast on the host: MPS cannot hold the float64
        return self

    def gather(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """The schedule constant ``name`` at integer t, reshaped to (B, 1, ..., 1) in x's dtype."""
        buffer = self._buffers[name]
        assert buffer is not None  # every constant is registered with a tensor
        values = buffer[t.to(self.betas.device)]
        return values.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def output_channels_factor(self) -> int:
        """How many times the data's channels the model must output (2 for learned_range)."""
        return self.var.output_factor

    def coefficients(self, t: Tensor, x: Tensor) -> StepCoefficients:
        """Schedule constants at integer ``t``; at fractional ``t`` (between two indices) alpha_bar comes
        from :meth:`alpha_bar_at` and the posterior constants, defined only for integer steps, are NaN."""
        if t.is_floating_point():
            ab = self.alpha_bar_at(t).to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            nan = torch.full_like(ab, float("nan"))
            return StepCoefficients(ab.sqrt(), (1.0 - ab).sqrt(), nan, nan)
        return StepCoefficients(
            self.gather("sqrt_alphas_cumprod", t, x),
            self.gather("sqrt_one_minus_alphas_cumprod", t, x),
            self.gather("posterior_mean_coef1", t, x),
            self.gather("posterior_mean_coef2", t, x),
        )

    def alpha_bar_at(self, t: Tensor) -> Tensor:
        """alpha_bar at (possibly fractional) timesteps on the schedule's device (float64 where it has it).

        Between two indices log sigma is interpolated linearly (:mod:`~lightning_ddpm.core.sigmas`, the
        inverse of its ``sigma_to_t``).
        """
        t = t.to(self.betas.device)
        if not t.is_floating_point():
            return self.alphas_cumprod[t]
        log_sigma = log_sigma_at(t, self.log_sigmas)
        return torch.sigmoid(-2.0 * log_sigma)

    # -- forward process -------------------------------------------------------------------

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_t | x0) = N(sqrt(alpha_bar) x0, (1 - alpha_bar) I): (mean, variance, log_variance)."""
        mean = self.gather("sqrt_alphas_cumprod", t, x0) * x0
        variance = (1.0 - self.gather("alphas_cumprod", t, x0)).expand_as(x0)
        return mean, variance, variance.log()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None, generator: Generators = None) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4); the noise from
        ``generator``, or from ``generator[i]`` for example i when given one per example."""
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        return (
            self.gather("sqrt_alphas_cumprod", t, x0) * x0 + self.gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x0): (mean, variance, clipped log-variance); Ho et al. 2020, eq. 6-7."""
        mean = self.gather("posterior_mean_coef1", t, x_t) * x0 + self.gather("posterior_mean_coef2", t, x_t) * x_t
        variance = self.gather("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self.gather("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # -- reverse process -------------------------------------------------------------------

    def split_output(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split the model output into (mean part, variance part or None), checking its shape."""
        return split_output(model_output, x_t, self.var)

    def predict(self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False) -> Prediction:
        """The network's output at (x_t, t) as a :class:`Prediction` (the parameterization's x0 and eps)."""
        prediction = interpret(model_output, x_t, t, self.param, self.var, self.coefficients(t, x_t))
        return self.clip(prediction, x_t, t) if clip_denoised else prediction

    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The output the parameterization gives for the true (x0, noise): the regression target at t."""
        return self.param.from_x0_eps(x0, noise, x_t, self.coefficients(t, x_t))

    def as_prediction(self, value: Prediction | Tensor, x_t: Tensor, t: Tensor) -> Prediction:
        """A model's answer as a Prediction: a raw network output goes through :meth:`predict`."""
        return value if isinstance(value, Prediction) else self.predict(value, x_t, t)

    def clip(self, prediction: Prediction, x_t: Tensor, t: Tensor) -> Prediction:
        """Clip x0 to [-1, 1] and re-derive eps from it, so the pair stays consistent with x_t.

        The one place where x0 is clipped: samplers call it after guidance, bits/dim before the bound.
        """
        return clip_x0(prediction, x_t, self.coefficients(t, x_t))

    def reverse_variance(self, variance_frac: Tensor | None, t: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        """sigma_t^2 of p(x_{t-1} | x_t) and its log: fixed, or learned (Nichol & Dhariwal 2021, eq. 15)
        from the prediction's ``variance_frac`` in [0, 1] (1: beta_t, 0: beta_tilde_t)."""
        return self.var(self, variance_frac, t, x_t)

    def reverse_step(self, prediction: Prediction, x_t: Tensor, t: Tensor) -> ReverseStep:
        """p(x_{t-1} | x_t) = N(mu_tilde(pred_x0, x_t), sigma_t^2) from a prediction (Ho et al. 2020, eq. 11)."""
        mean, _, _ = self.q_posterior(prediction.x0, x_t, t)
        variance, log_variance = self.reverse_variance(prediction.variance_frac, t, x_t)
        return ReverseStep(mean, variance, log_variance, prediction.x0, prediction.eps)

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool | None = None
    ) -> ReverseStep:
        """p(x_{t-1} | x_t) from a model output: mean = mu_tilde(pred_x0, x_t), variance per ``variance``."""
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        return self.reverse_step(self.predict(model_output, x_t, t, clip), x_t, t)

    def respace(self, timesteps: Sequence[int] | Tensor) -> GaussianDiffusion:
        """The same diffusion over the sub-process that visits only ``timesteps``."""
        diffusion = GaussianDiffusion(
            self.schedule.respace(timesteps),
            parameterization=self.parameterization,
            variance=self.variance,
            loss=self.loss_fn,  # the same objects, with their own hyperparameters: nothing copied by hand
            loss_weighting=self.weighting,
            clip_denoised=self.clip_denoised,
        )
        return diffusion.to(self.betas.device)

    # -- losses ----------------------------------------------------------------------------

    def vlb_terms(
        self, model_output: Tensor | Prediction, x0: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> Tensor:
        """The bound's term at t in bits/dim, shape (B,): KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0,
        the discretized Gaussian decoder NLL -log p(x0 | x_1) for t = 0 (Ho et al. 2020, eq. 5 and 13).
        ``model_output`` is a raw network output or a :class:`Prediction`."""
        prediction = self.as_prediction(model_output, x_t, t)
        if clip_denoised:
            prediction = self.clip(prediction, x_t, t)
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        p = self.reverse_step(prediction, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p.mean, p.log_variance)) / LN2
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)) / LN2
        return torch.where(t == 0, decoder_nll, kl)

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """KL(q(x_T | x0) || N(0, I)) in bits/dim, shape (B,). No parameters; small for a good schedule."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))) / LN2

    def mse_weight(self, t: Tensor, x: Tensor) -> Tensor:
        """Per-example weight of the MSE term, shape (B,): the ``loss_weighting`` object's."""
        return self.weighting(self, t, x)

    def x0_scale(self, t: Tensor, x: Tensor) -> Tensor:
        """|d x0 / d output| of the parameterization at t, shape (B,): output-space errors to x0-space."""
        return self.param.x0_scale(self.coefficients(t, x)).reshape(-1)

    def elbo_sigma_sq(self, t: Tensor, x: Tensor) -> Tensor:
        """sigma_t^2 of a fixed reverse variance at t, shape (B,) (the ELBO weight's 1 / (2 sigma_t^2))."""
        return self.var.elbo_sigma_sq(self, t, x).reshape(-1)

    def training_losses(
        self,
        denoise_fn: DenoiseFn,
        x0: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        generator: Generators = None,
    ) -> dict[str, Tensor]:
        """Per-example losses at timesteps ``t``; ``loss`` is what to minimise, shape (B,).

        Keys: ``loss``; ``mse`` (unweighted, on the target); ``vlb`` (bits/dim) for vlb/hybrid.
        """
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        return self.loss_fn(self, denoise_fn(x_t, t), x0, noise, x_t, t)

    # -- likelihood (the loops live in core/likelihood.py) ---------------------------------

    def bits_per_dim_terms(
        self,
        denoise_fn: PredictFn,
        x0: Tensor,
        clip_denoised: bool | None = None,
        generator: Generators = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> BitsPerDim:
        """The full bound in bits/dim, split into its terms (see ``core.likelihood.bits_per_dim_terms``)."""
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        return bits_per_dim_terms(self, denoise_fn, x0, clip, generator, callback)

    def bits_per_dim(
        self,
        denoise_fn: PredictFn,
        x0: Tensor,
        clip_denoised: bool | None = None,
        generator: Generators = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """NLL upper bound in bits/dim per example, shape (B,); data in [-1, 1]."""
        return self.bits_per_dim_terms(denoise_fn, x0, clip_denoised, generator, callback).total

    def mean_bits_per_dim(
        self,
        denoise_fn: PredictFn,
        batches: Iterable[Tensor],
        clip_denoised: bool | None = None,
        generator: torch.Generator | None = None,
        max_batches: int | None = None,
    ) -> float:
        """Average :meth:`bits_per_dim` over an iterable of data batches (e.g. a dataloader's images)."""
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        return mean_bits_per_dim(self, denoise_fn, batches, clip, generator, max_batches)

    def extra_repr(self) -> str:
        return (
            f"T={self.num_timesteps}, parameterization={self.parameterization!r}, variance={self.variance!r}, "
            f"loss={self.loss_type!r}, loss_weighting={self.loss_weighting!r}"
        )
