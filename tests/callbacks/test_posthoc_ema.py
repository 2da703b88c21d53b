"""PostHocEMA in training runs: its profiles are the closed-form averages of the recorded weights, a profile
tracked directly is reconstructed from two others' snapshots, a resumed run continues bit for bit, and
``lightning-ddpm ema`` writes a checkpoint that load_from_checkpoint, predict and export take."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ddpm import DiffusionModule
from lightning_ddpm.callbacks import EMA, PostHocEMA
from lightning_ddpm.cli import main
from lightning_ddpm.cli.ema import write_posthoc_checkpoint
from lightning_ddpm.data import Toy2DDataModule
from lightning_ddpm.ema import PowerProfile, list_snapshots, reconstruct
from lightning_ddpm.ema.snapshots import save_snapshot
from lightning_ddpm.training.checkpoints import DIGEST_KEY
from tests.helpers import RecordWeights, toy_module

ROOT = Path(__file__).resolve().parents[2]


def _fit(tmp_path, callbacks, max_steps, module=None, ckpt_path=None, **kw) -> DiffusionModule:
    module = module or toy_module(0)
    Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **{"enable_checkpointing": False, **kw},
    ).fit(
        module, datamodule=Toy2DDataModule("two_moons", num_train=512, num_val=64, batch_size=32), ckpt_path=ckpt_path
    )
    return module


def _snapshot(folder: Path, step: int, sigma_rel: float) -> dict[str, torch.Tensor]:
    (found,) = [s for s in list_snapshots(folder) if s.step == step and s.sigma_rel == sigma_rel]
    return found.load()


def test_profiles_are_the_closed_form_averages_of_the_weights_and_leave_training_alone(tmp_path):
    record = RecordWeights()
    phema = PostHocEMA(
        (0.05, 0.10), snapshot_every_n_steps=3, snapshot_dir=str(tmp_path / "phema"), snapshot_dtype="float32"
    )
    module = _fit(tmp_path, [record, phema], max_steps=10)
    # every 3 steps, and at the end of fit
    assert sorted({s.step for s in list_snapshots(tmp_path / "phema")}) == [3, 6, 9, 10]
    names = [n for n, _ in module.backbone.named_parameters()]
    for t in (3, 6, 9, 10):
        for sigma_rel in (0.05, 0.10):
            weights = PowerProfile(sigma_rel).weights(t)
            state = _snapshot(tmp_path / "phema", t, sigma_rel)
            for i, name in enumerate(names):
                expected = sum(w * step[i].double() for w, step in zip(weights.tolist(), record.after_step[:t]))
                torch.testing.assert_close(state[f"backbone.{name}"].double(), expected, rtol=1e-5, atol=1e-6)
    # the module trained as without the callback: its weights are the last step's raw weights
    plain = _fit(tmp_path / "plain", [], max_steps=10)
    for a, b in zip(module.parameters(), plain.parameters()):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """40 steps tracking 0.05 and 0.10 (folder a) and, directly, 0.07 (folder b), snapshots every 2 steps,
    beside the classic EMA; checkpoints at steps 20 and 40."""
    tmp = tmp_path_factory.mktemp("phema")
    stored = PostHocEMA((0.05, 0.10), 2, str(tmp / "a"), "float32")
    direct = PostHocEMA((0.07, 0.2), 2, str(tmp / "b"), "float32")
    checkpoints = ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=20, save_top_k=-1)
    _fit(tmp, [EMA(decay=0.9), stored, direct, checkpoints], max_steps=40, enable_checkpointing=True)
    return tmp


def _ckpt(run: Path, step: int) -> Path:
    (path,) = (run / "ckpt").glob(f"*-step={step}.ckpt")
    return path


def _relative_error(a: dict, b: dict, scale: dict) -> float:
    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in a).sqrt()
    return (num / sum(v.double().pow(2).sum() for v in scale.values()).sqrt()).item()


def test_a_directly_tracked_profile_is_reconstructed_from_two_others(run):
    got = reconstruct(run / "a", sigma_rel=0.07)
    want = _snapshot(run / "b", 40, 0.07)
    apart = {k: _snapshot(run / "a", 40, 0.05)[k] - _snapshot(run / "a", 40, 0.10)[k] for k in want}
    error = _relative_error(got, want, apart)
    assert error < 0.02, error
    assert got.keys() == want.keys() and all(v.dtype == torch.float32 for v in got.values())


def test_reconstructing_a_stored_profile_returns_it(run):
    for sigma_rel in (0.05, 0.10):
        for step in (10, 40):
            got = reconstruct(run / "a", sigma_rel=sigma_rel, step=step)
            torch.testing.assert_close(got, _snapshot(run / "a", step, sigma_rel), rtol=1e-5, atol=1e-6)


def test_only_snapshots_at_or_before_the_step_and_of_this_run_are_used(run, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for snapshot in list_snapshots(run / "a"):
        (folder / snapshot.path.name).write_bytes(snapshot.path.read_bytes())
    expected = reconstruct(folder, sigma_rel=0.07, step=20)
    # later snapshots of the same run turned to NaN: a reconstruction up to step 20 must not read them
    own = list_snapshots(folder)[0]
    for step in (22, 30, 40):
        for profile in (PowerProfile(0.05), PowerProfile(0.10)):
            poisoned = {k: torch.full_like(v, float("nan")) for k, v in own.load().items()}
            save_snapshot(folder, own.run, step, profile, poisoned, torch.float32)
    torch.testing.assert_close(reconstruct(folder, sigma_rel=0.07, step=20), expected, rtol=0, atol=0)
    # a second run's files in the folder: refused unless the run is named, never mixed in
    save_snapshot(folder, "otherrun", 4, PowerProfile(0.05), own.load(), torch.float32)
    with pytest.raises(ValueError, match="holds snapshots of 2 runs"):
        reconstruct(folder, sigma_rel=0.07, step=20)
    torch.testing.assert_close(reconstruct(folder, sigma_rel=0.07, step=20, run=own.run), expected, rtol=0, atol=0)


def test_refusals(run, tmp_path):
    with pytest.raises(ValueError, match=r"sigma_rel must lie in \(0, 0.289\)"):
        reconstruct(run / "a", sigma_rel=0.3)
    with pytest.raises(ValueError, match="step 1 is before the first snapshot"):
        reconstruct(run / "a", sigma_rel=0.07, step=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reconstruct(tmp_path / "nowhere", sigma_rel=0.07)
    one = tmp_path / "one"
    own = list_snapshots(run / "a")[0]
    save_snapshot(one, own.run, 2, PowerProfile(0.05), own.load(), torch.float32)
    with pytest.raises(ValueError, match="at least two profiles"):
        reconstruct(one, sigma_rel=0.07)
    other = {k + ".x": v for k, v in own.load().items()}
    save_snapshot(one, own.run, 4, PowerProfile(0.10), other, torch.float32)
    with pytest.raises(ValueError, match="of 2 different models"):
        reconstruct(one, sigma_rel=0.07)
    with pytest.raises(ValueError, match="at least two different sigma_rels"):
        PostHocEMA((0.05,))
    with pytest.raises(ValueError, match="at least two different sigma_rels"):
        PostHocEMA((0.05, 0.05))
    with pytest.raises(ValueError, match="snapshot_every_n_steps must be an integer >= 1"):
        PostHocEMA(snapshot_every_n_steps=0)
    with pytest.raises(ValueError, match="snapshot_dtype must be one of"):
        PostHocEMA(snapshot_dtype="int8")


def test_reconstructing_a_width_the_snapshots_cannot_represent_warns(tmp_path):
    # configs/digits.yaml's spacing (0.05 and 0.10 every 50 steps, 2000 steps): 0.01 is fitted with a 12.7% error
    # in its profile, 0.07 to 0.06%; the warning names the width, the error and the setting that helps
    state = {"w": torch.ones(3)}
    for step in range(50, 2001, 50):
        for sigma_rel in (0.05, 0.10):
            save_snapshot(tmp_path, "r", step, PowerProfile(sigma_rel), state, torch.float32)
    with pytest.warns(UserWarning, match=r"sigma_rel 0.01 at step 2000 .* error of 12\.7% .*snapshot_every_n_steps"):
        out = reconstruct(tmp_path, sigma_rel=0.01)
    torch.testing.assert_close(out["w"], torch.ones(3))  # an average of a constant is that constant, warning or not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reconstruct(tmp_path, sigma_rel=0.07)
        reconstruct(tmp_path, sigma_rel=0.02)  # 2.6%: below the 5% threshold


def test_a_resumed_run_continues_its_profiles_bit_for_bit(tmp_path):
    def callbacks(folder):
        return [
            PostHocEMA((0.05, 0.10), 3, str(folder), "float32"),
            ModelCheckpoint(dirpath=folder.parent / "ckpt", every_n_train_steps=6, save_top_k=-1),
        ]

    whole = tmp_path / "whole" / "phema"
    _fit(tmp_path / "whole", callbacks(whole), max_steps=12, enable_checkpointing=True)
    part = tmp_path / "part" / "phema"
    _fit(tmp_path / "part", callbacks(part), max_steps=6, enable_checkpointing=True)
    resumed = callbacks(tmp_path / "elsewhere")  # the checkpoint's folder wins: one run, one folder
    _fit(
        tmp_path / "part",
        resumed,
        max_steps=12,
        enable_checkpointing=True,
        ckpt_path=tmp_path / "part" / "ckpt" / "epoch=0-step=6.ckpt",
        module=toy_module(seed=5),
    )
    assert not (tmp_path / "elsewhere").exists()
    a, b = list_snapshots(whole), list_snapshots(part)
    assert [(s.step, s.sigma_rel) for s in a] == [(s.step, s.sigma_rel) for s in b]
    assert len({s.run for s in b}) == 1
    for x, y in zip(a, b):
        for key, value in x.load().items():
            assert torch.equal(value, y.load()[key]), (x.path.name, key)


def test_the_ema_command_writes_a_checkpoint_that_load_predict_and_export_take(run, tmp_path):
    out = tmp_path / "phema.ckpt"
    main(
        [
            "ema",
            "--ckpt_path",
            str(_ckpt(run, 40)),
            "--snapshot_dir",
            str(run / "a"),
            "--sigma_rel",
            "0.07",
            "--output_path",
            str(out),
        ]
    )
    module = DiffusionModule.load_from_checkpoint(out, map_location="cpu")
    expected = reconstruct(run / "a", sigma_rel=0.07)
    for name, p in module.named_parameters():
        assert torch.equal(p, expected[name]), name
    checkpoint = torch.load(out, weights_only=False)
    assert checkpoint["posthoc_ema"]["sigma_rel"] == 0.07 and checkpoint["posthoc_ema"]["step"] == 40
    assert "optimizer_states" not in checkpoint and "callbacks" not in checkpoint
    # this run has two PostHocEMAs: the folder must be named; --step 20 reconstructs the EMA at step 20
    with pytest.raises(ValueError, match="--snapshot_dir is needed: .* names 2 snapshot folders"):
        write_posthoc_checkpoint(_ckpt(run, 40), tmp_path / "no.ckpt", 0.07)
    default = tmp_path / "default.ckpt"
    main(
        [
            "ema",
            "--ckpt_path",
            str(_ckpt(run, 40)),
            "--snapshot_dir",
            str(run / "a"),
            "--sigma_rel",
            "0.07",
            "--step",
            "20",
            "--output_path",
            str(default),
        ]
    )
    module = DiffusionModule.load_from_checkpoint(default, map_location="cpu")
    expected = reconstruct(run / "a", sigma_rel=0.07, step=20)
    for name, p in module.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_fit_ema_predict_export_from_the_command_line(tmp_path):
    """The digits config with PostHocEMA, then ``ema``, then ``predict`` and ``export`` of its output."""
    pytest.importorskip("diffusers")
    unet = {"name": "unet", "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}}
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
        },
        {"class_path": "lightning_ddpm.callbacks.PostHocEMA", "init_args": {"snapshot_every_n_steps": 2}},
    ]
    common = [
        "--config",
        str(ROOT / "configs/digits.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--model.backbone",
        json.dumps(unet),
    ]
    main(
        [
            "fit",
            *common,
            "--trainer.max_steps=4",
            "--trainer.limit_val_batches=0",
            "--trainer.callbacks",
            json.dumps(callbacks),
        ]
    )
    (folder,) = {s.path.parent for s in list_snapshots(next(tmp_path.rglob("phema")))}
    assert sorted({s.step for s in list_snapshots(folder)}) == [2, 4]
    out = tmp_path / "phema.ckpt"
    main(["ema", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--sigma_rel", "0.08", "--output_path", str(out)])
    expected = reconstruct(folder, sigma_rel=0.08)
    main(
        [
            "predict",
            *common,
            "--ckpt_path",
            str(out),
            "--predict_writer.output_dir",
            str(tmp_path / "pred"),
            "--data.init_args.num_predict_samples=4",
            "--model.sampler",
            '{"name": "ddim", "init_args": {"num_steps": 2}}',
        ]
    )
    assert torch.load(tmp_path / "pred" / "samples.pt", weights_only=True)["samples"].shape == (4, 1, 8, 8)
    main(["export", "--ckpt_path", str(out), "--output_dir", str(tmp_path / "export")])
    back = DiffusionModule.from_diffusers(tmp_path / "export")
    for name, p in back.backbone.named_parameters():
        torch.testing.assert_close(p, expected[f"backbone.{name}"], rtol=0, atol=0, msg=name)


def test_the_ema_command_refuses_snapshots_of_another_model(run, tmp_path, capsys):
    other = tmp_path / "other"
    own = list_snapshots(run / "a")[0]
    bigger = {k: torch.cat([v, v]) for k, v in own.load().items()}
    for sigma_rel in (0.05, 0.10):
        save_snapshot(other, own.run, 2, PowerProfile(sigma_rel), bigger, torch.float32)
    with pytest.raises(SystemExit):
        main(
            [
                "ema",
                "--ckpt_path",
                str(_ckpt(run, 40)),
                "--snapshot_dir",
                str(other),
                "--sigma_rel",
                "0.07",
                "--output_path",
                str(tmp_path / "x.ckpt"),
            ]
        )
    assert "are of a different model than checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()


def test_the_ema_command_takes_the_parameter_shapes_from_the_checkpoint_it_read(run, tmp_path, monkeypatch):
    # with PostHocEMA's state in the checkpoint the model is known from its averages: the checkpoint is read once
    def no_second_read(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded a second time")

    monkeypatch.setattr(DiffusionModule, "load_from_checkpoint", no_second_read)
    out = write_posthoc_checkpoint(_ckpt(run, 40), tmp_path / "x.ckpt", 0.07, snapshot_dir=run / "a")
    state = torch.load(out, weights_only=False)["state_dict"]
    got = reconstruct(run / "a", sigma_rel=0.07)
    for name, value in got.items():
        torch.testing.assert_close(state[name], value.to(state[name].dtype), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("same_model", [True, False])
def test_the_ema_command_checks_shapes_by_the_model_when_the_checkpoint_has_no_posthoc_state(run, tmp_path, same_model):
    # a checkpoint without PostHocEMA's state (the callback was not in that run) and --snapshot_dir given:
    # the shapes come from the module the checkpoint builds
    checkpoint = torch.load(_ckpt(run, 40), weights_only=False)
    checkpoint["callbacks"] = {k: v for k, v in checkpoint["callbacks"].items() if not k.startswith("PostHocEMA")}
    checkpoint.pop(DIGEST_KEY)  # edited by hand: saved without a digest, which loads unchecked
    bare = tmp_path / "bare.ckpt"
    torch.save(checkpoint, bare)
    folder = run / "a"
    if not same_model:
        folder = tmp_path / "other"
        own = list_snapshots(run / "a")[0]
        bigger = {k: torch.cat([v, v]) for k, v in own.load().items()}
        for sigma_rel in (0.05, 0.10):
            save_snapshot(folder, own.run, 2, PowerProfile(sigma_rel), bigger, torch.float32)
    if same_model:
        write_posthoc_checkpoint(bare, tmp_path / "x.ckpt", 0.07, snapshot_dir=folder)
        assert (tmp_path / "x.ckpt").exists()
    else:
        with pytest.raises(ValueError, match="are of a different model than checkpoint"):
            write_posthoc_checkpoint(bare, tmp_path / "x.ckpt", 0.07, snapshot_dir=folder)
