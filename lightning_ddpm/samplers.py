"""Reverse-process samplers: DDPM ancestral (Ho et al. 2020) and DDIM (Song et al. 2021).

Both run over a respaced subset of timesteps (Nichol & Dhariwal 2021, sec. 4) and are
deterministic given ``x_T`` and a ``torch.Generator`` (DDIM with eta = 0 uses no randomness).
The model is ``denoise_fn(x_t, t) -> output`` with ``t`` the original timestep index.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .diffusion import DenoiseFn, GaussianDiffusion
from .registry import Registry

__all__ = ["timestep_schedule", "Sampler", "DDPMSampler", "DDIMSampler", "SPACINGS", "SAMPLERS", "make_sampler", "randn"]

SPACINGS = ("leading", "trailing", "linspace")
# callback(step, num_steps, x_prev, pred_x0) after each step; step counts from 1.
StepCallback = Callable[[int, int, Tensor, Tensor], None]
# One generator for the batch, or one per example: then example i's noise depends on generators[i]
# alone, so a sample does not depend on how requests were batched or shared across ranks.
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """Standard normal noise of ``shape`` (batch first) from one generator or one per example."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def timestep_schedule(num_timesteps: int, num_steps: int, spacing: str = "leading") -> Tensor:
    """The timesteps a ``num_steps``-step sampler visits, in decreasing order, as int64.

    ``leading``: arange(N) * (T // N) (DDIM's original); ``trailing``: round(T - k T / N) - 1,
    which starts at T - 1 (Lin et al. 2024); ``linspace``: round(linspace(0, T - 1, N)).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must lie in [1, T={num_timesteps}], got {num_steps}")
    if spacing == "leading":
        ts = torch.arange(num_steps, dtype=torch.long) * (num_timesteps // num_steps)
    elif spacing == "trailing":
        ts = torch.round(torch.arange(num_timesteps, 0, -num_timesteps / num_steps, dtype=torch.float64)).long() - 1
    else:
        ts = torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64).round().long()
    ts = torch.unique(ts)  # sorted ascending, no duplicates
    return ts.flip(0)


class Sampler:
    """Common options of the samplers.

    Args:
        num_steps: how many reverse steps; ``None`` means all T.
        spacing: ``leading``, ``trailing`` or ``linspace`` (see :func:`timestep_schedule`).
        clip_denoised: clip pred_x0 to [-1, 1] at each step; ``None`` uses the diffusion's default.
    """

    def __init__(self, num_steps: int | None = None, spacing: str = "leading", clip_denoised: bool | None = None):
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps
        self.spacing = spacing
        self.clip_denoised = clip_denoised

    def timesteps(self, num_timesteps: int) -> Tensor:
        return timestep_schedule(num_timesteps, self.num_steps or num_timesteps, self.spacing)

    def _clip(self, diffusion: GaussianDiffusion) -> bool:
        return diffusion.clip_denoised if self.clip_denoised is None else self.clip_denoised

    @torch.no_grad()
    def sample(
        self,
        denoise_fn: DenoiseFn,
        diffusion: GaussianDiffusion,
        x_T: Tensor,
        generator: Generators = None,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """Run the reverse process from ``x_T`` (standard normal noise) to x0.

        ``generator``: one for the batch, or a sequence with one per example (see :func:`randn`).
        """
        ts = self.timesteps(diffusion.num_timesteps)
        clip = self._clip(diffusion)
        x = x_T
        for i, step in enumerate(ts.tolist()):
            prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            mean_out, var_out = diffusion.split_output(denoise_fn(x, t), x)
            pred_x0, pred_eps = diffusion.predict_x0_eps(mean_out, x, t, clip)
            x = self._step(diffusion, x, t, step, prev, len(ts) - 1 - i, pred_x0, pred_eps, var_out, generator)
            if callback is not None:
                callback(i + 1, len(ts), x, pred_x0)
        return x

    def _step(
        self,
        diffusion: GaussianDiffusion,
        x_t: Tensor,
        t: Tensor,
        step: int,
        prev: int,
        index: int,
        pred_x0: Tensor,
        pred_eps: Tensor,
        var_out: Tensor | None,
        generator: Generators,
    ) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps}, spacing={self.spacing!r})"


def _noise_like(x: Tensor, generator: Generators) -> Tensor:
    return randn(x.shape, generator, x.device, x.dtype)


class DDPMSampler(Sampler):
    """Ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t) (Ho et al. 2020, Algorithm 2).

    With fewer steps than T it samples the respaced process, whose posterior and variances
    are those of the kept alpha_bar values; the last step adds no noise and returns pred_x0.
    """

    def __init__(self, num_steps: int | None = None, spacing: str = "leading", clip_denoised: bool | None = None):
        super().__init__(num_steps, spacing, clip_denoised)
        # The last respaced diffusion, keyed by a weak reference to its source: an id() can be reused by
        # another model once the first is garbage collected, and a sampler may be shared between models.
        self._respaced: tuple[weakref.ref, str, GaussianDiffusion] | None = None

    def _step_diffusion(self, diffusion: GaussianDiffusion) -> GaussianDiffusion:
        if self.num_steps is None or self.num_steps == diffusion.num_timesteps:
            return diffusion
        device = str(diffusion.betas.device)
        cached = self._respaced
        if cached is None or cached[0]() is not diffusion or cached[1] != device:
            cached = self._respaced = (weakref.ref(diffusion), device,
                                       diffusion.respace(self.timesteps(diffusion.num_timesteps)))
        return cached[2]

    def _step(self, diffusion, x_t, t, step, prev, index, pred_x0, pred_eps, var_out, generator):  # noqa: D102
        stepper = self._step_diffusion(diffusion)
        i = torch.full_like(t, index)
        mean, _, _ = stepper.q_posterior(pred_x0, x_t, i)
        if index == 0:
            return mean  # coef1 = 1, coef2 = 0 at the first step: this is pred_x0
        _, log_variance = stepper.reverse_variance(var_out, i, x_t)
        return mean + (0.5 * log_variance).exp() * _noise_like(x_t, generator)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12): eta = 0 is deterministic, eta = 1 has the DDPM posterior variance.

    x_s = sqrt(alpha_bar_s) x0 + sqrt(1 - alpha_bar_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s);
    the last step uses alpha_bar_s = 1 and so returns pred_x0.
    """

    def __init__(
        self,
        num_steps: int | None = 50,
        eta: float = 0.0,
        spacing: str = "leading",
        clip_denoised: bool | None = None,
    ):
        super().__init__(num_steps, spacing, clip_denoised)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)

    def sigma(self, alpha_bar_t: float, alpha_bar_s: float) -> float:
        """The DDIM noise scale of the step t -> s."""
        return self.eta * ((1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s)) ** 0.5

    def _step(self, diffusion, x_t, t, step, prev, index, pred_x0, pred_eps, var_out, generator):  # noqa: D102
        ab = diffusion.schedule.alphas_cumprod
        ab_t = float(ab[step])
        ab_s = float(ab[prev]) if prev >= 0 else 1.0
        sigma = self.sigma(ab_t, ab_s)
        x = ab_s**0.5 * pred_x0 + max(1.0 - ab_s - sigma**2, 0.0) ** 0.5 * pred_eps
        if sigma > 0:
            x = x + sigma * _noise_like(x_t, generator)
        return x

    def __repr__(self) -> str:
        return f"DDIMSampler(num_steps={self.num_steps}, eta={self.eta}, spacing={self.spacing!r})"


SAMPLERS: Registry[type[Sampler]] = Registry("sampler")
SAMPLERS.register("ddpm", DDPMSampler)
SAMPLERS.register("ddim", DDIMSampler)


def make_sampler(spec: str | dict | Sampler, **kwargs) -> Sampler:
    """``"ddpm"``, ``"ddim"``, a class path, or ``{"name": ..., "init_args": {...}}`` -> a Sampler."""
    from .imports import import_object, split_spec

    if isinstance(spec, Sampler):
        return spec
    name, init_args = split_spec(spec, "sampler")
    cls = import_object(name, "sampler") if "." in name else SAMPLERS.get(name, hint=" (or a class_path)")
    try:
        return cls(**{**init_args, **kwargs})
    except TypeError as err:
        raise ValueError(f"bad options for sampler {name!r}: {err}") from err
