"""The diffusers half of DiffusionModule: import, export and init_from (mixed into the LightningModule)."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..core.diffusion import GaussianDiffusion
from ..core.imports import settings_agree, split_spec
from ..core.schedules import make_schedule


class DiffusersInterop:
    """``from_diffusers``, ``to_diffusers`` and ``load_diffusers_weights`` for :class:`DiffusionModule`."""

    # What the module this is mixed into holds (annotations only: DiffusionModule sets them).
    backbone: nn.Module
    diffusion: GaussianDiffusion
    hparams: Any
    linked_backbone_args: dict[str, Any]

    @classmethod
    def from_diffusers(cls, source: Any, scheduler: Any = None, **settings: Any) -> Any:
        """A module with the weights, schedule and prediction settings of a diffusers DDPM model.

        Args:
            source: a folder in diffusers' layout (``model_index.json`` with ``unet/`` and ``scheduler/``, or
                a bare ``UNet2DModel`` folder), or an in-memory ``UNet2DModel``.
            scheduler: a diffusers scheduler (or its config mapping) for a bare U-Net; default: the folder's,
                else ``DDPMScheduler()``'s defaults.
            **settings: other ``DiffusionModule`` arguments (optimizer, sampler, ...), over those derived.
        """
        from .diffusers import read_source
        from .diffusers_unet import unet_state_dict_from_diffusers

        derived, unet_config, weights = read_source(source, scheduler)
        module = cls(**{**derived, **settings})
        module.backbone.load_state_dict(unet_state_dict_from_diffusers(weights, unet_config))
        return module

    def load_diffusers_weights(self, source: Any) -> None:
        """Load a diffusers U-Net's weights into this module's backbone (``init_from``), after checking that
        the folder's architecture and schedule settings are this model's."""
        from .diffusers import read_source, same_betas
        from .diffusers_unet import unet_state_dict_from_diffusers

        derived, unet_config, weights = read_source(source, None)
        mine, folder_args = self.backbone_init_args(), dict(derived["backbone"]["init_args"])
        for args in (mine, folder_args):
            if isinstance(args.get("image_size"), int):  # 32 and [32, 32] are the same size
                args["image_size"] = [args["image_size"]] * 2
        # dropout is a training choice, not part of what the weights mean (published configs do not record it)
        different = [
            f"model.backbone.init_args.{key}: given {mine.get(key)!r}, folder {value!r}"
            for key, value in folder_args.items()
            if key != "dropout" and not settings_agree(key, value, mine.get(key))
        ]
        different += [
            f"model.{key}: given {self.hparams.get(key)!r}, folder {derived[key]!r}"
            for key in ("data_shape", "num_classes", "parameterization", "variance")
            if key in derived and not settings_agree(key, derived[key], self.hparams.get(key))
        ]
        folder = make_schedule(
            derived["schedule"],
            derived["num_timesteps"],
            **derived["schedule_kwargs"],
            rescale_to_zero_terminal_snr=derived["rescale_to_zero_terminal_snr"],
        )
        if not same_betas(folder.betas, self.diffusion.schedule.betas):
            different.append(
                f"model.schedule: the folder's betas ({folder!r}) are not this model's ({self.diffusion.schedule!r})"
            )
        if different:
            raise ValueError(
                f"init_from {source}: the folder's model differs from this config: " + "; ".join(different)
            )
        self.backbone.load_state_dict(unet_state_dict_from_diffusers(weights, unet_config))

    def backbone_init_args(self) -> dict[str, Any]:
        """Every argument the backbone was built with: the config's, the linked ones, then the defaults."""
        _, init_args = split_spec(self.hparams.backbone, "backbone")
        defaults = {
            k: p.default
            for k, p in inspect.signature(type(self.backbone).__init__).parameters.items()
            if k != "self" and p.default is not inspect.Parameter.empty
        }
        linked = {k: v for k, v in self.linked_backbone_args.items() if k in defaults}
        return {**defaults, **linked, **init_args}

    def to_diffusers(self, output_dir: str | Path) -> Path:
        """Write a folder that ``diffusers.DDPMPipeline.from_pretrained`` (and ``DDIMPipeline``) loads: the
        ``unet`` backbone as a ``UNet2DModel`` in safetensors, and a ``DDPMScheduler`` with this schedule."""
        from .diffusers import require_diffusers, scheduler_config_from_settings
        from .diffusers_unet import unet_config_to_diffusers, unet_state_dict_to_diffusers

        diffusers = require_diffusers()
        name, _ = split_spec(self.hparams.backbone, "backbone")
        if name != "unet":
            raise ValueError(f"to_diffusers writes a UNet2DModel and needs backbone 'unet', got {name!r}")
        init_args = self.backbone_init_args()
        unet = diffusers.UNet2DModel(**unet_config_to_diffusers(init_args))
        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
        unet.load_state_dict(unet_state_dict_to_diffusers(state, init_args))
        if init_args.get("num_classes") is not None:
            warnings.warn(
                "this model is class-conditional: diffusers' DDPMPipeline and DDIMPipeline load it but "
                "pass no class labels when called; sample it with the UNet2DModel and the scheduler in a "
                "loop with class_labels (docs/interop.md)",
                stacklevel=2,
            )
        scheduler = diffusers.DDPMScheduler(**scheduler_config_from_settings(self.hparams))
        output_dir = Path(output_dir)
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(output_dir, safe_serialization=True)
        return output_dir
