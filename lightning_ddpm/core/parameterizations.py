"""What the network predicts: eps, x0, mu (the posterior mean) or v.

Every parameterization is a pair of exact inverses between a model output and (x0, eps)
given x_t. Its training target is the output that the true (x0, eps) map to, so the
target and the round trip share one formula.

Notation: x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (Ho et al. 2020, eq. 4);
mu = coef1 x0 + coef2 x_t (eq. 7); v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
(Salimans & Ho 2022).
"""

from __future__ import annotations

from torch import Tensor

from .registry import Registry
from .types import StepCoefficients

__all__ = [
    "StepCoefficients",
    "Parameterization",
    "PARAMETERIZATIONS",
    "get_parameterization",
    "available_parameterizations",
]


PARAMETERIZATIONS: Registry[type[Parameterization] | Parameterization] = Registry("parameterization")


class Parameterization:
    """Base class; subclasses define the output <-> (x0, eps) maps."""

    name: str = ""
    # Whether x0 is recoverable (well conditioned) at alpha_bar = 0, the last step of a zero-terminal-SNR
    # schedule (Lin et al. 2024): GaussianDiffusion refuses such a schedule otherwise.
    zero_terminal_snr: bool = True
    # Whether the output means anything between the training timesteps (Karras grids sample fractional t).
    fractional_timesteps: bool = True

    def to_x0_eps(self, output: Tensor, x_t: Tensor, c: StepCoefficients) -> tuple[Tensor, Tensor]:
        """Model output -> (pred_x0, pred_eps)."""
        raise NotImplementedError

    def from_x0_eps(self, x0: Tensor, eps: Tensor, x_t: Tensor, c: StepCoefficients) -> Tensor:
        """(x0, eps) -> the output this parameterization would give; with the true pair it is the target."""
        raise NotImplementedError

    def x0_scale(self, c: StepCoefficients) -> Tensor:
        """|d x0 / d output| at fixed x_t: turns an output error into an x0 error (used by loss weights)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _eps_from_x0(x0: Tensor, x_t: Tensor, c: StepCoefficients) -> Tensor:
    return (x_t - c.sqrt_alpha_bar * x0) / c.sqrt_one_minus_alpha_bar


@PARAMETERIZATIONS.register("eps")
class EpsParameterization(Parameterization):
    """Predict the noise (Ho et al. 2020)."""

    name = "eps"
    zero_terminal_snr = False  # x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) divides by zero

    def to_x0_eps(self, output: Tensor, x_t: Tensor, c: StepCoefficients) -> tuple[Tensor, Tensor]:
        return (x_t - c.sqrt_one_minus_alpha_bar * output) / c.sqrt_alpha_bar, output

    def from_x0_eps(self, x0: Tensor, eps: Tensor, x_t: Tensor, c: StepCoefficients) -> Tensor:
        return eps

    def x0_scale(self, c: StepCoefficients) -> Tensor:
        return c.sqrt_one_minus_alpha_bar / c.sqrt_alpha_bar


@PARAMETERIZATIONS.register("x0")
class X0Parameterization(Parameterization):
    """Predict the clean sample."""

    name = "x0"

    def to_x0_eps(self, output: Tensor, x_t: Tensor, c: StepCoefficients) -> tuple[Tensor, Tensor]:
        return output, _eps_from_x0(output, x_t, c)

    def from_x0_eps(self, x0: Tensor, eps: Tensor, x_t: Tensor, c: StepCoefficients) -> Tensor:
        return x0

    def x0_scale(self, c: StepCoefficients) -> Tensor:
        return c.sqrt_alpha_bar.new_ones(()).expand_as(c.sqrt_alpha_bar)


@PARAMETERIZATIONS.register("mu")
class MuParameterization(Parameterization):
    """Predict the posterior mean mu_tilde(x_t, x0) directly (Ho et al. 2020, sec. 3.2)."""

    name = "mu"
    # x0 = (mu - coef2 x_t) / coef1 with coef1 = sqrt(alpha_bar_{T-1}) at the last step: the output's error is
    # amplified by 1 / sqrt(alpha_bar_{T-1}), 60 to 15000 for the built-in schedules at T = 1000.
    zero_terminal_snr = False
    fractional_timesteps = False  # the posterior mean of one discrete step

    def to_x0_eps(self, output: Tensor, x_t: Tensor, c: StepCoefficients) -> tuple[Tensor, Tensor]:
        x0 = (output - c.posterior_mean_coef2 * x_t) / c.posterior_mean_coef1
        return x0, _eps_from_x0(x0, x_t, c)

    def from_x0_eps(self, x0: Tensor, eps: Tensor, x_t: Tensor, c: StepCoefficients) -> Tensor:
        return c.posterior_mean_coef1 * x0 + c.posterior_mean_coef2 * x_t

    def x0_scale(self, c: StepCoefficients) -> Tensor:
        return 1.0 / c.posterior_mean_coef1


@PARAMETERIZATIONS.register("v")
class VParameterization(Parameterization):
    """Predict v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)."""

    name = "v"

    def to_x0_eps(self, output: Tensor, x_t: Tensor, c: StepCoefficients) -> tuple[Tensor, Tensor]:
        x0 = c.sqrt_alpha_bar * x_t - c.sqrt_one_minus_alpha_bar * output
        eps = c.sqrt_one_minus_alpha_bar * x_t + c.sqrt_alpha_bar * output
        return x0, eps

    def from_x0_eps(self, x0: Tensor, eps: Tensor, x_t: Tensor, c: StepCoefficients) -> Tensor:
        return c.sqrt_alpha_bar * eps - c.sqrt_one_minus_alpha_bar * x0

    def x0_scale(self, c: StepCoefficients) -> Tensor:
        return c.sqrt_one_minus_alpha_bar


def available_parameterizations() -> list[str]:
    return PARAMETERIZATIONS.names()


def get_parameterization(name: str) -> Parameterization:
    """The parameterization registered as ``name``."""
    return PARAMETERIZATIONS.build(name)
