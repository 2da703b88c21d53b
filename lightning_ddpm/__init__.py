"""lightning-ddpm: denoising diffusion models on PyTorch Lightning."""

from .diffusion import GaussianDiffusion
from .samplers import DDIMSampler, DDPMSampler
from .schedules import NoiseSchedule, available_schedules, make_schedule, register_schedule

__all__ = [
    "NoiseSchedule",
    "make_schedule",
    "register_schedule",
    "available_schedules",
    "GaussianDiffusion",
    "DDPMSampler",
    "DDIMSampler",
]
__version__ = "0.1.0"
