"""One-line errors: the parser's (closest valid option or config file) and the helpers that locate a
library error's config key."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser

PROG = "lightning-ddpm"
DEBUG_ENV = "LIGHTNING_DDPM_DEBUG"


# What a user can get wrong in a config; other exception types are bugs and keep their traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    ImportError,
    RuntimeError,
    MisconfigurationException,
)  # Lightning's own checks of Trainer arguments (max_steps: -5)


class CLIError(ValueError):
    """A user error located in the config (``key: message``), raised from the original exception."""


class DiffusionArgumentParser(LightningArgumentParser):
    """A parse error ends in one line naming the closest valid option (or config file), not a usage dump."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        from jsonargparse._common import debug_mode_active  # internal: jsonargparse's own LIGHTNING/JSONARGPARSE debug

        if not self.exit_on_error or debug_mode_active():  # jsonargparse is trying alternatives: let it
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise CLIError(message.strip().splitlines()[0] + _suggestion(message, parser)) from ex


def _suggestion(message: str, parser: Any) -> str:
    """'; did you mean --trainer.max_steps?' for an unknown option, or the closest file for a missing config."""
    import difflib
    import re

    unknown = re.search(r"unrecognized arguments: (\S+)", message)
    if unknown:
        bad = unknown.group(1).split("=")[0]
        options = [o for action in _all_actions(parser) for o in action.option_strings if o.startswith("--")]
        close = difflib.get_close_matches(bad, options, n=1, cutoff=0.6)
        return f"; did you mean {close[0]}?" if close else f"; see {PROG} {_subcommand(parser)}--help"
    missing = re.search(r"File does not exist: '([^']+)'", message)
    if missing:
        path = Path(missing.group(1))
        siblings = [str(p.name) for p in path.parent.glob("*")] if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
        if not close:
            from .configs import shipped_configs

            shipped = difflib.get_close_matches(path.stem, list(shipped_configs()), n=1, cutoff=0.6)
            if shipped:
                return f"; did you mean the shipped config, --config {shipped[0]}?"
            return f"; a shipped config is named without a path (--config toy2d; `{PROG} configs` lists them)"
        suggested = path.parent / close[0]
        try:  # as the user typed it: relative to the working directory when it lies below it
            suggested = suggested.relative_to(Path.cwd())
        except ValueError:
            pass
        return f"; did you mean {suggested}?"
    return ""


def _all_actions(parser: Any) -> Iterator[Any]:
    """The parser's actions and its subcommands' (jsonargparse keeps those in a map)."""
    for action in parser._actions:
        yield action
        for sub in getattr(action, "_name_parser_map", {}).values():
            yield from _all_actions(sub)


def _subcommand(parser: Any) -> str:
    name = parser.prog.removeprefix(PROG).strip().split(" ")[0] if parser.prog else ""
    return f"{name} " if name else ""


def _trainer_key(message: str) -> str | None:
    """``trainer.max_steps`` for Lightning's "`max_steps` must be ..." (the Trainer argument its check names)."""
    import inspect
    import re

    named = re.match(r"`(\w+)`", message)
    if named and named.group(1) in inspect.signature(pl.Trainer.__init__).parameters:
        return f"trainer.{named.group(1)}"
    return None


def _unwrap(err: BaseException) -> BaseException:
    """jsonargparse wraps errors raised while building a class ("Does not validate against any of the
    Union subtypes"); the library's own error is the cause."""
    while err.__cause__ is not None and str(err).startswith(
        ("Does not validate against any of the Union", "Problem with given class_path")
    ):
        err = err.__cause__
    return err


def _class_paths(value: Any, key: str = "") -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(key, class_path, init_args) of every ``{class_path, init_args}`` in a parsed config, outermost first."""
    if isinstance(value, Mapping):
        if isinstance(value.get("class_path"), str):
            yield key, value["class_path"], dict(value.get("init_args") or {})
        for k, v in value.items():
            yield from _class_paths(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _class_paths(v, f"{key}[{i}]")


def _imports_as(class_path: str, cls: type) -> bool:
    module, _, name = class_path.rpartition(".")
    return getattr(sys.modules.get(module), name, None) is cls
