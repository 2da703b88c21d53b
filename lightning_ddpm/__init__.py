"""lightning-ddpm: denoising diffusion models on PyTorch Lightning.

The public names load on first use (PEP 562), so ``import lightning_ddpm.core.schedules`` (or
diffusion, samplers, backbones, ...) needs torch alone; only ``DiffusionModule``, the data
modules, the callbacks, the CLI, checkpoints and metrics import Lightning (or torchmetrics).
"""

import importlib
import warnings
from typing import TYPE_CHECKING, Any

# Lightning 2.6's own pytree helper calls an API that torch >= 2.10 deprecates, on every fit. Nothing a
# user can act on; hide exactly that message so examples and the CLI run warning-free.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")

_PUBLIC = {
    "NoiseSchedule": "core.schedules",
    "make_schedule": "core.schedules",
    "register_schedule": "core.schedules",
    "available_schedules": "core.schedules",
    "GaussianDiffusion": "core.diffusion",
    "DDPMSampler": "samplers",
    "DDIMSampler": "samplers",
    "make_sampler": "samplers",
    "Denoiser": "core.denoiser",
    "Prediction": "core.denoiser",
    "DiffusionModule": "training.module",
    "register_backbone": "backbones",
    "build_backbone": "backbones",
    "available_backbones": "backbones",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"

if TYPE_CHECKING:  # static tools see the names as ordinary imports
    from .backbones import available_backbones, build_backbone, register_backbone
    from .core.diffusion import GaussianDiffusion
    from .training.module import DiffusionModule
    from .core.denoiser import Denoiser, Prediction
    from .samplers import DDIMSampler, DDPMSampler, make_sampler
    from .core.schedules import NoiseSchedule, available_schedules, make_schedule, register_schedule


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
