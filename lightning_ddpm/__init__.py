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
# subpackages that `import lightning_ddpm` makes reachable as attributes (lightning_ddpm.ema.reconstruct)
_SUBPACKAGES = ("ema",)
__all__ = list(_PUBLIC)
__version__ = "0.1.0"

if TYPE_CHECKING:  # static tools see the names as ordinary imports
    from .backbones import (
        available_backbones as available_backbones,
    )
    from .backbones import (
        build_backbone as build_backbone,
    )
    from .backbones import (
        register_backbone as register_backbone,
    )
    from .core.denoiser import Denoiser as Denoiser
    from .core.denoiser import Prediction as Prediction
    from .core.diffusion import GaussianDiffusion as GaussianDiffusion
    from .core.schedules import (
        NoiseSchedule as NoiseSchedule,
    )
    from .core.schedules import (
        available_schedules as available_schedules,
    )
    from .core.schedules import (
        make_schedule as make_schedule,
    )
    from .core.schedules import (
        register_schedule as register_schedule,
    )
    from .samplers import DDIMSampler as DDIMSampler
    from .samplers import DDPMSampler as DDPMSampler
    from .samplers import make_sampler as make_sampler
    from .training.module import DiffusionModule as DiffusionModule


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # once
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
