"""Resolve ``class_path`` strings and ``{class_path, init_args}`` mappings from configs."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def import_object(path: str, field: str) -> Any:
    """Import ``package.module.Name``; ``field`` names the config key in the error."""
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{field} class_path {path!r} cannot be imported: {err}") from err


def split_spec(spec: str | Mapping[str, Any], field: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``{"name": name, "init_args": {...}}`` -> (name, init_args).

    Configs use the key ``name`` because jsonargparse reserves ``class_path`` for the classes it
    instantiates itself; ``class_path`` is accepted as a synonym from Python.
    """
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        keys = set(spec)
        name_keys = keys & {"name", "class_path"}
        if len(name_keys) == 1 and not keys - {"name", "class_path", "init_args"}:
            return str(spec[name_keys.pop()]), dict(spec.get("init_args") or {})
        raise ValueError(f"{field} mapping needs 'name' and optional 'init_args'; got keys {sorted(spec)}")
    raise ValueError(f"{field} must be a name or a class_path mapping, got {type(spec).__name__}")


def settings_agree(key: str, a: Any, b: Any) -> bool:
    """Whether two values of the hyperparameter ``key`` mean the same (YAML and Python spellings alike)."""
    if key == "backbone":
        try:
            return split_spec(a, "backbone") == split_spec(b, "backbone")  # "mlp" == {"name": "mlp"}
        except ValueError:
            return False
    return _plain(a) == _plain(b)


def _plain(value: Any) -> Any:
    """Compare config values across YAML/Python spellings: tuples as lists, mappings recursively."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
