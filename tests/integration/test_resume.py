"""A training process killed with SIGKILL and resumed with --ckpt_path last ends exactly where an
uninterrupted run of the same length ends (CPU, deterministic)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_ddpm.ema import list_snapshots

ROOT = Path(__file__).resolve().parents[2]
MLP = {"name": "mlp", "init_args": {"hidden_dim": 32, "num_blocks": 2, "dropout": 0.1}}  # dropout uses the global RNG


def _command(root: Path, max_steps: int, *extra: str) -> list[str]:
    callbacks = [
        {"class_path": "lightning_ddpm.callbacks.EMA", "init_args": {"decay": 0.9}},
        {
            "class_path": "lightning_ddpm.callbacks.PostHocEMA",
            "init_args": {
                "snapshot_every_n_steps": 5,
                "snapshot_dir": str(root / "phema"),
                "snapshot_dtype": "float32",
            },
        },
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 5, "save_last": True, "save_top_k": -1},
        },
    ]
    return [
        sys.executable,
        "-m",
        "lightning_ddpm",
        "fit",
        "--config",
        str(ROOT / "configs/toy2d.yaml"),
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.deterministic=true",
        "--model.backbone",
        json.dumps(MLP),
        "--model.timestep_sampler",
        "loss_second_moment",
        "--model.num_timesteps=50",
        "--data.init_args.num_train=1280",
        "--data.init_args.batch_size=64",
        "--trainer.val_check_interval=10",
        "--trainer.limit_val_batches=2",
        f"--trainer.max_steps={max_steps}",
        "--trainer.callbacks",
        json.dumps(callbacks),
        *extra,
    ]


def _final(root: Path) -> dict:
    return torch.load(root / "ckpt" / "epoch=2-step=45.ckpt", weights_only=True)


def _assert_same_training_state(a: dict, b: dict) -> None:
    """EMA weights, raw weights and optimizer state of two checkpoints agree bit for bit."""
    for part in ("state_dict", "current_model_state"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=0, msg=f"{part}.{key}")
    for x, y in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for name in x:
            torch.testing.assert_close(x[name], y[name], rtol=0, atol=0)


def _kill_when_written(command: list[str], env: dict, marker: Path) -> None:
    """Start ``command`` in its own process group and SIGKILL the whole group once ``marker`` exists."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    subprocess.run(_command(straight, 45), env=env, check=True, capture_output=True, timeout=300)

    process = subprocess.Popen(_command(crashed, 45), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = crashed / "ckpt" / "epoch=1-step=30.ckpt"  # step 30 is the middle of epoch 1 (20 batches an epoch)
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists() and not (crashed / "ckpt" / "epoch=2-step=45.ckpt").exists(), "killed before the end"
    result = subprocess.run(
        _command(crashed, 45, "--ckpt_path", "last"), env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]

    a, b = _final(straight), _final(crashed)
    assert a["global_step"] == b["global_step"] == 45
    _assert_same_training_state(a, b)
    # PostHocEMA's profiles continue bit for bit: every snapshot (steps 5..45) equals the uninterrupted run's
    ours, theirs = list_snapshots(straight / "phema"), list_snapshots(crashed / "phema")
    assert [(s.step, s.sigma_rel) for s in ours] == [(s.step, s.sigma_rel) for s in theirs]
    assert [s.step for s in ours][::2] == list(range(5, 50, 5)) and len({s.run for s in theirs}) == 1
    for x, y in zip(ours, theirs):
        for key, value in x.load().items():
            torch.testing.assert_close(value, y.load()[key], rtol=0, atol=0, msg=f"{x.path.name} {key}")


def test_sigkill_then_resume_matches_an_uninterrupted_run_with_two_processes(tmp_path):
    """The same with DDP (2 gloo processes, 10 batches per rank and epoch): the whole process group is
    killed mid-epoch, and both ranks end bit-identical to an uninterrupted 2-process run."""
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}

    def command(root: Path, *extra: str) -> list[str]:
        cmd = _command(root, 45, *ddp, *extra)
        i = cmd.index("--trainer.callbacks") + 1
        callbacks = json.loads(cmd[i]) + [
            {"class_path": "tests.helpers.DumpWeights", "init_args": {"dirpath": str(root / "weights")}},
            # RNG streams that differ by rank, a faked device generator included
            {"class_path": "tests.helpers.PerRankRNG", "init_args": {"dirpath": str(root / "rng")}},
        ]
        cmd[i] = json.dumps(callbacks)
        return cmd

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    subprocess.run(command(straight), env=env, check=True, capture_output=True, timeout=300)
    marker = crashed / "ckpt" / "epoch=2-step=25.ckpt"  # the middle of epoch 2 (10 batches per rank)
    _kill_when_written(command(crashed), env, marker)  # rank 1 dies with rank 0
    assert marker.exists() and not (crashed / "ckpt" / "epoch=4-step=45.ckpt").exists(), "killed before the end"
    result = subprocess.run(
        command(crashed, "--ckpt_path", "last"), env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(p.name for p in (crashed / "ckpt").iterdir())
    assert (crashed / "ckpt" / "epoch=4-step=45.ckpt").exists(), (files, result.stderr[-3000:])

    _assert_same_training_state(
        torch.load(straight / "ckpt" / "epoch=4-step=45.ckpt", weights_only=True),
        torch.load(crashed / "ckpt" / "epoch=4-step=45.ckpt", weights_only=True),
    )
    for rank in (0, 1):  # each rank's final raw weights, not only rank 0's checkpoint
        wa = torch.load(straight / "weights" / f"rank{rank}.pt", weights_only=True)
        wb = torch.load(crashed / "weights" / f"rank{rank}.pt", weights_only=True)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=f"rank {rank} {key}")
    # Every rank resumes its own RNG streams (CPU and device), not rank 0's: the checkpoint holds one state per
    # rank, and each rank's streams end where the uninterrupted run's do.
    assert len(torch.load(marker, weights_only=True)["rng_states"]["per_rank"]) == 2
    ranks = [torch.load(straight / "rng" / f"rng_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert not torch.equal(ranks[0]["device"], ranks[1]["device"])
    for rank in (0, 1):
        b = torch.load(crashed / "rng" / f"rng_rank{rank}.pt", weights_only=True)
        assert torch.equal(ranks[rank]["torch"], b["torch"]) and torch.equal(ranks[rank]["device"], b["device"]), rank


def test_resume_from_a_checkpoint_written_on_the_last_batch_of_an_epoch(tmp_path):
    """Lightning starts the next epoch afresh; the data order must not skip that epoch's batches too."""
    from lightning_ddpm.cli import run_cli

    def fit(root: Path, max_steps: int, *extra: str):
        callbacks = [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(root), "every_n_train_steps": 4, "save_top_k": -1},
            }
        ]
        run_cli(
            [
                "fit",
                "--config",
                str(ROOT / "configs/toy2d.yaml"),
                "--model.backbone",
                json.dumps({"name": "mlp", "init_args": {"hidden_dim": 16, "num_blocks": 1}}),
                "--data.init_args.num_train=256",
                "--data.init_args.batch_size=64",  # 4 batches an epoch
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                "--trainer.limit_val_batches=0",
                "--trainer.deterministic=true",
                f"--trainer.default_root_dir={root}",
                f"--trainer.max_steps={max_steps}",
                "--trainer.callbacks",
                json.dumps(callbacks),
                *extra,
            ]
        )

    fit(tmp_path / "straight", 8)
    fit(tmp_path / "resumed", 4)
    fit(tmp_path / "resumed", 8, "--ckpt_path", str(tmp_path / "resumed" / "epoch=0-step=4.ckpt"))
    a = torch.load(tmp_path / "straight" / "epoch=1-step=8.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "epoch=1-step=8.ckpt", weights_only=True)  # epoch 1, not 2
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)


def test_an_unseeded_run_resumes_exactly_too(tmp_path):
    """Nothing seeds the process (seed_everything off): a restarted process has another torch seed, but resuming
    restores the global RNG (dropout), and with it torch.initial_seed(), which keys the training steps' draws."""
    from lightning_ddpm.cli import run_cli

    def fit(root: Path, max_steps: int, process_seed: int, *extra: str):
        torch.manual_seed(process_seed)  # what a fresh, unseeded process would have: some random seed
        callbacks = [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(root), "every_n_train_steps": 4, "save_top_k": -1},
            }
        ]
        run_cli(
            [
                "fit",
                "--config",
                str(ROOT / "configs/toy2d.yaml"),
                "--seed_everything=false",
                "--model.backbone",
                json.dumps({"name": "mlp", "init_args": {"hidden_dim": 16, "num_blocks": 1, "dropout": 0.1}}),
                "--data.init_args.num_train=256",
                "--data.init_args.batch_size=64",  # 4 batches an epoch
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                "--trainer.limit_val_batches=0",
                "--trainer.deterministic=true",
                f"--trainer.default_root_dir={root}",
                f"--trainer.max_steps={max_steps}",
                "--trainer.callbacks",
                json.dumps(callbacks),
                *extra,
            ]
        )

    fit(tmp_path / "straight", 8, process_seed=1234)
    fit(tmp_path / "resumed", 4, process_seed=1234)
    fit(tmp_path / "resumed", 8, 98765, "--ckpt_path", str(tmp_path / "resumed" / "epoch=0-step=4.ckpt"))
    a = torch.load(tmp_path / "straight" / "epoch=1-step=8.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "epoch=1-step=8.ckpt", weights_only=True)
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)


def test_sigkill_then_resume_with_two_workers_and_random_flips(tmp_path):
    """The image configs' data path: 2 worker processes and random flips. The resumed run's new workers must
    flip exactly the images the uninterrupted run's workers flipped (each flip a function of seed, epoch and
    index, not of a worker's RNG stream), and the U-Net's dropout must continue too."""
    unet = {
        "name": "unet",
        "init_args": {
            "ch": 16,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "norm_groups": 4,
            "dropout": 0.1,
        },
    }

    def command(root: Path, *extra: str) -> list[str]:
        callbacks = [
            {"class_path": "lightning_ddpm.callbacks.EMA", "init_args": {"decay": 0.9}},
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 4, "save_top_k": -1},
            },
        ]
        return [
            sys.executable,
            "-m",
            "lightning_ddpm",
            "fit",
            "--config",
            str(ROOT / "configs/digits.yaml"),
            f"--trainer.default_root_dir={root}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.deterministic=true",
            "--trainer.limit_val_batches=0",
            "--model.backbone",
            json.dumps(unet),
            "--model.num_timesteps=50",
            "--trainer.max_steps=20",
            "--data.init_args.batch_size=128",
            "--data.init_args.num_workers=2",  # 12 batches an epoch
            "--data.init_args.random_flip=true",
            "--trainer.callbacks",
            json.dumps(callbacks),
            *extra,
        ]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    subprocess.run(command(straight), env=env, check=True, capture_output=True, timeout=300)
    marker = crashed / "ckpt" / "epoch=1-step=16.ckpt"  # the middle of epoch 1 (12 batches an epoch)
    _kill_when_written(command(crashed), env, marker)  # the workers die with it
    final = "epoch=1-step=20.ckpt"
    assert marker.exists() and not (crashed / "ckpt" / final).exists(), "killed before the end"
    result = subprocess.run(
        command(crashed, "--ckpt_path", str(marker)), env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_training_state(
        torch.load(straight / "ckpt" / final, weights_only=True),
        torch.load(crashed / "ckpt" / final, weights_only=True),
    )


def test_rng_states_restore_per_rank_and_warn_when_the_world_size_changes():
    import pytest

    from lightning_ddpm.training.checkpoints import restore_rng_states

    saved = [{"torch": torch.Generator().manual_seed(seed).get_state()} for seed in (1, 2)]
    before = torch.get_rng_state()
    try:
        restore_rng_states({"per_rank": saved}, torch.device("cpu"), rank=1, world_size=2)
        assert torch.equal(torch.get_rng_state(), saved[1]["torch"])
        with pytest.warns(UserWarning, match="resuming with 1 processes a run checkpointed with 2: ranks below 1"):
            restore_rng_states({"per_rank": saved}, torch.device("cpu"), rank=0, world_size=1)
        assert torch.equal(torch.get_rng_state(), saved[0]["torch"])
        torch.set_rng_state(before)
        restore_rng_states({"per_rank": saved}, torch.device("cpu"), rank=2, world_size=3)  # a new rank keeps its own
        assert torch.equal(torch.get_rng_state(), before)
        restore_rng_states({"torch": saved[1]["torch"]}, torch.device("cpu"), rank=0, world_size=1)  # the old format
        assert torch.equal(torch.get_rng_state(), saved[1]["torch"])
    finally:
        torch.set_rng_state(before)
