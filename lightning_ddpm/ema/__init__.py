"""Post-hoc EMA (Karras et al. 2024, EDM2): power-function profiles and the reconstruction of an EMA of any
length from the snapshots :class:`~lightning_ddpm.callbacks.PostHocEMA` writes during training. Torch only.

    state = lightning_ddpm.ema.reconstruct("run/phema", sigma_rel=0.08)  # parameter name -> float32 tensor
"""

from .power import (
    SIGMA_REL_MAX,
    PowerProfile,
    gamma_to_sigma_rel,
    profile_inner_products,
    reconstruction_error,
    sigma_rel_to_gamma,
    solve_coefficients,
)
from .snapshots import Snapshot, list_snapshots, reconstruct

__all__ = [
    "SIGMA_REL_MAX",
    "PowerProfile",
    "Snapshot",
    "gamma_to_sigma_rel",
    "list_snapshots",
    "profile_inner_products",
    "reconstruct",
    "reconstruction_error",
    "sigma_rel_to_gamma",
    "solve_coefficients",
]
