import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_ddpm import DiffusionModule
from lightning_ddpm.cli import run_cli
from tests.helpers import RecordStartStep

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY_MLP = json.dumps({"name": "mlp", "init_args": {"hidden_dim": 32, "num_blocks": 1}})
TINY_UNET = json.dumps(
    {
        "name": "unet",
        "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0},
    }
)


def _callbacks(tmp_path: Path, every: int, *extra: dict) -> str:
    return json.dumps(
        [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(tmp_path / "checkpoints"),
                    "every_n_train_steps": every,
                    "save_last": True,
                    "save_top_k": -1,
                },
            },
            {
                "class_path": "lightning_ddpm.callbacks.SampleLogger",
                "init_args": {
                    "output_dir": str(tmp_path / "samples"),
                    "every_n_steps": None,
                    "every_n_epochs": None,
                    "num_samples": 16,
                    "sampler": {"class_path": "lightning_ddpm.samplers.DDIMSampler", "init_args": {"num_steps": 3}},
                },
            },
            *extra,
        ]
    )


def _quiet(tmp_path: Path) -> list[str]:
    return [
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def _faces(folder: Path, n: int = 4, size: int = 20) -> Path:
    for i in range(n):
        Image.fromarray((torch.rand(size, size, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_instantiates(config, tmp_path, monkeypatch):
    header = config.read_text().splitlines()[0]
    assert header.startswith("#"), "every config starts with a comment header saying what it reproduces"
    args = ["--config", str(config), f"--trainer.default_root_dir={tmp_path}"]
    if "imagefolder" in config.name:
        args += ["--data.init_args.root", str(_faces(tmp_path))]
    import socket

    def offline(*_args, **_kwargs):
        raise AssertionError("parsing a config must not touch the network (datasets, Inception weights)")

    monkeypatch.setattr(socket.socket, "connect", offline)
    cli = run_cli(args, run=False)
    assert isinstance(cli.model, DiffusionModule)
    assert list(cli.model.data_shape) == cli.datamodule.data_shape  # linked, not repeated
    # README: every shipped config checkpoints every N steps into <default_root_dir>/checkpoints, keeps the
    # last few and a last.ckpt (so --ckpt_path last resumes a killed run); pictures, logs and the saved
    # config follow the same root ("Where a run writes")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_ddpm.callbacks import SampleLogger

    ckpt = next(c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint))
    assert Path(ckpt.dirpath) == (tmp_path / "checkpoints").resolve()
    assert ckpt._every_n_train_steps > 0 and ckpt.save_last and ckpt.save_top_k >= 2
    pictures = [c for c in cli.trainer.callbacks if isinstance(c, SampleLogger)]
    assert pictures and all(Path(c.output_dir) == tmp_path / "samples" for c in pictures)
    assert Path(cli.trainer.log_dir).is_relative_to(tmp_path)
    text = config.read_text()
    assert "dirpath:" not in text and "output_dir:" not in text and "save_dir:" not in text, (
        "one root moves every output"
    )
    # docs/own_images.md, "Which sampler": an eps model samples with DDPM (a deterministic first step divides its
    # eps error by sqrt(alpha_bar_T)), except digits_cond (measured on the unconditional eps digits model: DDIM 50
    # within a standard deviation of DDPM) and the fine-tune of a published, fully trained model; the pictures use
    # the model's sampler
    from lightning_ddpm.samplers import DDPMSampler

    if cli.model.hparams.parameterization == "eps" and config.stem not in ("digits_cond", "cifar10_finetune_diffusers"):
        assert isinstance(cli.model.default_sampler, DDPMSampler), f"{config.name}: eps model sampled with DDIM"
    for callback in pictures:
        callback.setup(cli.trainer, cli.model, "fit")
        assert callback.sampler is cli.model.default_sampler or not callback._default_sampler
    if config.name == "toy2d.yaml":  # the quick start's promise: outputs/toy2d/samples/step_0003000.png
        assert cli.trainer.max_steps == 3000 and 3000 % pictures[0].every_n_steps == 0
    if config.name == "cifar10_ddpm.yaml":
        assert sum(p.numel() for p in cli.model.backbone.parameters()) == 35_746_307
        assert cli.model.diffusion.variance == "fixed_large" and cli.trainer.gradient_clip_val == 1.0


def test_print_config_and_overrides(capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(ROOT / "configs/toy2d.yaml"), "--model.schedule", "sigmoid", "--print_config"])
    out = capsys.readouterr().out
    assert "schedule: sigmoid" in out and "Toy2DDataModule" in out


def test_fit_toy2d_resume_and_predict(tmp_path):
    common = [
        "--config",
        str(ROOT / "configs/toy2d.yaml"),
        *_quiet(tmp_path),
        "--model.backbone",
        TINY_MLP,
        "--trainer.val_check_interval=10",
        "--trainer.callbacks",
        _callbacks(tmp_path, 10),
        "--data.init_args.num_train=2560",
    ]
    run_cli(["fit", *common, "--trainer.max_steps=20"])
    ckpt_dir = tmp_path / "checkpoints"
    assert (ckpt_dir / "last.ckpt").exists()
    assert list(tmp_path.rglob("samples/step_0000020.png")), "SampleLogger writes a picture at the end of fit"
    record = RecordStartStep()
    cli = run_cli(
        ["fit", *common, "--trainer.max_steps=30", "--ckpt_path", "last"], trainer_defaults={"callbacks": [record]}
    )
    assert record.start_step == 20 and cli.trainer.global_step == 30
    out = tmp_path / "pred"
    run_cli(
        [
            "predict",
            *common,
            "--ckpt_path",
            str(ckpt_dir / "last.ckpt"),
            "--predict_writer.output_dir",
            str(out),
            "--data.init_args.num_predict_samples=100",
            "--model.sampler",
            '{"name": "ddim", "init_args": {"num_steps": 5}}',
        ]
    )
    saved = torch.load(out / "samples.pt", weights_only=True)
    assert saved["samples"].shape == (100, 2) and (out / "samples.npy").exists() and (out / "samples.png").exists()


def test_load_from_checkpoint_alone_rebuilds_the_model(tmp_path):
    cfg = [
        "--config",
        str(ROOT / "configs/digits.yaml"),
        *_quiet(tmp_path),
        "--model.backbone",
        TINY_UNET,
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.callbacks",
        _callbacks(tmp_path, 2),
    ]
    cli = run_cli(["fit", *cfg])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    loaded = DiffusionModule.load_from_checkpoint(ckpt)
    for (name, a), b in zip(cli.model.backbone.state_dict().items(), loaded.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert loaded.data_shape == (1, 8, 8) and loaded.diffusion.num_timesteps == 1000


def test_fit_digits_bf16_mixed(tmp_path):
    cli = run_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs/digits.yaml"),
            *_quiet(tmp_path),
            "--model.backbone",
            TINY_UNET,
            "--trainer.precision=bf16-mixed",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=1",
            "--trainer.callbacks",
            _callbacks(tmp_path, 3),
        ]
    )
    assert cli.trainer.global_step == 3 and torch.isfinite(cli.trainer.callback_metrics["train/loss_step"])


def test_ddp_two_cpu_processes_agree_on_weights(tmp_path):
    dump = tmp_path / "weights"
    callbacks = _callbacks(
        tmp_path,
        5,
        *(
            {"class_path": f"tests.helpers.{name}", "init_args": {"dirpath": str(dump)}}
            for name in ("DumpWeights", "DumpStartWeights", "DumpFirstTrainingDraws")
        ),
    )
    cmd = [
        sys.executable,
        "-m",
        "lightning_ddpm",
        "fit",
        "--config",
        str(ROOT / "configs/toy2d.yaml"),
        *_quiet(tmp_path),
        "--model.backbone",
        TINY_MLP,
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=5",
        "--trainer.val_check_interval=5",
        "--trainer.limit_val_batches=2",
        "--data.init_args.num_train=5120",
        "--trainer.callbacks",
        callbacks,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
    start0, start1 = torch.load(dump / "start_rank0.pt"), torch.load(dump / "start_rank1.pt")
    for key in start0:  # DDP's broadcast: both ranks start from the same weights ...
        torch.testing.assert_close(start0[key], start1[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(start0[k], rank0[k]) for k in rank0), "training changed the weights"
    # ... and draw their own timesteps and noise: the training generator is keyed by the rank too
    draws0, draws1 = torch.load(dump / "draws_rank0.pt"), torch.load(dump / "draws_rank1.pt")
    assert draws0["t"].shape == draws1["t"].shape == (256,) and draws0["noise"].shape == (256, 2)
    assert not torch.equal(draws0["t"], draws1["t"]) and not torch.equal(draws0["noise"], draws1["noise"])


def test_version_is_the_installed_packages(capsys):
    """`lightning-ddpm --version` (and -V) prints the package version, which is the installed metadata's."""
    from importlib.metadata import version

    import lightning

    import lightning_ddpm
    from lightning_ddpm.cli import main

    assert lightning_ddpm.__version__ == version("lightning-ddpm")
    for flag in ("--version", "-V"):
        main([flag])
        out = capsys.readouterr().out.strip()
        assert (
            out
            == f"lightning-ddpm {lightning_ddpm.__version__} (torch {torch.__version__}, lightning {lightning.__version__})"
        )
