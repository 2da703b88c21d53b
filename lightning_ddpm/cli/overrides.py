"""Command-line settings that jsonargparse cannot address alone: one callback of the list, one key of the
backbone mapping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jsonargparse import Namespace

from .errors import CLIError


def _extract(args: list[str], pattern: str, skip: tuple[str, ...] = ()) -> tuple[list[str], list[tuple[str, ...]]]:
    """``args`` without the options that match ``pattern`` (its last group the ``=value``, else the next
    argument is the value), and those options as (its other groups..., value). A first group in ``skip``
    is left in ``args``."""
    import re

    compiled = re.compile(pattern + r"(?:=(.*))?$", re.S)
    rest, found, i = [], [], 0
    while i < len(args):
        match = compiled.match(args[i]) if isinstance(args[i], str) else None
        if match is None or match.group(1) in skip:
            rest.append(args[i])
            i += 1
            continue
        *groups, value = match.groups()
        if value is None:
            if i + 1 >= len(args):
                raise CLIError(f"{args[i]}: expected a value")
            value, i = args[i + 1], i + 1
        found.append((*groups, value))
        i += 1
    return rest, found


def _backbone_overrides(args: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``args`` without ``--model.backbone.init_args.<key> <value>`` (or ``--model.backbone.<key>``,
    ``--model.backbone.name``), and those as (key, value)."""
    rest, found = _extract(args, r"--model\.backbone\.(?:init_args\.)?(\w+)", skip=("help",))
    return rest, [(key, value) for key, value in found]  # one group and the value


def _overridden_backbone(config: Namespace, overrides: list[tuple[str, str]]) -> dict[str, Any]:
    """The parsed ``model.backbone`` as ``{name, init_args}`` with the given keys set (values read as YAML)."""
    import yaml

    subcommand = config.get("subcommand")
    spec = (config[subcommand] if subcommand else config).model.backbone
    spec = spec.as_dict() if isinstance(spec, Namespace) else spec
    if isinstance(spec, str):
        spec = {"name": spec, "init_args": {}}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise CLIError(
            f"--model.backbone.{overrides[0][0]}: the backbone is given as {spec!r}, not as a "
            "{name, init_args} mapping; give the whole mapping with --model.backbone instead"
        )
    spec = {**spec, "init_args": dict(spec.get("init_args") or {})}
    for key, value in overrides:
        if key == "name":
            spec["name"] = value
        else:
            spec["init_args"][key] = yaml.safe_load(value)
    return spec


def _callback_overrides(args: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """``args`` without the ``--trainer.callbacks[<index or class name>].<key> <value>`` options (which
    jsonargparse cannot address), and those options as (selector, key, value)."""
    rest, found = _extract(args, r"--trainer\.callbacks\[([^\]]+)\]\.([\w.]+)")
    return rest, [(selector.strip(), key, value) for selector, key, value in found]
