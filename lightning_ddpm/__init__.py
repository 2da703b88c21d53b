"""lightning-ddpm: denoising diffusion models on PyTorch Lightning."""

import warnings

# Lightning 2.6's own pytree helper calls an API that torch >= 2.10 deprecates, on every fit. Nothing a
# user can act on; hide exactly that message so examples and the CLI run warning-free.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")

from .backbones import available_backbones, build_backbone, register_backbone
from .diffusion import GaussianDiffusion
from .module import DiffusionModule
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
    "DiffusionModule",
    "register_backbone",
    "build_backbone",
    "available_backbones",
]
__version__ = "0.1.0"
