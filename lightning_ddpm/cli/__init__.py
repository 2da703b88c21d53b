"""The ``lightning-ddpm`` command: LightningCLI over DiffusionModule and any LightningDataModule.

    lightning-ddpm fit --config configs/toy2d.yaml      # or --config toy2d: the config shipped in the package
    lightning-ddpm predict --config configs/toy2d.yaml --ckpt_path <run>/checkpoints/last.ckpt
    lightning-ddpm configs [copy [NAME ...] [--to DIR]]  # list the shipped configs, or copy them out
    lightning-ddpm ema --ckpt_path C --sigma_rel 0.08 --output_path OUT.ckpt  # post-hoc EMA (PostHocEMA)

What it adds to LightningCLI (docs/cli.md):
- with ``--ckpt_path``, settings the user wrote (config files or command line) win over the
  checkpoint's hyperparameters, except those that change what the weights mean
  (``training.checkpoints.COMPATIBLE_SETTINGS``), which must agree;
- no argparse abbreviations (``--model.lr`` is not ``--model.lr_warmup_steps``);
- ``--imports`` names modules to import before the classes are built (custom backbones);
- library errors end the command with one line naming the config key they came from
  (``LIGHTNING_DDPM_DEBUG=1`` shows the traceback).

Here: the CLI class (checkpoint-hyperparameter merging, error location) and the entry point; beside it
``errors`` (one-line errors), ``overrides`` (one callback, one backbone key), ``outputs`` (where a run
writes), ``export``, ``ema`` and ``configs`` (those subcommands) and ``console`` (console filtering, ``--version``).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse import ActionYesNo, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from ..callbacks import SampleWriter
from ..core.imports import settings_agree
from ..training.checkpoints import COMPATIBLE_SETTINGS, SafeCheckpointIO, check_checkpoint_file, verify_checkpoint
from ..training.module import DiffusionModule
from .configs import configs_command, resolve_config_args
from .console import _quiet, version_line
from .ema import ema_command
from .errors import (
    DEBUG_ENV,
    PROG,
    USER_ERRORS,
    CLIError,
    DiffusionArgumentParser,
    _class_paths,
    _imports_as,
    _trainer_key,
    _unwrap,
)
from .export import export
from .outputs import SaveConfigWithAbsolutePaths, _place_outputs, _resumes_from, _shown
from .overrides import _backbone_overrides, _callback_overrides, _overridden_backbone

__all__ = [
    "CLIError",
    "DiffusionArgumentParser",
    "DiffusionCLI",
    "PROG",
    "ema_command",
    "export",
    "main",
    "run_cli",
    "version_line",
]

# Set by the data: compared by DiffusionModule.on_load_checkpoint once the data has linked them in.
_LINKED = ("data_shape", "num_classes")


_CHECKPOINTS_FILE = str(Path(__file__).parent.parent / "training" / "checkpoints.py")


class DiffusionCLI(LightningCLI):
    """LightningCLI with linked data/model values and the rules in the module docstring."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(SampleWriter, "predict_writer")
        parser.link_arguments("data.data_shape", "model.data_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--imports",
            type=list[str],
            default=[],
            help="Python modules to import before the classes are built, e.g. a file in the working directory "
            "whose @register_backbone classes the config names (--imports my_nets).",
        )

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            # A checkpoint is enough to predict: without --data (or a --config that sets it), requests only,
            # with data_shape and num_classes from the checkpoint (_parse_ckpt_path).
            parser.set_defaults({"data": {"class_path": "lightning_ddpm.data.SampleRequestsDataModule"}})
            parser.add_argument(
                "--untrained",
                action=ActionYesNo,
                default=False,
                help="Allow predict without --ckpt_path, i.e. sampling the untrained network.",
            )
        return parser

    # -- parsing -----------------------------------------------------------------------------

    def parse_arguments(self, parser: Any, args: Any) -> None:
        argv = sys.argv[1:] if args is None else args
        overrides: list[tuple[str, str, str]] = []
        backbone: list[tuple[str, str]] = []
        if isinstance(argv, (list, tuple)):
            argv, overrides = _callback_overrides(list(argv))
            argv, backbone = _backbone_overrides(argv)
        if overrides or backbone:
            # jsonargparse cannot address one list entry, nor one key of the backbone mapping (it dropped
            # --model.backbone.init_args.X under a --config without a word): parse once without them (and
            # without --print_config, which would print and exit), set them, and pass the whole value.
            first = parser.parse_args([a for a in argv if not str(a).startswith("--print_config")])
            args = list(argv)
            if overrides:
                args += ["--trainer.callbacks", json.dumps(self._overridden_callbacks(first, overrides), default=str)]
            if backbone:
                args += ["--model.backbone", json.dumps(_overridden_backbone(first, backbone), default=str)]
            saved, sys.argv = sys.argv, sys.argv[:1]  # the args are the command line: no "args and argv" warning
            try:
                super().parse_arguments(parser, args)
            finally:
                sys.argv = saved
        else:
            super().parse_arguments(parser, args)
        # What the user wrote, without defaults: it wins over a checkpoint's hyperparameters.
        if isinstance(args, (dict, Namespace)):
            self._given = parser.parse_object(args, defaults=False)
        else:
            self._given = parser.parse_args(args, defaults=False)

    @staticmethod
    def _overridden_callbacks(config: Namespace, overrides: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
        """``--trainer.callbacks[1].init_args.every_n_train_steps 1000`` (or ``[ModelCheckpoint]``): the parsed
        callback list with one argument of one callback set; the value is read as YAML, as jsonargparse does."""
        import difflib
        import inspect

        import yaml

        from ..core.imports import import_object

        subcommand = config.get("subcommand")
        config = config[subcommand] if subcommand else config
        callbacks = config.trainer.get("callbacks") or []
        callbacks = [
            c.as_dict() if isinstance(c, Namespace) else dict(c)
            for c in (callbacks if isinstance(callbacks, list) else [callbacks])
        ]
        listing = ", ".join(f"{i}: {c['class_path'].rpartition('.')[2]}" for i, c in enumerate(callbacks))
        for selector, dotted, value in overrides:
            given = f"--trainer.callbacks[{selector}].{dotted}"
            names = [c["class_path"].rpartition(".")[2] for c in callbacks]
            if selector.isdigit():
                if int(selector) >= len(callbacks):
                    raise CLIError(f"{given}: trainer.callbacks has {len(callbacks)} entries ({listing or 'none'})")
                matches = [int(selector)]
            else:
                matches = [i for i, name in enumerate(names) if name == selector]
                if len(matches) != 1:
                    raise CLIError(
                        f"{given}: {'no' if not matches else 'more than one'} callback named {selector!r} "
                        f"in trainer.callbacks ({listing or 'none'}); give its index instead"
                    )
            callback = callbacks[matches[0]]
            key = dotted.removeprefix("init_args.")
            if "." in key or not dotted.startswith("init_args."):
                raise CLIError(
                    f"{given}: set one constructor argument, as --trainer.callbacks[{selector}].init_args.<name>"
                )
            parameters = inspect.signature(import_object(callback["class_path"], "callback")).parameters
            if key not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
                close = difflib.get_close_matches(key, list(parameters), n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; its arguments: {', '.join(parameters)}"
                raise CLIError(f"{given}: {callback['class_path'].rpartition('.')[2]} has no argument {key!r}{hint}")
            callback["init_args"] = {**(callback.get("init_args") or {}), key: yaml.safe_load(value)}
        return callbacks

    def _given_model(self) -> dict[str, Any]:
        subcommand = self.config.get("subcommand")
        given = self._given.get(subcommand, self._given) if subcommand else self._given
        model = given.get("model") if given is not None else None
        model = model.as_dict() if isinstance(model, Namespace) else dict(model or {})
        return {key: value for key, value in model.items() if key not in _LINKED and not key.startswith("__")}

    def _parse_ckpt_path(self) -> None:
        """Checkpoint hyperparameters under the user's own settings (LightningCLI puts them over everything)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        check_checkpoint_file(ckpt_path)
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        verify_checkpoint(checkpoint, f"checkpoint {ckpt_path!r}")
        saved = dict(checkpoint.get("hyper_parameters") or {})
        saved.pop("_instantiator", None)
        if not saved:
            return
        given = self._given_model()
        different = [
            f"model.{key}: given {given[key]!r}, checkpoint {saved[key]!r}"
            for key in COMPATIBLE_SETTINGS
            if key in given and key in saved and not settings_agree(key, given[key], saved[key])
        ]
        if different:
            raise CLIError(
                f"--ckpt_path {ckpt_path!r} was trained with other settings that change what its weights mean: "
                + "; ".join(different)
                + ". Use the config it was trained with, or leave these keys out to take the checkpoint's"
            )
        update: dict[str, Any] = {"model": {**saved, **given}}
        data = self.config[subcommand].get("data")
        init_args = data.get("init_args") if data is not None and hasattr(data, "class_path") else None
        if init_args is not None and any(key in init_args for key in _LINKED):
            # a DataModule that takes the model's data_shape / num_classes (sample or edit requests): the
            # checkpoint's where the user gave none
            update["data"] = {
                "class_path": data.class_path,
                "init_args": {
                    **init_args.as_dict(),
                    **{key: saved[key] for key in _LINKED if key in saved and init_args.get(key) is None},
                },
            }
        self.config = self.parser.parse_object({subcommand: update}, self.config)

    # -- instantiation and running -------------------------------------------------------------

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        for module in config.get("imports") or []:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise CLIError(
                    f"imports: cannot import {module!r} ({err}); run from the folder that holds it, or install it"
                ) from err
        if self.subcommand != "fit":
            # Outside fit the training callbacks' saved states (checkpointing, EMA) are not restored:
            # Lightning's advice to pass the callbacks that wrote the checkpoint does not apply.
            warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used to create")
        if self.subcommand == "predict" and not config.get("ckpt_path") and not config.get("untrained"):
            raise CLIError(
                "predict needs --ckpt_path (a trained checkpoint); add --untrained to sample the "
                "untrained network on purpose"
            )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except USER_ERRORS as err:
            raise self._located(err) from err

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        # The checking CheckpointIO is added here rather than as a trainer default, so the saved
        # config.yaml stays plain data that --config can read back.
        plugins = kwargs.get("plugins", self._get(self.config_init, "trainer", default={}).get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        trainer = super().instantiate_trainer(**{**kwargs, "plugins": plugins})
        self._placed = _place_outputs(trainer)
        return trainer

    def before_fit(self) -> None:
        """A new run must not write into a folder that holds another run's checkpoints: Lightning would
        save ``last-v1.ckpt`` beside the old ``last.ckpt``, and ``--ckpt_path .../last.ckpt`` would then
        load the old run's weights without a word."""
        ckpt_path = self.config["fit"].get("ckpt_path") if "fit" in self.config else self.config.get("ckpt_path")
        for i, callback in enumerate(self.trainer.callbacks):  # type: ignore[attr-defined]  # set by Lightning
            if not isinstance(callback, ModelCheckpoint) or not callback.dirpath:
                continue
            folder = Path(callback.dirpath)
            held = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
            if not held or _resumes_from(ckpt_path, folder):
                continue
            key = (
                "trainer.default_root_dir"
                if id(callback) in self._placed
                else f"trainer.callbacks[{i}].init_args.dirpath"
            )
            shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            raise CLIError(
                f"{key}: {_shown(folder)} already holds checkpoints of an earlier run ({shown}); resume that run "
                f"with --ckpt_path last, write this one elsewhere with --trainer.default_root_dir <new folder>, "
                "or move the old checkpoints away"
            )

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except CLIError:
            raise
        except USER_ERRORS as err:
            raise self._located(err) from err

    # -- error locations -----------------------------------------------------------------------

    def _located(self, err: BaseException) -> BaseException:
        """``CLIError("<config key>: <message>")`` for the innermost library error, or ``err`` if it is a bug."""
        root = _unwrap(err)
        if not isinstance(root, USER_ERRORS):
            return err
        message = str(root).strip()
        if "\n" in message:
            message = message.splitlines()[0] + f" (set {DEBUG_ENV}=1 for the rest)"
        if isinstance(root, RuntimeError) and message.startswith("DataLoader worker"):
            # torch's own error, raised wherever the batch was awaited: the setting the user wrote is the data's
            key: str | None = "data.init_args.num_workers"
            message += (
                "; a killed worker has usually run out of memory: fewer data.init_args.num_workers or a "
                "smaller batch_size need less"
            )
        else:
            key = self._config_key(root.__traceback__)
        if key is None and isinstance(root, MisconfigurationException):
            key = _trainer_key(message)
        return CLIError(f"{key}: {message}" if key else message)

    def _instances(self) -> Iterator[tuple[str, Any]]:
        """(config key, object) for the model, the data and the configured callbacks, once built."""
        config_init = getattr(self, "config_init", None)
        if config_init is None:
            return
        yield "model", self._get(config_init, "model")
        yield "data.init_args", self._get(config_init, "data")
        callbacks = self._get(config_init, "trainer", default={}).get("callbacks") or []
        for i, callback in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
            yield f"trainer.callbacks[{i}].init_args", callback

    def _config_key(self, traceback: TracebackType | None) -> str | None:
        """The config key of the object whose method raised (innermost first)."""
        frames = []
        while traceback is not None:
            frames.append(traceback.tb_frame)
            traceback = traceback.tb_next
        if any(frame.f_code.co_filename == _CHECKPOINTS_FILE for frame in frames):
            return "ckpt_path"  # opening or checking the checkpoint file the user named
        for frame in reversed(frames):
            obj = frame.f_locals.get("self")
            if obj is None or isinstance(obj, pl.Trainer):  # the Trainer is everyone's attribute, no one's setting
                continue
            for key, instance in self._instances():
                if instance is obj:
                    return key.removesuffix(".init_args")
                for attr, value in vars(instance).items() if hasattr(instance, "__dict__") else ():
                    if value is obj and not attr.startswith("_"):
                        return f"{key}.{attr}"
            if frame.f_code.co_name == "__init__":
                of_class = self._key_of_class(type(obj), frame.f_locals)
                if of_class:
                    return of_class
        return None

    def _key_of_class(self, cls: type, arguments: Mapping[str, Any]) -> str | None:
        """The config key of an object of class ``cls`` that failed while being built with ``arguments``."""
        if issubclass(cls, DiffusionModule):
            return "model"
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand, self.config) if subcommand else self.config
        candidates = [
            (key, init_args)
            for key, class_path, init_args in _class_paths(
                config.as_dict() if isinstance(config, Namespace) else config
            )
            if class_path == f"{cls.__module__}.{cls.__qualname__}" or _imports_as(class_path, cls)
        ]
        for key, init_args in candidates:  # two callbacks of one class: the one built with these arguments
            if all(
                settings_agree(k, arguments.get(k, v), v) for k, v in init_args.items() if not isinstance(v, Mapping)
            ):
                return key
        return candidates[0][0] if candidates else None


def run_cli(args: list[str] | None = None, **kwargs: Any) -> DiffusionCLI:
    """Build and run the CLI (``args`` as on the command line); returns it for inspection."""
    _quiet()
    # --config NAME: a config shipped in the package (lightning_ddpm/configs/NAME.yaml), when NAME is no file here
    if args is None:
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    elif isinstance(args, (list, tuple)):
        args = resolve_config_args([str(a) for a in args])
    parser_kwargs = {"allow_abbrev": False, "prog": PROG, **kwargs.pop("parser_kwargs", {})}
    return DiffusionCLI(
        DiffusionModule,
        pl.LightningDataModule,
        parser_class=DiffusionArgumentParser,
        subclass_mode_data=True,
        save_config_callback=SaveConfigWithAbsolutePaths,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=parser_kwargs,
        args=args,
        **kwargs,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the console script ``lightning-ddpm`` and of ``python -m lightning_ddpm``."""
    # As `python -m` does: modules in the working directory (custom backbones, callbacks) import.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    argv = sys.argv[1:] if args is None else args
    if argv[:1] in (["--version"], ["-V"]):
        print(version_line())
        return
    try:
        if argv[:1] == ["export"]:
            export(argv[1:])
            return
        if argv[:1] == ["ema"]:
            ema_command(argv[1:])
            return
        if argv[:1] == ["configs"]:
            configs_command(argv[1:])
            return
        run_cli(args)
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        located = err if isinstance(err, CLIError) else _unwrap(err)
        message = str(located).strip().splitlines()[0] if str(located).strip() else type(located).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
