"""The reverse-process variance sigma_t^2 of p(x_{t-1} | x_t): fixed (Ho et al. 2020) or learned (Nichol &
Dhariwal 2021).

A variance reads the schedule constants of a :class:`~lightning_ddpm.core.diffusion.GaussianDiffusion`
(``diffusion.gather(name, t, x)``), so a respaced diffusion gives the respaced sigma_t^2.
"""

from __future__ import annotations

from torch import Tensor

from .registry import Registry
from .types import Process

__all__ = ["Variance", "VARIANCES", "get_variance", "available_variances"]


VARIANCES: Registry[type[Variance] | Variance] = Registry("variance")


class Variance:
    """Base class: ``(variance, log_variance)`` at t, shaped like x_t."""

    name: str = ""
    output_factor: int = 1  # network output channels per data channel
    learned: bool = False

    def __call__(
        self, diffusion: Process, variance_frac: Tensor | None, t: Tensor, x_t: Tensor
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def fraction(self, output: Tensor | None) -> Tensor | None:
        """The network's variance channels as the prediction's ``variance_frac`` (None: no such channels)."""
        return None

    def elbo_sigma_sq(self, diffusion: Process, t: Tensor, x: Tensor) -> Tensor:
        """sigma_t^2 of the ELBO weight 1 / (2 sigma_t^2) (Ho et al. 2020, eq. 12); fixed variances only."""
        raise ValueError(f"variance={self.name!r} is learned: the ELBO weight needs a fixed variance")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FixedVariance(Variance):
    """sigma_t^2 read from the diffusion's constants: ``fixed_small`` is beta_tilde_t, the posterior variance
    (its log clipped at t = 0), ``fixed_large`` is beta_t (beta_tilde_1 at t = 0, for a better decoder);
    both as in Ho et al.'s code."""

    def __init__(self, name: str, variance: str, log_variance: str) -> None:
        self.name, self._variance, self._log_variance = name, variance, log_variance

    def __call__(self, diffusion, variance_frac, t, x_t):  # noqa: D102
        return (
            diffusion.gather(self._variance, t, x_t).expand_as(x_t),
            diffusion.gather(self._log_variance, t, x_t).expand_as(x_t),
        )

    def elbo_sigma_sq(self, diffusion, t, x):  # noqa: D102
        return diffusion.gather(self._log_variance, t, x).exp()

    def __repr__(self) -> str:
        return f"FixedVariance({self.name!r})"


@VARIANCES.register("fixed_small")
class FixedSmall(FixedVariance):
    """sigma_t^2 = beta_tilde_t, the posterior variance (Ho et al. 2020)."""

    def __init__(self) -> None:
        super().__init__("fixed_small", "posterior_variance", "posterior_log_variance_clipped")


@VARIANCES.register("fixed_large")
class FixedLarge(FixedVariance):
    """sigma_t^2 = beta_t (beta_tilde_1 at t = 0)."""

    def __init__(self) -> None:
        super().__init__("fixed_large", "large_variance", "large_log_variance")


@VARIANCES.register("learned_range")
class LearnedRange(Variance):
    """log sigma_t^2 = v log beta_t + (1 - v) log beta_tilde_t with v = (output + 1) / 2 from extra channels
    (Nichol & Dhariwal 2021, eq. 15); the prediction carries v as ``variance_frac``."""

    name = "learned_range"
    output_factor = 2
    learned = True

    def fraction(self, output):  # noqa: D102
        return (output + 1.0) / 2.0  # the network's [-1, 1] -> the interpolation weight v

    def __call__(self, diffusion, variance_frac, t, x_t):  # noqa: D102
        if variance_frac is None:
            raise ValueError("variance='learned_range' needs a prediction with variance_frac (2x output channels)")
        log_variance = variance_frac * diffusion.gather("log_betas", t, x_t) + (1.0 - variance_frac) * diffusion.gather(
            "posterior_log_variance_clipped", t, x_t
        )
        return log_variance.exp(), log_variance


def available_variances() -> list[str]:
    return VARIANCES.names()


def get_variance(name: str) -> Variance:
    """The variance registered as ``name``."""
    return VARIANCES.build(name)
