"""What every sampler shares: the step grid (timestep spacings, Karras sigmas), noise, the model call.

A sampler visits a decreasing grid of N timesteps t_0 > ... > t_{N-1} and ends at the data
(alpha_bar = 1, sigma = 0). In the notation of the fast solvers, alpha = sqrt(alpha_bar),
sigma_vp = sqrt(1 - alpha_bar), lambda = log(alpha / sigma_vp), and the variance-exploding
sigma = sqrt((1 - alpha_bar) / alpha_bar) of Karras et al. 2022, in which x / alpha = x0 + sigma eps.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.diffusion import GaussianDiffusion
from ..core.noise import Generators, noise_like, randn  # noqa: F401  (re-exported: the samplers' API)
from ..core.registry import Registry
from ..core.sigmas import log_sigmas_of, sigma_to_t
from ..core.types import PredictFn, Prediction

__all__ = [
    "Generators",
    "StepCallback",
    "Denoise",
    "Grid",
    "Sampler",
    "check_mask",
    "paste",
    "SPACINGS",
    "INTEGER_SPACINGS",
    "randn",
    "timestep_schedule",
    "karras_sigmas",
    "sigma_to_t",
    "SAMPLERS",
]

INTEGER_SPACINGS = ("leading", "trailing", "linspace")
SPACINGS = (*INTEGER_SPACINGS, "karras")
# callback(step, num_steps, x_prev, pred_x0) after each step; step counts from 1.
StepCallback = Callable[[int, int, Tensor, Tensor], None]
# denoise(x_t, i) -> the (clipped, if asked) prediction at the grid's i-th timestep.
Denoise = Callable[[Tensor, int], Prediction]
# The solvers that divide by sigma or take log(alpha) replace alpha_bar = 0 (a zero-terminal-SNR schedule's
# last step) by 2^-24: they start at sigma = 4096 instead of infinity, as diffusers does for such schedules.
MIN_ALPHA_BAR = 2.0**-24


def check_strength(strength: float) -> None:
    """An edit's strength lies in (0, 1]: the fraction of the grid it runs."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(
            f"strength must lie in (0, 1] (the fraction of the sampler's grid an edit runs), got {strength}"
        )


def edit_count(num_steps: int, strength: float) -> int:
    """floor(num_steps strength), the steps an edit runs, after checking ``strength``."""
    check_strength(strength)
    return min(num_steps, math.floor(num_steps * strength + 1e-9))  # 0.29 * 100 is 28.999...: count it as 29


def check_mask(mask: Tensor, shape: Sequence[int]) -> Tensor:
    """An inpainting mask, 1 where the example is kept and 0 where it is generated, broadcastable to ``shape``
    with values in [0, 1] (read back once, before the loop)."""
    if not isinstance(mask, Tensor):
        got = type(mask).__name__
        raise ValueError(f"mask must be a tensor broadcastable to the examples' shape {tuple(shape)}, got {got}")
    try:
        broadcast = torch.broadcast_shapes(mask.shape, tuple(shape))
    except RuntimeError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the examples' shape {tuple(shape)} "
            "(1 keeps a value, 0 generates it; e.g. (H, W), (1, 1, H, W) or (B, C, H, W) for images)"
        )
    low, high = torch.stack(torch.aminmax(mask.float())).tolist()  # one read back
    if low < 0.0 or high > 1.0:
        raise ValueError(f"mask values must lie in [0, 1] (1 keeps, 0 generates), got range [{low:.4g}, {high:.4g}]")
    return mask


def _check_spacing(spacing: str, allowed: Sequence[str], refused: dict[str, str] | None = None) -> None:
    if refused and spacing in refused:
        raise ValueError(f"spacing {spacing!r} is refused: {refused[spacing]}; choose one of: {', '.join(allowed)}")
    if spacing not in allowed:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of: {', '.join(allowed)}")


def timestep_schedule(num_timesteps: int, num_steps: int, spacing: str = "leading", drop_zero: bool = False) -> Tensor:
    """The ``num_steps`` distinct integer timesteps in [0, T) a sampler visits, in decreasing order, as int64.

    ``leading``: arange(N) * (T // N) (DDIM's original); ``trailing``: round(T - k T / N) - 1 for
    k = 0 .. N - 1, which starts at T - 1 (Lin et al. 2024); ``linspace``: round(linspace(0, T - 1, N)).

    ``drop_zero``: diffusers' multistep convention (``DPMSolverMultistepScheduler``,
    ``UniPCMultistepScheduler``) for ``leading`` and ``linspace``: lay out N + 1 points and drop the last,
    t = 0, so that no network evaluation is spent at t = 0 (the last step goes from the smallest kept t to
    the data). ``trailing`` never reaches t = 0 on its own; with N = T every timestep is kept.
    """
    _check_spacing(spacing, INTEGER_SPACINGS)
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must lie in [1, T={num_timesteps}], got {num_steps}")
    if drop_zero and spacing != "trailing" and num_steps < num_timesteps:
        return timestep_schedule(num_timesteps, num_steps + 1, spacing)[:-1]
    if spacing == "leading":
        ts = torch.arange(num_steps, dtype=torch.long) * (num_timesteps // num_steps)
    elif spacing == "trailing":
        # Exactly N points T + k * delta, k < N: arange(T, 0, -T / N) overshoots to N + 1 points (t = -1) for
        # some N. delta is the step as numpy's arange (diffusers' grids) applies it, so ties round alike.
        delta = (num_timesteps - num_timesteps / num_steps) - num_timesteps
        k = torch.arange(num_steps, dtype=torch.float64)
        ts = torch.round(num_timesteps + k * delta).long() - 1
    else:
        # k * (T - 1) / (N - 1) as numpy's linspace computes it (torch's differs in the last bit, which
        # decides ties such as 24.5): the same rounding as diffusers' grids
        k = torch.arange(num_steps, dtype=torch.float64)
        ts = (k * ((num_timesteps - 1) / max(num_steps - 1, 1))).round().long()
        ts[-1] = num_timesteps - 1 if num_steps > 1 else 0
    # Points at least one step apart round to distinct integers: N distinct timesteps in [0, T).
    return ts.sort(descending=True).values


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


class Grid(NamedTuple):
    """The steps of one sampling run."""

    t: Tensor  # (N,) decreasing timesteps: int64, or float64 between training steps (Karras sigmas)
    alpha_bar: Tensor  # (N + 1,) float64 at each t, then 1.0: the data, sigma = 0

    @property
    def num_steps(self) -> int:
        return len(self.t)


class Sampler:
    """Common options of the samplers; a subclass implements :meth:`solve`.

    Args:
        num_steps: how many steps (network evaluations for the one-evaluation-per-step samplers);
            ``None`` means all T.
        spacing: ``leading``, ``trailing``, ``linspace`` (see :func:`timestep_schedule`), or ``karras``
            (rho = 7 sigmas between the schedule's first and last, for the samplers that allow it).
        clip_denoised: clip pred_x0 to [-1, 1] at each step; ``None`` uses the diffusion's default.
        sigma_max: cap of the Karras sigmas (``spacing="karras"`` only; EDM uses 80). ``None`` starts at
            the schedule's own last sigma, which the cosine schedule puts at 2e4: a short grid then spends
            most of its steps at sigmas where the sample is still pure noise. The sampler starts from x_T as
            if it were drawn at sigma_max (the approximation EDM and Stable Diffusion samplers make).
    """

    spacings: tuple[str, ...] = INTEGER_SPACINGS
    # diffusers' multistep solvers lay out leading/linspace grids with N + 1 points and drop t = 0
    # (see timestep_schedule); the samplers of the same method follow it, so the names mean the same grid.
    drop_zero: bool = False
    # spacings a diffusers scheduler of the same method defines differently: refused with the reason
    refused_spacings: dict[str, str] = {}

    def __init__(
        self,
        num_steps: int | None = None,
        spacing: str = "leading",
        clip_denoised: bool | None = None,
        sigma_max: float | None = None,
    ):
        _check_spacing(spacing, self.spacings, self.refused_spacings)
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if sigma_max is not None and spacing != "karras":
            raise ValueError(f"sigma_max caps Karras sigmas and needs spacing='karras', got spacing={spacing!r}")
        if sigma_max is not None and sigma_max <= 0:
            raise ValueError(f"sigma_max must be > 0, got {sigma_max}")
        self.num_steps = num_steps
        self.spacing = spacing
        self.clip_denoised = clip_denoised
        self.sigma_max = sigma_max

    def spec(self) -> dict[str, Any]:
        """``{"name": ..., "init_args": {...}}``, the form configs use: ``make_sampler(s.spec())`` rebuilds ``s``.

        The name is the registered one (a class path for an unregistered class); ``init_args`` hold every
        constructor argument, read back from the attribute of the same name.
        """
        cls = type(self)
        name = next((n for n, c in SAMPLERS.items() if c is cls), f"{cls.__module__}.{cls.__qualname__}")
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        return {"name": name, "init_args": {p: getattr(self, p) for p in params}}

    def timesteps(self, num_timesteps: int) -> Tensor:
        """The integer timesteps of an integer spacing (``grid`` gives every spacing's)."""
        if self.spacing == "karras":
            raise ValueError("spacing='karras' depends on the schedule's sigmas: use grid(diffusion)")
        return timestep_schedule(num_timesteps, self.num_steps or num_timesteps, self.spacing, self.drop_zero)

    def grid(self, diffusion: GaussianDiffusion) -> Grid:
        """The timesteps and alpha_bar values this sampler visits on ``diffusion``'s schedule."""
        ab = diffusion.schedule.alphas_cumprod
        one = torch.ones(1, dtype=torch.float64)
        if self.spacing != "karras":
            ts = self.timesteps(diffusion.num_timesteps)
            return Grid(ts, torch.cat([ab[ts], one]))
        if diffusion.schedule.has_zero_terminal_snr and self.sigma_max is None:
            raise ValueError(
                "spacing='karras' needs a finite sigma_max; a zero-terminal-SNR schedule has "
                "sigma_max = inf (set sigma_max, or use spacing='trailing')"
            )
        log_sigmas = log_sigmas_of(ab)
        sigma_min, sigma_max = float(log_sigmas[0].exp()), float(log_sigmas[-1].exp())
        if self.sigma_max is not None:
            if self.sigma_max <= sigma_min:
                raise ValueError(f"sigma_max={self.sigma_max} must exceed the schedule's first sigma {sigma_min:.4g}")
            sigma_max = min(sigma_max, self.sigma_max)
        sigmas = karras_sigmas(sigma_min, sigma_max, self.num_steps or diffusion.num_timesteps)
        return Grid(sigma_to_t(sigmas, log_sigmas), torch.cat([1.0 / (1.0 + sigmas**2), one]))

    @torch.no_grad()
    def sample(
        self,
        model: PredictFn,
        diffusion: GaussianDiffusion,
        x_T: Tensor,
        generator: Generators = None,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """Run the reverse process from ``x_T`` (standard normal noise) to x0.

        Args:
            model: ``model(x_t, t) -> Prediction`` (a :class:`~lightning_ddpm.core.denoiser.Denoiser`, a guided
                denoiser), or a raw network ``denoise_fn(x_t, t) -> output`` that ``diffusion`` interprets.
            generator: one for the batch, or a sequence with one per example (see :func:`randn`).
            callback: ``callback(step, num_steps, x, pred_x0)`` after every step.
        """
        return self.run(model, diffusion, self.grid(diffusion), x_T, generator, callback)

    def edit_steps(self, diffusion: GaussianDiffusion, strength: float) -> int:
        """How many of the grid's last steps an edit at ``strength`` runs: floor(N strength), diffusers' img2img
        rule (so ``strength = 1`` runs the whole grid and a strength below 1 / N runs none)."""
        return edit_count(self.grid(diffusion).num_steps, strength)

    def edit(
        self,
        model: PredictFn,
        diffusion: GaussianDiffusion,
        x0: Tensor,
        strength: float,
        generator: Generators = None,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """SDEdit (Meng et al. 2022): noise ``x0`` to the grid point that ``strength`` selects and run the rest.

        With k = :meth:`edit_steps`, ``x0`` is noised to alpha_bar at the grid's (N - k)-th point,
        x = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps with eps drawn first from ``generator`` (one per
        example, or one for the batch), and the last k steps are run from there. ``strength = 1`` is plain
        sampling from that noised start; k = 0 returns ``x0`` unchanged.
        """
        grid = self.grid(diffusion)
        k = edit_count(grid.num_steps, strength)
        if k == 0:
            return x0.clone()
        start = grid.num_steps - k
        tail = Grid(grid.t[start:], grid.alpha_bar[start:])
        alpha_bar = float(grid.alpha_bar[start])  # the grid lives on the host: no device synchronisation
        x = alpha_bar**0.5 * x0 + (1.0 - alpha_bar) ** 0.5 * randn(x0.shape, generator, x0.device, x0.dtype)
        return self.run(model, diffusion, tail, x, generator, callback)

    def inpaint(
        self,
        model: PredictFn,
        diffusion: GaussianDiffusion,
        x0: Tensor,
        mask: Tensor,
        generator: Generators = None,
        callback: StepCallback | None = None,
        x_T: Tensor | None = None,
    ) -> Tensor:
        """Inpainting by replacement: generate where ``mask`` is 0, keep ``x0`` where it is 1.

        The solver runs from ``x_T`` (drawn from ``generator`` first when not given) as in :meth:`sample`;
        before every network evaluation after the first, the kept region is replaced by ``x0`` noised to that
        step's level with the starting noise, sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) x_T (no draws of its
        own: a mask of zeros is plain sampling), and ``x0`` is pasted at the end. The solvers update x
        elementwise, so the kept region the solver carries between evaluations never reaches the generated one.
        Cheaper than :class:`~lightning_ddpm.samplers.repaint.RePaintSampler`'s resampling, and less coherent:
        the generated region never sees the kept one except through the network at each step.
        """
        mask = check_mask(mask, x0.shape).to(x0.dtype)
        grid = self.grid(diffusion)
        x = randn(x0.shape, generator, x0.device, x0.dtype) if x_T is None else x_T
        z, alpha_bar = x, grid.alpha_bar.tolist()  # on the host: no device synchronisation in the loop
        denoise = self.denoiser(model, diffusion, grid)

        def replaced(x: Tensor, i: int) -> Prediction:
            if i > 0:  # the first evaluation sees x_T itself, as plain sampling does
                a = alpha_bar[i]
                x = mask * (a**0.5 * x0 + (1.0 - a) ** 0.5 * z) + (1.0 - mask) * x
            return denoise(x, i)

        out = self.solve(replaced, diffusion, grid, x, generator, callback)
        return paste(x0, mask, out)

    def run(
        self,
        model: PredictFn,
        diffusion: GaussianDiffusion,
        grid: Grid,
        x: Tensor,
        generator: Generators = None,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """Run :meth:`solve` from ``x`` at ``grid.t[0]`` over ``grid`` (this sampler's grid, or its tail)."""
        return self.solve(self.denoiser(model, diffusion, grid), diffusion, grid, x, generator, callback)

    def denoiser(self, model: PredictFn, diffusion: GaussianDiffusion, grid: Grid) -> Denoise:
        """``denoise(x, i)``: ``model``'s prediction at the grid's i-th timestep, clipped if this sampler clips."""
        clip = diffusion.clip_denoised if self.clip_denoised is None else self.clip_denoised
        ts = grid.t.tolist()  # a CPU tensor: no device synchronisation
        dtype = torch.float32 if grid.t.is_floating_point() else torch.long

        def denoise(x: Tensor, i: int) -> Prediction:
            t = torch.full((x.shape[0],), ts[i], device=x.device, dtype=dtype)
            prediction = diffusion.as_prediction(model(x, t), x, t)
            return diffusion.clip(prediction, x, t) if clip else prediction

        return denoise

    def solve(
        self,
        denoise: Denoise,
        diffusion: GaussianDiffusion,
        grid: Grid,
        x: Tensor,
        generator: Generators,
        callback: StepCallback | None,
    ) -> Tensor:
        """Integrate from ``x`` at ``grid.t[0]`` to the data; one method per sampler."""
        raise NotImplementedError

    def _options(self) -> str:
        return ""

    def __repr__(self) -> str:
        cap = "" if self.sigma_max is None else f", sigma_max={self.sigma_max}"
        return f"{type(self).__name__}(num_steps={self.num_steps}, spacing={self.spacing!r}{cap}{self._options()})"


# Every sampler class registers itself under its name (``@SAMPLERS.register("ddim")``), in the order
# samplers/__init__.py imports the modules.
SAMPLERS: Registry[type[Sampler]] = Registry("sampler")


def paste(x0: Tensor, mask: Tensor, x: Tensor) -> Tensor:
    """``x0`` where ``mask`` is 1, ``x`` where it is 0: exactly (1 * x0 + 0 * x), so a kept value is the input's."""
    return mask * x0 + (1.0 - mask) * x


def solver_alpha_bar(grid: Grid) -> list[float]:
    """alpha_bar of the grid as floats, with 0 replaced by MIN_ALPHA_BAR (see there)."""
    return [value if value > 0 else MIN_ALPHA_BAR for value in grid.alpha_bar.tolist()]
