"""``lightning-ddpm ema``: a checkpoint whose weights are a post-hoc EMA reconstructed from a run's snapshots."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..ema.snapshots import list_snapshots, reconstruct, select_run
from ..training.checkpoints import DIGEST_KEY, SafeCheckpointIO, checkpoint_digest, verify_checkpoint
from .errors import PROG

__all__ = ["ema_command", "write_posthoc_checkpoint"]

# What only a resumed fit reads: the written checkpoint is for load_from_checkpoint, predict and export.
TRAINING_STATE = (
    "optimizer_states",
    "lr_schedulers",
    "loops",
    "callbacks",
    "current_model_state",
    "averaging_state",
    "rng_states",
)


def _posthoc_states(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The PostHocEMA callback states a checkpoint holds (one per PostHocEMA of the run)."""
    callbacks = checkpoint.get("callbacks") or {}
    return [state for key, state in callbacks.items() if str(key).startswith("PostHocEMA") and state]


def _parameter_shapes(checkpoint: dict[str, Any], states: list[dict[str, Any]], ckpt_path: str | Path) -> dict:
    """The model's parameter names and shapes: from the PostHocEMA averages the checkpoint holds (taken over
    ``named_parameters()``, full tensors under FSDP2), else from the module the checkpoint builds."""
    from ..training.module import DiffusionModule

    if states:
        return {name: tuple(value.shape) for name, value in states[0]["averages"][0].items()}
    module = DiffusionModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def write_posthoc_checkpoint(
    ckpt_path: str | Path,
    output_path: str | Path,
    sigma_rel: float,
    snapshot_dir: str | Path | None = None,
    step: int | None = None,
) -> Path:
    """Write ``output_path``: the checkpoint ``ckpt_path`` with its ``state_dict`` parameters replaced by the
    post-hoc EMA of width ``sigma_rel`` after ``step`` (default: the last snapshot), its training state dropped.

    ``snapshot_dir`` defaults to the folder the checkpoint's PostHocEMA wrote, and only that run's snapshots
    are used.
    """
    checkpoint = SafeCheckpointIO().load_checkpoint(ckpt_path, weights_only=False)
    verify_checkpoint(checkpoint, f"checkpoint {str(ckpt_path)!r}")
    states = _posthoc_states(checkpoint)
    runs = {state["run"] for state in states}
    if snapshot_dir is None:
        folders = sorted({state["snapshot_dir"] for state in states})
        if len(folders) != 1:
            raise ValueError(
                f"--snapshot_dir is needed: checkpoint {str(ckpt_path)!r} names "
                + (f"{len(folders)} snapshot folders ({', '.join(folders)})" if folders else "no PostHocEMA run")
            )
        snapshot_dir = folders[0]
    run = runs.pop() if len(runs) == 1 else None
    state = reconstruct(snapshot_dir, sigma_rel, step=step, run=run)
    if step is None:
        step = select_run(list_snapshots(snapshot_dir), run, snapshot_dir)[-1].step
    expected = _parameter_shapes(checkpoint, states, ckpt_path)
    found = {name: tuple(v.shape) for name, v in state.items()}
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or [n for n in expected if found[n] != expected[n]]
        raise ValueError(
            f"the snapshots in {str(snapshot_dir)!r} are of a different model than checkpoint {str(ckpt_path)!r} "
            f"({len(differ)} parameters differ in name or shape, e.g. {differ[0]!r})"
        )
    weights = checkpoint["state_dict"]
    for name, value in state.items():
        weights[name] = value.to(weights[name].dtype)
    for key in TRAINING_STATE:
        checkpoint.pop(key, None)
    checkpoint["posthoc_ema"] = {"sigma_rel": float(sigma_rel), "step": step, "snapshot_dir": str(snapshot_dir)}
    checkpoint[DIGEST_KEY] = checkpoint_digest(checkpoint)
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    torch.save(checkpoint, partial)
    partial.replace(output)
    return output


def ema_command(args: list[str]) -> Path:
    """``lightning-ddpm ema --ckpt_path C [--snapshot_dir D] --sigma_rel 0.08 [--step S] --output_path OUT.ckpt``:
    a checkpoint whose weights are the post-hoc EMA of width sigma_rel reconstructed from the run's snapshots
    (PostHocEMA); ``load_from_checkpoint``, ``predict`` and ``export`` take it."""
    parser = argparse.ArgumentParser(prog=f"{PROG} ema", description=ema_command.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of the run (its config and buffers)")
    parser.add_argument(
        "--snapshot_dir", default=None, help="PostHocEMA's snapshot folder (default: the one the checkpoint names)"
    )
    parser.add_argument("--sigma_rel", required=True, type=float, help="the EMA's relative width, in (0, 0.289)")
    parser.add_argument("--step", type=int, default=None, help="the step the EMA ends at (default: the last snapshot)")
    parser.add_argument("--output_path", required=True, help="the checkpoint to write")
    options = parser.parse_args(args)
    output = write_posthoc_checkpoint(
        options.ckpt_path, options.output_path, options.sigma_rel, options.snapshot_dir, options.step
    )
    print(f"wrote {output} (post-hoc EMA, sigma_rel {options.sigma_rel:g})")
    return output
