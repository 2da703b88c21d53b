"""Samplers: DDPM ancestral, DDIM, DPM-Solver++ 2M (ODE and SDE), UniPC, Euler, Heun and RePaint.

Every sampler takes a model ``model(x_t, t) -> Prediction`` (a :class:`~lightning_ddpm.core.denoiser.Denoiser`)
or a raw network ``denoise_fn(x_t, t) -> output``, runs over a grid of timesteps (``leading``,
``trailing``, ``linspace`` or Karras sigmas) and is deterministic given ``x_T`` and a
``torch.Generator`` (one for the batch, or one per sample). ``SAMPLERS`` below holds the registered
names, usable wherever a sampler is accepted (``SAMPLERS.names()``; the table of docs/samplers.md).
"""

from __future__ import annotations

from typing import Any

from .base import (
    INTEGER_SPACINGS,
    SAMPLERS,
    SPACINGS,
    Generators,
    Grid,
    Sampler,
    StepCallback,
    karras_sigmas,
    randn,
    sigma_to_t,
    timestep_schedule,
)

# The import order is the registration order, the order SAMPLERS.names() lists them in.
from .ddpm import DDPMSampler  # isort: skip
from .ddim import DDIMSampler  # isort: skip
from .dpm_solver import DPMSolverPP2MSampler, DPMSolverPP2MSDESampler  # isort: skip
from .unipc import UniPCSampler  # isort: skip
from .karras import EulerSampler, HeunSampler  # isort: skip
from .repaint import RePaintSampler  # isort: skip

__all__ = [
    "timestep_schedule",
    "karras_sigmas",
    "sigma_to_t",
    "Grid",
    "Sampler",
    "DDPMSampler",
    "DDIMSampler",
    "DPMSolverPP2MSampler",
    "DPMSolverPP2MSDESampler",
    "UniPCSampler",
    "EulerSampler",
    "HeunSampler",
    "RePaintSampler",
    "SPACINGS",
    "INTEGER_SPACINGS",
    "SAMPLERS",
    "make_sampler",
    "randn",
    "Generators",
    "StepCallback",
]


def make_sampler(spec: str | dict | Sampler, num_timesteps: int | None = None, **kwargs: Any) -> Sampler:
    """A registered name, a class path, or ``{"name": ..., "init_args": {...}}`` -> a Sampler.

    With ``num_timesteps``, a sampler whose ``num_steps`` is left at its default (50 for DDIM, 20 for
    the fast solvers) is capped at T, so that a bare name works with a short schedule too.
    """
    from ..core.imports import import_object, split_spec

    if isinstance(spec, Sampler):
        return spec
    name, init_args = split_spec(spec, "sampler")
    cls = import_object(name, "sampler") if "." in name else SAMPLERS.get(name, hint=" (or a class_path)")
    options = {**init_args, **kwargs}
    try:
        sampler = cls(**options)
    except TypeError as err:
        raise ValueError(f"bad options for sampler {name!r}: {err}") from err
    if (
        num_timesteps is not None
        and "num_steps" not in options
        and sampler.num_steps is not None
        and sampler.num_steps > num_timesteps
        and sampler.spacing != "karras"
    ):
        sampler.num_steps = num_timesteps
    return sampler
