"""Power-function EMA profiles (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", appendix C): the closed forms that tracking during training and post-hoc reconstruction
share. Torch only; time ``t`` counts optimizer steps (EDM2 counts images: the same up to the batch size).

A profile of exponent gamma averages the parameters theta_1..theta_t with weights proportional to s^gamma.
Updated after step t by ``ema = beta_t * ema + (1 - beta_t) * theta_t`` with beta_t = (1 - 1/t)^(gamma + 1)
(eq. 127 with t_delta = 1), the weight of theta_s at step t is exactly

    w_s = (s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1),    s = 1..t   (a telescoping product; sum = 1),

the discrete form of the continuous profile (gamma + 1) tau^gamma / t^(gamma+1) on [0, t]. Its width
relative to its length t, sigma_rel, is the one number users choose (eq. 123).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SIGMA_REL_MAX",
    "PowerProfile",
    "check_sigma_rel",
    "gamma_to_sigma_rel",
    "profile_inner_products",
    "sigma_rel_to_gamma",
    "solve_coefficients",
]

# The widest accepted profile: just above sqrt(1/12) = 0.2887, the sigma_rel of gamma = 0 (a uniform average over
# the whole run); wider ones need gamma < 0, a profile that weighs the first steps most.
SIGMA_REL_MAX = 0.289


def check_sigma_rel(sigma_rel: float, name: str = "sigma_rel") -> float:
    """``sigma_rel`` as a float, or a ValueError naming ``name`` and the allowed range (0, 0.289)."""
    value = float(sigma_rel)
    if not 0.0 < value < SIGMA_REL_MAX:
        raise ValueError(
            f"{name} must lie in (0, {SIGMA_REL_MAX}) (the relative width of a power-function EMA; 0.2887 is a "
            f"uniform average over the whole run), got {sigma_rel}"
        )
    return value


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))  (eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of the profile of width ``sigma_rel``: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0  (eq. 126, Algorithm 2)."""
    c = check_sigma_rel(sigma_rel) ** -2
    coefficients = torch.tensor([7.0, 16.0 - c, 12.0 - c], dtype=torch.float64)
    companion = torch.zeros(3, 3, dtype=torch.float64)
    companion[0] = -coefficients  # roots of x^3 + a x^2 + b x + c are the eigenvalues of this matrix
    companion[1, 0] = companion[2, 1] = 1.0
    roots = torch.linalg.eigvals(companion)
    return float(roots.real[roots.imag.abs() < 1e-9].max())


class PowerProfile:
    """One power-function EMA profile: its width ``sigma_rel``, exponent ``gamma`` and update law.

    Args:
        sigma_rel: the profile's relative standard deviation, in (0, 0.289) (EDM2 stores 0.05 and 0.10).
    """

    def __init__(self, sigma_rel: float) -> None:
        self.sigma_rel = check_sigma_rel(sigma_rel)
        self.gamma = sigma_rel_to_gamma(self.sigma_rel)

    def beta(self, t: int) -> float:
        """The decay of the update after optimizer step ``t`` (1-based): (1 - 1/t)^(gamma + 1); 0 at t = 1 (a copy)."""
        if t < 1:
            raise ValueError(f"t counts optimizer steps from 1, got {t}")
        return (1.0 - 1.0 / t) ** (self.gamma + 1.0)

    def weights(self, t: int) -> torch.Tensor:
        """(t,) float64: the weight of theta_1..theta_t in the average after step t (the formula above)."""
        s = torch.arange(t + 1, dtype=torch.float64)
        cumulative = (s / t) ** (self.gamma + 1.0)
        return cumulative[1:] - cumulative[:-1]

    def __repr__(self) -> str:
        return f"PowerProfile(sigma_rel={self.sigma_rel:g}, gamma={self.gamma:.4f})"


def profile_inner_products(
    t_a: torch.Tensor, gamma_a: torch.Tensor, t_b: torch.Tensor, gamma_b: torch.Tensor
) -> torch.Tensor:
    """<p_a, p_b> = integral of the two continuous profiles' product (eq. 151), broadcast over the inputs.

    For t_a <= t_b: (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) t_b) * (t_a / t_b)^gamma_b, and
    symmetrically for t_a > t_b.
    """
    num = (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** torch.where(t_a < t_b, gamma_b, -gamma_a)
    return num / ((gamma_a + gamma_b + 1) * torch.maximum(t_a, t_b))


def _normal_equations(
    steps: torch.Tensor, gammas: torch.Tensor, step: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gram matrix of the stored profiles, their inner products with the target, and the target's own."""
    t_in, g_in = steps.to(torch.float64), gammas.to(torch.float64)
    gram = profile_inner_products(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    end_t, end_g = torch.tensor(float(step), dtype=torch.float64), torch.tensor(float(gamma), dtype=torch.float64)
    return gram, profile_inner_products(t_in, g_in, end_t, end_g), profile_inner_products(end_t, end_g, end_t, end_g)


def solve_coefficients(steps: torch.Tensor, gammas: torch.Tensor, step: float, gamma: float) -> torch.Tensor:
    """(n,) float64: the combination of stored profiles (ending at ``steps``, exponents ``gammas``) closest in
    L2 to the profile (``step``, ``gamma``), normalised to sum to 1 (EDM2's Algorithm 3)."""
    gram, target, _ = _normal_equations(steps, gammas, step, gamma)
    x = torch.linalg.solve(gram, target)
    return x / x.sum()


def reconstruction_error(
    steps: torch.Tensor, gammas: torch.Tensor, step: float, gamma: float, coefficients: torch.Tensor | None = None
) -> float:
    """How far the reconstruction of the profile (``step``, ``gamma``) from the stored ones is from it:
    ||p - sum_i x_i p_i|| / ||p|| in L2, with x the ``coefficients`` (default: :func:`solve_coefficients`'s);
    closed form from the inner products (eq. 151). Near 0 inside the stored widths; it grows for widths the
    snapshots are too sparse or too short to represent."""
    gram, target, own = _normal_equations(steps, gammas, step, gamma)
    x = solve_coefficients(steps, gammas, step, gamma) if coefficients is None else coefficients.to(torch.float64)
    squared = (own - 2.0 * x @ target + x @ gram @ x) / own
    return float(squared.clamp_min(0.0).sqrt())
