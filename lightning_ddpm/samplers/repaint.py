"""RePaint (Lugmayr et al. 2022): DDPM ancestral sampling with resampling jumps, and inpainting with it.

The path runs over the levels of the sampler's grid, level l being the grid's (N - l)-th point (level N is
x_T, level 0 the data). Going down one level is a DDPM ancestral step (one network evaluation); going up is
the forward process between the two levels, q(x_up | x_down) = N(sqrt(ab_up / ab_down) x_down,
(1 - ab_up / ab_down) I). When inpainting, every step down pastes the kept region noised to the new level,
sqrt(ab) x0 + sqrt(1 - ab) eps (Algorithm 1 of the paper; at the last step eps = 0, so the kept region
is the input itself), and the resampling jumps give the generated region time to agree with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.diffusion import GaussianDiffusion
from ..core.types import PredictFn
from .base import SAMPLERS, Denoise, Generators, Grid, StepCallback, check_mask, noise_like, paste, randn
from .ddpm import DDPMSampler

__all__ = ["RePaintSampler", "jump_schedule"]


def jump_schedule(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The levels RePaint visits, from ``num_steps`` (x_T) to 0 (the data), one level per move.

    The paper's schedule (its code's ``get_schedule_jump_paper``, whose timestep index t is level t + 1):
    going down, at each level 1 + j for j = 0, jump_length, 2 jump_length, ... below num_steps - jump_length,
    the path goes back up ``jump_length`` levels, ``jump_n_sample - 1`` times in all. Every level is in
    [0, num_steps]; consecutive levels differ by one; the data is reached once, at the end.
    """
    pending = {1 + j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    level, levels = num_steps, [num_steps]
    while level > 0:
        level -= 1
        levels.append(level)
        if pending.get(level, 0) > 0:
            pending[level] -= 1
            levels.extend(range(level + 1, level + jump_length + 1))
            level += jump_length
    return levels


@SAMPLERS.register("repaint")
class RePaintSampler(DDPMSampler):
    """RePaint's resampling (Lugmayr et al. 2022): DDPM ancestral steps with jumps back up the grid.

    Args:
        num_steps: grid steps (the paper: 250); network evaluations are more, see :meth:`evaluations`.
        jump_length: levels of the grid each jump goes back up (the paper: 10); below the grid's step count.
        jump_n_sample: times each stretch of ``jump_length`` levels is traversed (the paper: 10); 1 is no
            resampling, ancestral DDPM sampling (with a mask: inpainting by replacement).

    Without a mask (``sample``) it is DDPM ancestral sampling with the same jumps; ``inpaint`` is the method
    the sampler is for. Each step down draws one noise tensor from the generator, used for the generated
    region's ancestral noise and for the kept region's re-noising: a pixel of a 0/1 mask takes one of the
    two, so they are the paper's independent draws (diffusers' ``RePaintScheduler`` shares them the same way).
    """

    def __init__(
        self,
        num_steps: int | None = 250,
        jump_length: int = 10,
        jump_n_sample: int = 10,
        spacing: str = "leading",
        clip_denoised: bool | None = None,
    ):
        super().__init__(num_steps, spacing, clip_denoised)
        for field, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        self.jump_length = jump_length
        self.jump_n_sample = jump_n_sample
        if num_steps is not None:
            self._check_fits(num_steps)

    def _check_fits(self, num_steps: int) -> None:
        if self.jump_n_sample > 1 and self.jump_length >= num_steps:
            raise ValueError(
                f"jump_length={self.jump_length} does not fit a grid of {num_steps} steps: a jump goes back up "
                f"jump_length steps, so it must be below num_steps (or set jump_n_sample=1 for no jumps)"
            )

    def grid(self, diffusion: GaussianDiffusion) -> Grid:  # noqa: D102
        grid = super().grid(diffusion)
        self._check_fits(grid.num_steps)
        return grid

    def evaluations(self, num_steps: int) -> int:
        """Network evaluations over a grid of ``num_steps``: its steps plus one per level a jump goes up."""
        levels = jump_schedule(num_steps, self.jump_length, self.jump_n_sample)
        return sum(b < a for a, b in zip(levels, levels[1:]))

    def solve(
        self,
        denoise: Denoise,
        diffusion: GaussianDiffusion,
        grid: Grid,
        x: Tensor,
        generator: Generators,
        callback: StepCallback | None,
    ) -> Tensor:  # noqa: D102
        return self._resample(denoise, diffusion, grid, x, generator, callback, None)

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
        """RePaint: generate where ``mask`` is 0, keep ``x0`` where it is 1, resampling as the schedule says.

        Starts from ``x_T`` (drawn from ``generator`` first when not given), pure noise as in the paper; the
        result holds ``x0`` exactly where the mask is 1."""
        mask = check_mask(mask, x0.shape).to(x0.dtype)
        grid = self.grid(diffusion)
        x = randn(x0.shape, generator, x0.device, x0.dtype) if x_T is None else x_T
        denoise = self.denoiser(model, diffusion, grid)
        return self._resample(denoise, diffusion, grid, x, generator, callback, (x0, mask))

    def _resample(
        self,
        denoise: Denoise,
        diffusion: GaussianDiffusion,
        grid: Grid,
        x: Tensor,
        generator: Generators,
        callback: StepCallback | None,
        known: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        stepper = self._step_diffusion(diffusion, grid)
        n = grid.num_steps
        levels = jump_schedule(n, self.jump_length, self.jump_n_sample)
        total = sum(b < a for a, b in zip(levels, levels[1:]))
        ab = grid.alpha_bar.tolist()  # ab[n - level]; level 0 is the data, ab = 1. On the host: no synchronisation
        step = 0
        for here, there in zip(levels, levels[1:]):
            if there > here:  # back up: the forward process from level `here` to level `there`
                ratio = ab[n - there] / ab[n - here]
                x = ratio**0.5 * x + (1.0 - ratio) ** 0.5 * noise_like(x, generator)
                continue
            prediction = denoise(x, n - here)
            noise = None
            if there == 0:
                x = prediction.x0  # the posterior mean at the first step: coef1 = 1, coef2 = 0
            else:
                index = torch.full((x.shape[0],), here - 1, device=x.device, dtype=torch.long)  # step in `stepper`
                moved = stepper.reverse_step(prediction, x, index)
                noise = noise_like(x, generator)
                x = moved.mean + (0.5 * moved.log_variance).exp() * noise
            if known is not None:
                x0, mask = known
                a = ab[n - there]
                kept = x0 if noise is None else a**0.5 * x0 + (1.0 - a) ** 0.5 * noise
                x = paste(kept, mask, x)
            step += 1
            if callback is not None:
                callback(step, total, x, prediction.x0)
        return x

    def _options(self) -> str:
        return f", jump_length={self.jump_length}, jump_n_sample={self.jump_n_sample}"
