"""The ``lightning-ddpm`` command: LightningCLI over DiffusionModule and any LightningDataModule.

    lightning-ddpm fit --config configs/toy2d.yaml
    lightning-ddpm predict --config configs/toy2d.yaml --ckpt_path <run>/checkpoints/last.ckpt
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from .callbacks import SampleWriter
from .checkpoints import SafeCheckpointIO, check_checkpoint_file
from .module import DiffusionModule


class DiffusionCLI(LightningCLI):
    """Links the values data and model share, so a config writes them once."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI opens --ckpt_path first to read its hyperparameters: check the file before it does.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_file(ckpt_path)
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(SampleWriter, "predict_writer")
        parser.link_arguments("data.data_shape", "model.data_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def run_cli(args: list[str] | None = None, **kwargs: Any) -> DiffusionCLI:
    """Build and run the CLI (``args`` as on the command line); returns it for inspection."""
    return DiffusionCLI(
        DiffusionModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"plugins": [SafeCheckpointIO()], **kwargs.pop("trainer_defaults", {})},
        args=args,
        **kwargs,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the console script ``lightning-ddpm`` and of ``python -m lightning_ddpm``."""
    run_cli(args)


if __name__ == "__main__":
    main()
