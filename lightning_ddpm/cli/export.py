"""``lightning-ddpm export``: a checkpoint as a diffusers folder."""

from __future__ import annotations

from pathlib import Path

from .errors import PROG


def export(args: list[str]) -> Path:
    """``lightning-ddpm export --ckpt_path C --output_dir D``: a checkpoint's weights (the EMA weights when it
    was trained with EMA, which the checkpoint stores as its state_dict) as a diffusers DDPM folder."""
    import argparse

    from ..training.module import DiffusionModule

    parser = argparse.ArgumentParser(prog=f"{PROG} export", description=export.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by lightning-ddpm fit")
    parser.add_argument(
        "--output_dir", required=True, help="the folder to write (DDPMPipeline.from_pretrained loads it)"
    )
    options = parser.parse_args(args)
    module = DiffusionModule.load_from_checkpoint(options.ckpt_path, map_location="cpu")
    folder = module.to_diffusers(options.output_dir)
    print(f"wrote {folder} (model_index.json, unet/, scheduler/)")
    return folder
