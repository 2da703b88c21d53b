"""PostHocEMA under DDP (2 gloo processes): rank 0 writes the snapshots, and they are those of 1 process with
the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from lightning_ddpm.ema import list_snapshots

ROOT = Path(__file__).resolve().parents[2]


def _run(devices: int, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.phema_ddp_script", str(devices), str(out)],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_write_the_snapshots_of_one_process_with_the_same_global_batch(tmp_path):
    _run(1, tmp_path / "one")
    _run(2, tmp_path / "two")
    one, two = list_snapshots(tmp_path / "one"), list_snapshots(tmp_path / "two")
    assert (
        [(s.step, s.sigma_rel) for s in two]
        == [(s.step, s.sigma_rel) for s in one]
        == [(8, 0.05), (8, 0.1), (16, 0.05), (16, 0.1), (24, 0.05), (24, 0.1)]
    )
    assert len({s.run for s in two}) == 1  # one run id, broadcast from rank 0
    for a, b in zip(one, two):
        x, y = a.load(), b.load()
        assert x.keys() == y.keys() == {"net.weight", "net.bias"}
        for key in x:  # the same sums in another order (all-reduce): float32 rounding apart
            torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(one[0].load()["net.weight"], one[-2].load()["net.weight"])  # the profiles moved
    # and the setup is what it claims: the trained weights agree too
    torch.testing.assert_close(
        torch.load(tmp_path / "one" / "weights_rank0.pt"), torch.load(tmp_path / "two" / "weights_rank1.pt")
    )
