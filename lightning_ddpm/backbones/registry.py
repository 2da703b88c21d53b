"""Backbone registry: built-in short names, installed plugins (entry points) and class paths.

Three ways to name a backbone (docs/backbones.md):
- a registered short name (``unet``, ``mlp``, or ``@register_backbone("name")`` on a class);
- a short name registered by an installed package under the entry-point group
  ``lightning_ddpm.backbones`` (loaded lazily, once);
- the dotted class path of any importable ``nn.Module``.

In a config: ``backbone: unet`` or ``backbone: {name: unet, init_args: {ch: 64}}``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..core.imports import import_object, split_spec
from ..core.registry import Registry

__all__ = [
    "BACKBONES",
    "ENTRY_POINT_GROUP",
    "BackboneSpec",
    "register_backbone",
    "build_backbone",
    "available_backbones",
    "resolve_backbone",
    "check_backbone",
]

ENTRY_POINT_GROUP = "lightning_ddpm.backbones"
# A short name or dotted class path, or {"name": ..., "init_args": {...}} as in a YAML config.
BackboneSpec = str | dict[str, Any]

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
_PLUGINS: dict[str, importlib.metadata.EntryPoint] = {}
_plugins_scanned = False


def register_backbone(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``name`` usable wherever a backbone is named (the same class again replaces it)."""
    return BACKBONES.register(name)


def _scan_plugins() -> None:
    global _plugins_scanned
    if _plugins_scanned:
        return
    _plugins_scanned = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _PLUGINS.setdefault(entry_point.name, entry_point)


def available_backbones() -> list[str]:
    """Every short name: built-in, registered in Python, and installed plugins."""
    _scan_plugins()
    return sorted(set(BACKBONES) | set(_PLUGINS))


def resolve_backbone(name: str) -> Callable[..., nn.Module]:
    """The class (or factory) behind a short name or a dotted class path."""
    if name in BACKBONES:
        return BACKBONES[name]
    _scan_plugins()
    if name in _PLUGINS:
        target = _PLUGINS[name].load()
        BACKBONES.register(name, target)  # cache: load each plugin once
        return target
    if any(c in name for c in "{}:[]"):  # a mapping the shell or YAML could not parse, kept as one string
        raise ValueError(
            f"backbone {name!r} looks like a {{name, init_args}} mapping that did not parse: check its braces, "
            "colons and quotes (on the command line, quote the whole mapping: --model.backbone '{name: unet, ...}')"
        )
    if "." in name:
        return import_object(name, "backbone")
    raise ValueError(
        f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())} "
        "(or the dotted class path of an importable nn.Module, such as 'my_package.nets.MyNet'; a name you "
        "registered with @register_backbone needs its module imported first: --imports my_nets)"
    )


def build_backbone(
    spec: BackboneSpec | nn.Module, /, defaults: Mapping[str, Any] | None = None, **kwargs: Any
) -> nn.Module:
    """Instantiate a backbone.

    Args:
        spec: a short name, a dotted class path, a ``{"name", "init_args"}`` mapping, or a
            ready ``nn.Module`` (returned as is).
        defaults: values shared with the data (``in_channels``, ``image_size``, ``num_classes``,
            ``out_channels``); each is passed only if the constructor takes it and it was not given.
        **kwargs: constructor arguments; they override ``init_args``.
    """
    if isinstance(spec, nn.Module):
        return spec
    name, init_args = split_spec(spec, "backbone")
    init_args.update(kwargs)
    target = resolve_backbone(name)
    accepted = _accepted_kwargs(target)
    for key, value in (defaults or {}).items():
        if key not in init_args and value is not None and (accepted is None or key in accepted):
            init_args[key] = value
    if accepted is not None:
        unexpected = sorted(set(init_args) - accepted)
        if unexpected:
            raise ValueError(f"backbone {name!r} got unexpected arguments {unexpected}; it accepts: {sorted(accepted)}")
    model = target(**init_args)
    if not isinstance(model, nn.Module):
        raise ValueError(f"backbone {name!r} built a {type(model).__name__}, not an nn.Module")
    return model


def _accepted_kwargs(target: Callable[..., Any]) -> set[str] | None:
    """Keyword names the constructor takes, or None if it takes **kwargs."""
    params = inspect.signature(target).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}


def check_backbone(
    backbone: nn.Module, data_shape: tuple[int, ...], out_channels: int, num_classes: int | None, variance: str
) -> None:
    """Catch a backbone that cannot serve the data and the diffusion, before any training step."""
    got = getattr(backbone, "out_channels", None)
    if isinstance(got, int) and got != out_channels:
        raise ValueError(
            f"backbone outputs {got} channels but variance={variance!r} with {data_shape[0]} data channels needs "
            f"{out_channels}"
        )
    in_channels = getattr(backbone, "in_channels", None)
    if isinstance(in_channels, int) and in_channels != data_shape[0]:
        raise ValueError(f"backbone takes {in_channels} input channels but the data has {data_shape[0]}")
    image_size = getattr(backbone, "image_size", None)
    if image_size is not None and len(data_shape) == 3 and tuple(image_size) != data_shape[1:]:
        raise ValueError(f"backbone image_size {tuple(image_size)} does not match the data's {data_shape[1:]}")
    if hasattr(backbone, "num_classes") and backbone.num_classes != num_classes:
        raise ValueError(f"backbone num_classes={backbone.num_classes} but the model has num_classes={num_classes}")
