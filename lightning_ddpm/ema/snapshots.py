"""Post-hoc EMA snapshots on disk and the reconstruction of an EMA of any length from them (torch only).

A snapshot is one file per (run, step, profile), ``phema-<run>-<step>-<sigma_rel>.pt``: the profile's averaged
parameters after that optimizer step (in the snapshot dtype) with the run's id, the step, sigma_rel, gamma and a
fingerprint of the parameters' names and shapes. :func:`reconstruct` combines the snapshots of one run taken
at or before a step by least squares (:func:`~lightning_ddpm.ema.power.solve_coefficients`).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .power import PowerProfile, check_sigma_rel, reconstruction_error, solve_coefficients

__all__ = ["FORMAT", "Snapshot", "fingerprint", "list_snapshots", "reconstruct", "save_snapshot", "snapshot_name"]

FORMAT = "lightning-ddpm post-hoc EMA snapshot 1"
_NAME = re.compile(r"phema-([0-9a-zA-Z_]+)-(\d+)-([0-9.]+)\.pt")
# reconstruct() warns above this relative L2 error of the fitted profile: the stored profiles 0.05 and 0.10 with
# snapshots every 50 steps give 2.6% at sigma_rel 0.02 and 0.25 and 12.7% at 0.01 after 2000 steps
RECONSTRUCTION_WARNING = 0.05


def fingerprint(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """A short digest of parameter names and shapes: snapshots of one model share it."""
    digest = hashlib.sha256()
    for name, shape in shapes:
        digest.update(f"{name}:{tuple(shape)};".encode())
    return digest.hexdigest()[:16]


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """:func:`fingerprint` of a state dict's entries."""
    return fingerprint((name, tuple(value.shape)) for name, value in state.items())


def snapshot_name(run: str, step: int, sigma_rel: float) -> str:
    """The file name: the run's id first, so that two runs sharing a folder never overwrite each other."""
    return f"phema-{run}-{step:09d}-{sigma_rel:.4f}.pt"


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot file says about itself (its tensors stay on disk until :meth:`load`)."""

    path: Path
    run: str
    step: int
    sigma_rel: float
    gamma: float
    model: str

    def load(self) -> dict[str, torch.Tensor]:
        return torch.load(self.path, map_location="cpu", weights_only=True)["state_dict"]


def save_snapshot(
    directory: Path, run: str, step: int, profile: PowerProfile, state: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> Path:
    """Write one profile's average after ``step`` (full CPU tensors) as a snapshot file; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / snapshot_name(run, step, profile.sigma_rel)
    tensors = {name: value.detach().to(device="cpu", dtype=dtype) for name, value in state.items()}
    record = {
        "format": FORMAT,
        "run": run,
        "step": step,
        "sigma_rel": profile.sigma_rel,
        "gamma": profile.gamma,
        "model": state_fingerprint(tensors),
        "state_dict": tensors,
    }
    partial = path.with_suffix(".pt.partial")
    torch.save(record, partial)
    partial.replace(path)  # a crash mid-write leaves no truncated snapshot behind
    return path


def list_snapshots(snapshot_dir: str | Path) -> list[Snapshot]:
    """Every snapshot file in ``snapshot_dir``, by step then sigma_rel (tensors are memory-mapped, not read)."""
    directory = Path(snapshot_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"snapshot_dir {str(directory)!r} does not exist")
    found = []
    for path in sorted(directory.glob("phema-*.pt")):
        if not _NAME.fullmatch(path.name):
            continue
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if record.get("format") != FORMAT:
            continue
        found.append(
            Snapshot(path, record["run"], int(record["step"]), record["sigma_rel"], record["gamma"], record["model"])
        )
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def select_run(snapshots: list[Snapshot], run: str | None, snapshot_dir: str | Path) -> list[Snapshot]:
    """The snapshots of ``run`` (of the only run in the folder when ``None``)."""
    runs = sorted({s.run for s in snapshots})
    if not runs:
        raise FileNotFoundError(f"snapshot_dir {str(snapshot_dir)!r} holds no post-hoc EMA snapshots (phema-*.pt)")
    if run is None:
        if len(runs) > 1:
            raise ValueError(
                f"snapshot_dir {str(snapshot_dir)!r} holds snapshots of {len(runs)} runs ({', '.join(runs)}); "
                "pass run= (the --ckpt_path of the command line names its own)"
            )
        run = runs[0]
    if run not in runs:
        raise ValueError(f"snapshot_dir {str(snapshot_dir)!r} holds no snapshots of run {run!r}; it has {runs}")
    return [s for s in snapshots if s.run == run]


def reconstruct(
    snapshot_dir: str | Path, sigma_rel: float, step: int | None = None, run: str | None = None
) -> dict[str, torch.Tensor]:
    """The post-hoc EMA of width ``sigma_rel`` after ``step``: a float32 state dict of the parameters.

    Args:
        snapshot_dir: the folder :class:`~lightning_ddpm.callbacks.PostHocEMA` wrote.
        sigma_rel: the EMA's relative width, in (0, 0.289).
        step: the optimizer step the EMA ends at (default: the last snapshot's); only snapshots taken at or
            before it are used.
        run: the run whose snapshots to use (default: the only run in the folder).
    """
    sigma_rel = check_sigma_rel(sigma_rel)
    chosen = select_run(list_snapshots(snapshot_dir), run, snapshot_dir)
    first, last = chosen[0].step, chosen[-1].step
    step = last if step is None else int(step)
    if step < first:
        raise ValueError(f"step {step} is before the first snapshot (step {first}) in {str(snapshot_dir)!r}")
    chosen = [s for s in chosen if s.step <= step]
    if len({s.sigma_rel for s in chosen}) < 2:
        raise ValueError(
            f"reconstruction needs snapshots of at least two profiles (sigma_rels), {str(snapshot_dir)!r} has "
            f"{sorted({s.sigma_rel for s in chosen})} up to step {step}"
        )
    models = {s.model for s in chosen}
    if len(models) > 1:
        raise ValueError(f"the snapshots in {str(snapshot_dir)!r} are of {len(models)} different models")
    steps = torch.tensor([s.step for s in chosen])
    gammas = torch.tensor([s.gamma for s in chosen], dtype=torch.float64)
    gamma = PowerProfile(sigma_rel).gamma
    coefficients = solve_coefficients(steps, gammas, step, gamma)
    error = reconstruction_error(steps, gammas, step, gamma, coefficients)
    if error > RECONSTRUCTION_WARNING:
        warnings.warn(
            f"sigma_rel {sigma_rel:g} at step {step} (a width of about {sigma_rel * step:.3g} steps) is reconstructed "
            f"from {len(chosen)} snapshots of sigma_rels {sorted({s.sigma_rel for s in chosen})} with an error of "
            f"{error:.1%} in its profile (L2): take snapshots more often (snapshot_every_n_steps) or choose a "
            "sigma_rel nearer the stored ones",
            stacklevel=2,
        )
    out: dict[str, torch.Tensor] = {}
    for snapshot, weight in zip(chosen, coefficients.tolist()):
        for name, value in snapshot.load().items():
            term = value.to(torch.float64) * weight  # float64: the coefficients can be large and of both signs
            out[name] = out[name] + term if name in out else term
    return {name: value.to(torch.float32) for name, value in out.items()}
