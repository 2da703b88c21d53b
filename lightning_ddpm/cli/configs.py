"""The configs shipped with the package: ``--config toy2d`` names one, and ``lightning-ddpm configs`` lists them
and copies them out for editing (after ``pip install lightning-ddpm`` there is no clone to take them from)."""

from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path

from .errors import PROG, CLIError

__all__ = ["shipped_configs", "resolve_config_args", "configs_command"]


def shipped_configs() -> dict[str, Path]:
    """Name (the file name without ``.yaml``) -> path, for every config in the package."""
    folder = Path(str(resources.files("lightning_ddpm") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config NAME`` (or ``--config=NAME``) that names no file but a shipped config
    replaced by that config's path."""
    out, i = list(argv), 0
    while i < len(out):
        arg = out[i]
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = _resolve(out[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            out[i] = "--config=" + _resolve(arg.removeprefix("--config="))
        i += 1
    return out


def _resolve(value: str) -> str:
    """A bare name of a shipped config (``toy2d``, ``toy2d.yaml``) that is not a file here -> its path."""
    if Path(value).exists() or "/" in value or "\\" in value:
        return value
    path = shipped_configs().get(value.removesuffix(".yaml"))
    return value if path is None else str(path)  # anything else: the parser's missing-file error says what is shipped


def configs_command(argv: list[str]) -> None:
    """``lightning-ddpm configs``: list the shipped configs; ``configs copy [NAME ...] [--to DIR] [--force]``."""
    parser = argparse.ArgumentParser(prog=f"{PROG} configs", description=configs_command.__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="action")
    sub.add_parser("list", help="list the shipped configs (the default)")
    copy = sub.add_parser("copy", help="copy shipped configs into a folder, to edit them")
    copy.add_argument("names", nargs="*", help="the configs to copy (default: all)")
    copy.add_argument("--to", default="configs", help="the folder (default: ./configs)")
    copy.add_argument("--force", action="store_true", help="overwrite files that exist")
    options = parser.parse_args(argv)
    configs = shipped_configs()
    if options.action != "copy":
        width = max(len(n) for n in configs)
        for name, path in configs.items():
            print(f"{name:<{width}}  {_summary(path)}")
        return
    unknown = [n for n in options.names if n.removesuffix(".yaml") not in configs]
    if unknown:
        raise CLIError(f"configs copy: unknown config {unknown[0]!r}; shipped configs: {', '.join(configs)}")
    names = [n.removesuffix(".yaml") for n in options.names] or list(configs)
    target = Path(options.to)
    existing = [str(target / f"{n}.yaml") for n in names if (target / f"{n}.yaml").exists()]
    if existing and not options.force:
        raise CLIError(f"configs copy: {existing[0]} exists; pass --force to overwrite it")
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(configs[name], target / f"{name}.yaml")
        print(target / f"{name}.yaml")


def _summary(path: Path) -> str:
    """The config's first comment line: what it trains."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
