"""diffusers folders <-> DiffusionModule settings: the scheduler half of the bridge, and the folder I/O.

A diffusers DDPM folder holds ``model_index.json``, ``unet/`` (``config.json`` and
``diffusion_pytorch_model.safetensors``) and ``scheduler/scheduler_config.json``. The U-Net half of
the mapping is :mod:`lightning_ddpm.interop.diffusers_unet`. diffusers is optional: every entry
point imports it through :func:`require_diffusers`, whose error names the extra to install.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "require_diffusers",
    "settings_from_scheduler_config",
    "scheduler_config_from_settings",
    "read_folder",
    "read_source",
    "SCHEDULER_SAMPLERS",
]

PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# diffusers' *_log variants are the same variances computed in log space.
VARIANCE_TYPES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}
# The scheduler class a folder names -> our sampler of the same method.
SCHEDULER_SAMPLERS = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
    "EulerDiscreteScheduler": "euler",
    "HeunDiscreteScheduler": "heun",
}
# The scheduler classes whose clip_sample defaults to True.
_CLIPPING_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
# diffusers' default timestep_spacing per scheduler class (the others default to "linspace").
_DEFAULT_SPACINGS = {"DDPMScheduler": "leading", "DDIMScheduler": "leading"}
INSTALL_HINT = "pip install 'lightning-ddpm[diffusers]'"


def require_diffusers() -> Any:
    """The diffusers package, or an ImportError that says which extra installs it."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(f"diffusers interop needs the diffusers package: {INSTALL_HINT}") from err
    return diffusers


def _refuse(field: str, value: Any, supported: Any) -> ValueError:
    return ValueError(f"scheduler config {field}: {value!r} is not supported; supported: {supported}")


def _schedule(config: Mapping[str, Any]) -> dict[str, Any]:
    """The schedule settings of a scheduler config (betas exactly as diffusers computes them)."""
    name = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    trained = config.get("trained_betas")
    if trained is not None:
        return {"schedule": "custom", "schedule_kwargs": {"betas": [float(b) for b in trained]}}
    if name in ("linear", "scaled_linear"):
        return {"schedule": name, "schedule_kwargs": {"beta_start": start, "beta_end": end}}
    if name == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine, s = 0.008, beta capped at 0.999
        return {"schedule": "cosine", "schedule_kwargs": {}}
    if name == "sigmoid":  # GeoDiff's sigmoid in beta (not the alpha_bar sigmoid of our `sigmoid`): as custom betas
        T = int(config.get("num_train_timesteps", 1000))
        betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (end - start) + start
        return {"schedule": "custom", "schedule_kwargs": {"betas": betas.tolist()}}
    raise _refuse("beta_schedule", name, "linear, scaled_linear, squaredcos_cap_v2, sigmoid, or trained_betas")


def settings_from_scheduler_config(config: Mapping[str, Any], class_name: str = "DDPMScheduler") -> dict[str, Any]:
    """DiffusionModule settings equivalent to a diffusers scheduler config.

    Refused, with the field named: a prediction or variance type we do not have, thresholding, a
    clip range other than 1, a steps offset, scheduler classes without a sampler of ours, and solver
    variants we do not implement (see ``_solver``).
    """
    if class_name not in SCHEDULER_SAMPLERS:
        raise _refuse("_class_name", class_name, ", ".join(SCHEDULER_SAMPLERS))
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise _refuse("prediction_type", prediction, ", ".join(PREDICTION_TYPES))
    variance = config.get("variance_type") or "fixed_small"
    if variance not in VARIANCE_TYPES:
        raise _refuse("variance_type", variance, ", ".join(VARIANCE_TYPES))
    if config.get("thresholding"):
        raise _refuse("thresholding", True, "false (clip_sample clips x0 to [-1, 1])")
    if config.get("clip_sample") and float(config.get("clip_sample_range", 1.0)) != 1.0:
        raise _refuse("clip_sample_range", config["clip_sample_range"], "1.0")
    if int(config.get("steps_offset", 0) or 0) != 0:
        raise _refuse("steps_offset", config["steps_offset"], "0")
    sampler, options = _solver(config, SCHEDULER_SAMPLERS[class_name])
    # Our spacing names are diffusers' grids (the multistep solvers' N + 1 points included), except linspace
    # for Euler / Heun: diffusers puts it at fractional timesteps, which we refuse; trailing is the nearest.
    spacing = config.get("timestep_spacing") or _DEFAULT_SPACINGS.get(class_name, "linspace")
    if config.get("use_karras_sigmas"):
        spacing = "karras"
    elif sampler in ("euler", "heun") and spacing == "linspace":
        spacing = "trailing"
    return {
        **_schedule(config),
        "num_timesteps": int(config.get("num_train_timesteps", 1000)),
        "rescale_to_zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False)),
        "parameterization": PREDICTION_TYPES[prediction],
        "variance": VARIANCE_TYPES[variance],
        # DDPMScheduler and DDIMScheduler clip by default (clip_sample=True); DPM-Solver and friends have no
        # clip_sample at all. A config without the field (a bare U-Net: DDPMScheduler()'s) gets the default.
        "clip_denoised": bool(config.get("clip_sample", class_name in _CLIPPING_SCHEDULERS)),
        "sampler": {"name": sampler, "init_args": {"spacing": spacing, **options}}
        if sampler != "ddpm" or spacing != "leading"
        else "ddpm",
    }


def _solver(config: Mapping[str, Any], sampler: str) -> tuple[str, dict[str, Any]]:
    """A scheduler's grid and method fields -> our sampler's name and options; what we lack is refused.

    Ours: DPM-Solver++(2M) with the midpoint rule (ODE or SDE) and UniPC-bh2 in data prediction, both
    stepping down to first order at the end onto sigma = 0.
    """
    for field in (
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_flow_sigmas",
        "use_lu_lambdas",
        "use_dynamic_shifting",
    ):  # other sigma grids than ours
        if config.get(field):
            raise _refuse(field, config[field], "false")
    for field, ours in (("interpolation_type", "linear"), ("timestep_type", "discrete")):
        if config.get(field, ours) != ours:
            raise _refuse(field, config[field], ours)
    for field in ("sigma_min", "solver_p"):
        if config.get(field) is not None:
            raise _refuse(field, config[field], "null")
    if float(config.get("lambda_min_clipped", -math.inf)) != -math.inf:
        raise _refuse("lambda_min_clipped", config["lambda_min_clipped"], "-inf")
    # diffusers caps only Karras (and exponential / beta) sigmas with sigma_max, as ours does
    options = (
        {"sigma_max": float(config["sigma_max"])}
        if config.get("sigma_max") is not None and config.get("use_karras_sigmas")
        else {}
    )
    if sampler not in ("dpmpp_2m", "unipc"):
        return sampler, options
    if not config.get("lower_order_final", True):
        raise _refuse("lower_order_final", False, "true")
    if config.get("final_sigmas_type", "zero") != "zero":
        raise _refuse("final_sigmas_type", config["final_sigmas_type"], "zero")
    order = int(config.get("solver_order", 2))
    if sampler == "dpmpp_2m":
        algorithm = config.get("algorithm_type", "dpmsolver++")
        if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):
            raise _refuse("algorithm_type", algorithm, "dpmsolver++, sde-dpmsolver++")
        if order != 2:
            raise _refuse("solver_order", order, "2")
        if config.get("solver_type", "midpoint") != "midpoint":
            raise _refuse("solver_type", config["solver_type"], "midpoint")
        if config.get("euler_at_final"):
            raise _refuse("euler_at_final", True, "false")
        return ("dpmpp_2m_sde" if algorithm == "sde-dpmsolver++" else "dpmpp_2m"), options
    if not config.get("predict_x0", True):
        raise _refuse("predict_x0", False, "true")
    if config.get("solver_type", "bh2") != "bh2":
        raise _refuse("solver_type", config["solver_type"], "bh2")
    if order not in (1, 2, 3):
        raise _refuse("solver_order", order, "1, 2, 3")
    if config.get("disable_corrector"):
        raise _refuse("disable_corrector", config["disable_corrector"], "[] (the corrector after every step)")
    return "unipc", options if order == 2 else {**options, "order": order}


def _beta_settings(schedule: str, kwargs: Mapping[str, Any], num_timesteps: int) -> dict[str, Any]:
    if schedule in ("linear", "scaled_linear") and set(kwargs) <= {"beta_start", "beta_end"}:
        defaults = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}[schedule]
        return {
            "beta_schedule": schedule,
            "beta_start": float(kwargs.get("beta_start", defaults[0])),
            "beta_end": float(kwargs.get("beta_end", defaults[1])),
        }
    if (
        schedule == "cosine"
        and float(kwargs.get("s", 0.008)) == 0.008
        and float(kwargs.get("max_beta", 0.999)) == 0.999
    ):
        return {"beta_schedule": "squaredcos_cap_v2"}
    from ..core.schedules import make_schedule

    # anything else travels as its betas (diffusers has no equivalent name)
    return {"trained_betas": make_schedule(schedule, num_timesteps, **kwargs).betas.tolist()}


def scheduler_config_from_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The DDPMScheduler config that reproduces a DiffusionModule's schedule and sampling settings.

    ``settings`` are the module's hyperparameters (``module.hparams``).
    """
    inverse_prediction = {ours: theirs for theirs, ours in PREDICTION_TYPES.items()}
    num_timesteps = int(settings.get("num_timesteps", 1000))
    sampler = settings.get("sampler", "ddim")
    init_args = sampler.get("init_args", {}) if isinstance(sampler, Mapping) else {}
    spacing = init_args.get("spacing", "leading")
    return {
        "num_train_timesteps": num_timesteps,
        **_beta_settings(settings.get("schedule", "linear"), settings.get("schedule_kwargs") or {}, num_timesteps),
        "rescale_betas_zero_snr": bool(settings.get("rescale_to_zero_terminal_snr", False)),
        "prediction_type": inverse_prediction[settings.get("parameterization", "eps")],
        "variance_type": settings.get("variance", "fixed_small"),
        "clip_sample": bool(settings.get("clip_denoised", False)),
        "clip_sample_range": 1.0,
        "timestep_spacing": spacing if spacing in ("leading", "trailing", "linspace") else "leading",
    }


def _json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def read_folder(path: str | Path) -> tuple[Path, dict[str, Any], tuple[str, dict[str, Any]] | None]:
    """(unet folder, unet config, (scheduler class name, scheduler config) or None) of a diffusers folder.

    Accepts a pipeline folder (``model_index.json`` with ``unet/`` and ``scheduler/``) or a bare
    ``UNet2DModel`` folder (``config.json``), whose scheduler then comes from the caller.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist or is not a folder (a diffusers model folder was expected)")
    if (root / "model_index.json").is_file():
        index = _json(root / "model_index.json", "")
        if "unet" not in index:
            raise ValueError(
                f"{root / 'model_index.json'} names no 'unet'; components: "
                f"{sorted(k for k in index if not k.startswith('_'))}"
            )
        unet_dir = root / "unet"
        scheduler_entry = index.get("scheduler")
        scheduler = None
        if scheduler_entry:
            scheduler = (
                scheduler_entry[1],
                _json(root / "scheduler" / "scheduler_config.json", "the scheduler config"),
            )
    elif (root / "config.json").is_file():
        unet_dir, scheduler = root, None
    else:
        raise ValueError(f"{root} is not a diffusers model folder: it has neither model_index.json nor config.json")
    config = _json(unet_dir / "config.json", "the unet config")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(
            f"{unet_dir / 'config.json'} _class_name: {config['_class_name']!r} is not supported; "
            "supported: UNet2DModel"
        )
    return unet_dir, config, scheduler


def load_unet_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    """The U-Net's weights from ``diffusion_pytorch_model.safetensors`` (or the ``.bin`` of older folders)."""
    safetensors_file = unet_dir / "diffusion_pytorch_model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    bin_file = unet_dir / "diffusion_pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{unet_dir} has no diffusion_pytorch_model.safetensors (or .bin): no U-Net weights")


def same_betas(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Betas equal to float32 precision (diffusers keeps them in float32)."""
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-9))


def read_source(source: Any, scheduler: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(DiffusionModule settings, UNet2DModel config, its weights) of a diffusers folder or UNet2DModel; a
    ``scheduler`` (object or config mapping) replaces the folder's."""
    from .diffusers_unet import unet_init_args_from_diffusers

    if isinstance(source, (str, Path)):
        unet_dir, unet_config, folder_scheduler = read_folder(source)
        weights = load_unet_weights(unet_dir)
    elif hasattr(source, "config") and hasattr(source, "state_dict"):
        unet_config, weights, folder_scheduler = dict(source.config), source.state_dict(), None
    else:
        raise ValueError(f"from_diffusers takes a folder or a diffusers UNet2DModel, got {type(source).__name__}")
    if scheduler is not None:
        config = dict(scheduler) if isinstance(scheduler, Mapping) else dict(scheduler.config)
        folder_scheduler = (config.get("_class_name") or type(scheduler).__name__, config)
    class_name, scheduler_config = folder_scheduler or ("DDPMScheduler", {})
    if class_name == "dict":
        class_name = "DDPMScheduler"
    init_args = unet_init_args_from_diffusers(unet_config)
    size = unet_config.get("sample_size", 32)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    derived = {
        "backbone": {"name": "unet", "init_args": init_args},
        "data_shape": [int(unet_config.get("in_channels", 3)), int(height), int(width)],
        **settings_from_scheduler_config(scheduler_config, class_name),
    }
    if "num_classes" in init_args:
        derived["num_classes"] = init_args["num_classes"]
    return derived, unet_config, weights
