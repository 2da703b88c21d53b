import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ddpm import DiffusionModule
from lightning_ddpm.cli import run_cli
from tests.helpers import RecordWeights

ROOT = Path(__file__).resolve().parents[2]
MLP = {"name": "mlp", "init_args": {"hidden_dim": 8, "num_blocks": 1}}


def _loader(n=16):
    return torch.utils.data.DataLoader(
        [torch.randn(32, 2, generator=torch.Generator().manual_seed(i)) for i in range(n)], batch_size=None
    )


def _nan_at(module, bad_calls):
    """Make the backbone return NaN on the given training calls (counted from 0)."""
    forward, calls = module.backbone.forward, [0]

    def patched(x, t, cond=None):
        out = forward(x, t, cond)
        if module.training:
            calls[0] += 1
            if calls[0] - 1 in bad_calls:
                return out * float("nan")
        return out

    module.backbone.forward = patched


def _trainer(tmp_path, callbacks, max_steps):
    # log_every_n_steps=1: the device-side non-finite counts are read back (and reported) every step
    return Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )


# Adam is fused by default and skips a non-finite step on the device (found_inf); SGD is not, and
# falls back to deciding on the host.
OPTIMIZERS = {"device": None, "host": {"name": "torch.optim.SGD", "init_args": {"lr": 0.05}}}


@pytest.mark.parametrize("path", sorted(OPTIMIZERS))
def test_nonfinite_steps_are_skipped(tmp_path, path):
    module = DiffusionModule(
        backbone=MLP, data_shape=[2], num_timesteps=20, lr_warmup_steps=0, optimizer=OPTIMIZERS[path]
    )
    _nan_at(module, {2, 3})
    record = RecordWeights()
    with pytest.warns(
        UserWarning, match=r"non-finite loss at step 2 \(timesteps \d+\.\.\d+\): step skipped \(1 skipped"
    ):
        _trainer(tmp_path, [record], max_steps=5).fit(module, _loader())
    assert module.nonfinite.on_device == (path == "device")
    # batches 2 and 3 changed nothing (Lightning still counts them toward max_steps); batch 4 trained again
    for a, b in zip(record.after_step[1], record.after_step[3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(record.after_step[3], record.after_step[4]))
    assert len(record.after_step) == 5 and module.nonfinite.in_a_row == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())


GRADIENT_OPTIMIZERS = {
    **OPTIMIZERS,
    "host-momentum": {"name": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
    "host-adam-foreach": {"name": "torch.optim.Adam", "init_args": {"lr": 1e-3, "foreach": True}},
}


@pytest.mark.parametrize("path", sorted(GRADIENT_OPTIMIZERS))
def test_steps_with_nonfinite_gradients_and_a_finite_loss_are_skipped(tmp_path, path):
    """A NaN in one gradient while the loss is finite (a bad backward, not a bad forward): both paths skip the
    step, weights and optimizer state untouched; the host path once checked the loss only and stepped."""
    module = DiffusionModule(
        backbone=MLP, data_shape=[2], num_timesteps=20, lr_warmup_steps=0, optimizer=GRADIENT_OPTIMIZERS[path]
    )
    calls = [0]

    def poison(grad):  # the first backbone parameter's gradient gets one NaN in backward 2 (step 2)
        calls[0] += 1
        if calls[0] != 3:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad

    next(module.backbone.parameters()).register_hook(poison)
    record, states = RecordWeights(), []

    class OptimizerState(RecordWeights):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state = trainer.optimizers[0].state
            states.append([v.clone() for s in state.values() for v in s.values() if torch.is_tensor(v)])

    with pytest.warns(
        UserWarning, match=r"non-finite (gradients|loss) at step 2 \(timesteps \d+\.\.\d+\): step skipped"
    ):
        _trainer(tmp_path, [record, OptimizerState()], max_steps=5).fit(module, _loader())
    assert module.nonfinite.on_device == (path == "device")
    for a, b in zip(record.after_step[1], record.after_step[2]):  # step 2 changed nothing
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(states[1], states[2]):  # nor the optimizer's state (momentum, moments)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(record.after_step[2], record.after_step[3]))  # step 3 trained
    assert module.nonfinite.in_a_row == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("path", sorted(OPTIMIZERS))
def test_training_stops_after_k_nonfinite_steps_keeping_the_last_checkpoint(tmp_path, path):
    module = DiffusionModule(
        backbone=MLP, data_shape=[2], num_timesteps=20, max_nonfinite_steps=3, optimizer=OPTIMIZERS[path]
    )
    _nan_at(module, set(range(4, 100)))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    record = RecordWeights()
    # Lightning counts skipped batches as steps: NaN from the 5th batch (step 4), stop at the 3rd, step 6.
    with (
        pytest.raises(RuntimeError, match=r"training stopped: 3 non-finite losses in a row, the last at step 6"),
        pytest.warns(UserWarning, match="non-finite"),
    ):
        _trainer(tmp_path, [record, ckpt], max_steps=20).fit(module, _loader())
    good = DiffusionModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    for got, want in zip(good.backbone.parameters(), record.after_step[3]):  # the weights of the last good step
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_nonfinite_counts_are_read_back_only_every_log_every_n_steps(tmp_path, monkeypatch):
    from lightning_ddpm.training.nonfinite import NonFiniteGuard

    checks = []
    real_check = NonFiniteGuard.check
    monkeypatch.setattr(
        NonFiniteGuard,
        "check",
        lambda self, trainer=None: (checks.append(trainer.global_step), real_check(self, trainer)),
    )
    module = DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=20)
    trainer = Trainer(
        max_steps=12,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        log_every_n_steps=5,
        enable_checkpointing=False,
    )
    trainer.fit(module, _loader())
    assert checks == [5, 10, 12]  # every 5 steps and once at the end


def test_truncated_checkpoint_is_named_and_the_previous_one_still_loads(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    _trainer(tmp_path, [ckpt], max_steps=2).fit(
        DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=20), _loader()
    )
    latest, previous = tmp_path / "ckpt" / "epoch=0-step=2.ckpt", tmp_path / "ckpt" / "epoch=0-step=1.ckpt"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"epoch=0-step=2.ckpt' is truncated or corrupt"):
        DiffusionModule.load_from_checkpoint(latest)
    with pytest.raises(ValueError, match="is truncated or corrupt"):  # the CLI's --ckpt_path says the same
        run_cli(
            [
                "fit",
                "--config",
                str(ROOT / "configs/toy2d.yaml"),
                "--model.backbone",
                json.dumps(MLP),
                "--model.num_timesteps=20",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=false",
                "--trainer.max_steps=3",
                "--ckpt_path",
                str(latest),
            ]
        )
    assert isinstance(DiffusionModule.load_from_checkpoint(previous), DiffusionModule)


@pytest.mark.parametrize("crash_in", ["serialising", "writing"])
def test_a_crash_while_writing_a_checkpoint_keeps_the_old_file(tmp_path, monkeypatch, crash_in):
    import io

    from fsspec.implementations.local import LocalFileOpener

    module = DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=20)
    trainer = _trainer(tmp_path, [], max_steps=1)
    trainer.fit(module, _loader())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()
    with torch.no_grad():  # the checkpoint being written differs from the one on disk
        for p in module.parameters():
            p.add_(1)

    def half(data: bytes) -> bytes:
        return data[: len(data) // 2]

    if crash_in == "serialising":  # torch.save gets half way, into whatever it writes to, then fails
        real_save = torch.save

        def crashing_save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            if isinstance(f, (str, Path)):
                Path(f).write_bytes(half(buffer.getvalue()))
            else:
                f.write(half(buffer.getvalue()))
            raise OSError("disk full (simulated) in the middle of writing")

        monkeypatch.setattr(torch, "save", crashing_save)
    else:  # the file write itself gets half way (Lightning writes local files through fsspec)

        def crashing_write(self, data, *args, **kwargs):
            self.f.write(half(bytes(data)))
            raise OSError("disk full (simulated) in the middle of writing")

        monkeypatch.setattr(LocalFileOpener, "write", crashing_write)
    with pytest.raises(OSError, match="simulated"):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert isinstance(DiffusionModule.load_from_checkpoint(path), DiffusionModule)
    trainer.save_checkpoint(tmp_path / "new.ckpt")  # what the crashed save would have written
    assert (tmp_path / "new.ckpt").read_bytes() != before


def test_cli_checkpoints_load_with_weights_only(tmp_path):
    callbacks = json.dumps(
        [
            {"class_path": "lightning_ddpm.callbacks.EMA", "init_args": {"decay": 0.9}},
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
            },
        ]
    )
    run_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs/digits.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--model.num_timesteps=20",
            "--trainer.callbacks",
            callbacks,
            "--model.backbone",
            json.dumps({"name": "unet", "init_args": {"ch": 32, "ch_mult": [1, 2], "attn_resolutions": []}}),
        ]
    )
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)  # no pickled objects: plain data and tensors only
    assert "current_model_state" in checkpoint and checkpoint["hyper_parameters"]["backbone"]["name"] == "unet"
    assert isinstance(DiffusionModule.load_from_checkpoint(path, weights_only=True), DiffusionModule)


def test_nonfinite_guard_keeps_streaks_across_checks_and_outgrows_its_buffer():
    from lightning_ddpm.training.nonfinite import NonFiniteGuard

    guard, p = NonFiniteGuard(max_in_a_row=3), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([p], fused=True)
    guard.start(optimizer, scaler=False, device=torch.device("cpu"))

    def step(i, bad):
        p.grad = torch.tensor([float("nan") if bad else 1.0, 2.0])
        guard.remember(torch.tensor(0.0), torch.tensor([i, i + 5, i + 1]))
        guard.before_optimizer_step(optimizer, [p], i)
        return float(optimizer.found_inf)

    # 100 steps between two checks: more than the buffer first holds (64)
    assert [step(i, bad=i == 70) for i in range(100)] == [float(i == 70) for i in range(100)]
    assert p.grad.tolist() == [1.0, 2.0]  # the check scales by 1: gradients unchanged
    with pytest.warns(
        UserWarning,
        match=r"at step 70 \(timesteps 70\.\.75\): step skipped \(1 skipped since the last "
        r"check, 0/3 in a row\)",
    ):
        guard.check()
    step(100, bad=True)
    with pytest.warns(UserWarning, match=r"1/3 in a row"):
        guard.check()
    assert step(101, bad=True) == 1.0 and step(102, bad=True) == 1.0
    with pytest.raises(
        RuntimeError, match=r"3 non-finite losses in a row, the last at step 102 \(timesteps 102\.\.107\)"
    ):
        guard.check()


def test_nonfinite_guard_checks_gradients_of_every_dtype():
    from lightning_ddpm.training.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(max_in_a_row=5)
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    optimizer = torch.optim.Adam(params, fused=True)
    guard.start(optimizer, scaler=False, device=torch.device("cpu"))
    flags = []
    for i, bad in enumerate([None, 0, 1]):  # which parameter's gradient holds an inf
        for j, p in enumerate(params):
            p.grad = torch.tensor([float("inf") if j == bad else 1.0, 1.0], dtype=p.dtype)
        guard.remember(torch.tensor(0.0), torch.tensor([i]))
        guard.before_optimizer_step(optimizer, params, i)
        flags.append(float(optimizer.found_inf))
    assert flags == [0.0, 1.0, 1.0]


def test_ddp_ranks_skip_and_stop_together_when_one_rank_goes_non_finite(tmp_path):
    """Two gloo processes; rank 0's loss is NaN at step 2 (one skipped step), then from step 5 on: with
    max_nonfinite_steps=2 both ranks stop at step 6, with the same weights, untouched by the NaN steps."""
    import os
    import subprocess
    import sys

    dump = tmp_path / "dump"
    callbacks = [
        {
            "class_path": "tests.helpers.NaNOutputOnRank",
            "init_args": {"rank": 0, "steps": [2, *range(5, 20)], "dirpath": str(dump)},
        }
    ]
    cmd = [
        sys.executable,
        "-m",
        "lightning_ddpm",
        "fit",
        "--config",
        str(ROOT / "configs/toy2d.yaml"),
        "--model.backbone",
        json.dumps(MLP),
        "--model.num_timesteps=20",
        "--model.max_nonfinite_steps=2",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=20",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.num_train=2048",
        "--trainer.callbacks",
        json.dumps(callbacks),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "non-finite loss at step 2" in result.stderr, result.stderr[-3000:]
    for rank in (0, 1):  # rank 1's own loss stayed finite: its stop comes from the shared gradients
        assert (
            "training stopped: 2 non-finite losses in a row, the last at step 6"
            in (dump / f"rank{rank}.txt").read_text()
        )
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
        assert torch.isfinite(rank0[key]).all(), key
