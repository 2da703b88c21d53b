"""The command line as a new user meets it (issue 16): overrides that take effect with a checkpoint,
no abbreviations, saved configs that read back, one-line errors, a quiet console."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import tomllib
import torch
import yaml

from lightning_ddpm import DiffusionModule
from lightning_ddpm.callbacks import EMA
from lightning_ddpm.cli import CLIError, run_cli
from lightning_ddpm.training.checkpoints import DIGEST_KEY, SafeCheckpointIO

ROOT = Path(__file__).resolve().parents[2]
TOY_COND = str(ROOT / "configs/toy2d_cond.yaml")
TOY = str(ROOT / "configs/toy2d.yaml")
TINY_MLP = json.dumps({"name": "mlp", "init_args": {"hidden_dim": 32, "num_blocks": 1}})
TINY_UNET = json.dumps(
    {
        "name": "unet",
        "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0},
    }
)
CONSOLE = shutil.which("lightning-ddpm") or str(Path(sys.executable).parent / "lightning-ddpm")


def _quiet(root: Path) -> list[str]:
    return [
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def _checkpointing(root: Path) -> str:
    return json.dumps(
        [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(root / "ckpt"), "save_last": True},
            }
        ]
    )


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory) -> Path:
    """A toy2d_cond checkpoint of a tiny MLP, trained 4 steps with max_nonfinite_steps=7 (a key no config sets)."""
    root = tmp_path_factory.mktemp("toy_ckpt")
    run_cli(
        [
            "fit",
            "--config",
            TOY_COND,
            *_quiet(root),
            "--model.backbone",
            TINY_MLP,
            "--trainer.max_steps=4",
            "--trainer.limit_val_batches=0",
            "--model.max_nonfinite_steps=7",
            "--data.init_args.num_train=1024",
            "--trainer.callbacks",
            _checkpointing(root),
        ]
    )
    return root / "ckpt" / "last.ckpt"


def _predict(ckpt: Path, out: Path, *extra: str):
    return run_cli(
        [
            "predict",
            "--config",
            TOY_COND,
            *_quiet(out),
            "--model.backbone",
            TINY_MLP,
            "--ckpt_path",
            str(ckpt),
            "--predict_writer.output_dir",
            str(out),
            "--data.init_args.num_predict_samples=64",
            "--model.sampler",
            '{"name": "ddim", "init_args": {"num_steps": 4}}',
            *extra,
        ]
    )


def test_sampling_settings_given_with_a_checkpoint_apply(toy_ckpt, tmp_path):
    guided = _predict(toy_ckpt, tmp_path / "w3", "--model.guidance_scale=3.0")
    plain = _predict(toy_ckpt, tmp_path / "w0", "--model.guidance_scale=0.0")
    assert guided.model.guidance_scale == 3.0 and plain.model.guidance_scale == 0.0
    assert guided.model.default_sampler.num_steps == 4  # --model.sampler applies too
    a = torch.load(tmp_path / "w3/samples.pt", weights_only=True)["samples"]
    b = torch.load(tmp_path / "w0/samples.pt", weights_only=True)["samples"]
    assert not torch.allclose(a, b), "guidance scale 3 and 0 must give different samples"
    # what the user did not write comes from the checkpoint
    assert guided.model.hparams.max_nonfinite_steps == 7


def test_predict_from_a_checkpoint_samples_with_the_ema_weights(tmp_path):
    """README: the checkpoint's state_dict holds the EMA weights, so `predict --ckpt_path` samples with them."""
    callbacks = json.dumps(
        [
            {"class_path": "lightning_ddpm.callbacks.EMA", "init_args": {"decay": 0.5}},
            json.loads(_checkpointing(tmp_path))[0],
        ]
    )
    # Adam at 0.05 with no warm-up: 3 steps move the raw weights well away from their average
    run_cli(
        [
            "fit",
            "--config",
            TOY_COND,
            *_quiet(tmp_path),
            "--model.backbone",
            TINY_MLP,
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=0",
            "--data.init_args.num_train=1024",
            "--model.lr_warmup_steps=0",
            "--model.optimizer",
            '{"name": "torch.optim.Adam", "init_args": {"lr": 0.05}}',
            "--trainer.callbacks",
            callbacks,
        ]
    )
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    predict = _predict(ckpt, tmp_path / "p", "--data.init_args.predict_seed=100")
    assert any(isinstance(c, EMA) for c in predict.trainer.callbacks), "the predict config includes the EMA callback"
    written = torch.load(tmp_path / "p/samples.pt", weights_only=True)
    checkpoint = torch.load(ckpt, weights_only=True)

    def sample_with(state_dict):
        module = DiffusionModule.load_from_checkpoint(ckpt)
        module.load_state_dict(state_dict)
        # as predict_step: request i has its own generator seeded predict_seed + i
        generators = [torch.Generator().manual_seed(100 + i) for i in range(64)]
        return module.sample(
            64, sampler={"name": "ddim", "init_args": {"num_steps": 4}}, generator=generators, labels=written["labels"]
        )

    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert not all(torch.equal(ema[k], raw[k]) for k in ema if k.startswith("backbone."))
    torch.testing.assert_close(written["samples"], sample_with(ema), rtol=0, atol=0)
    assert (written["samples"] - sample_with(raw)).abs().max() > 1e-2, "predict must not sample the raw weights"

    # README: the checkpoint alone is enough (no --config), from another working directory: the same samples
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        alone = run_cli(
            [
                "predict",
                "--ckpt_path",
                str(ckpt),
                "--data.num_predict_samples=64",
                "--data.predict_seed=100",
                "--model.sampler",
                '{"name": "ddim", "init_args": {"num_steps": 4}}',
                "--trainer.enable_progress_bar=false",
                "--trainer.logger=false",
            ]
        )
    finally:
        os.chdir(cwd)
    assert alone.model.num_classes == 8 and alone.datamodule.data_shape == [2]
    again = torch.load(elsewhere / "predictions" / "samples.pt", weights_only=True)
    torch.testing.assert_close(again["labels"], written["labels"], rtol=0, atol=0)
    torch.testing.assert_close(again["samples"], written["samples"], rtol=0, atol=0)


def test_settings_that_change_the_weights_must_agree_with_the_checkpoint(toy_ckpt, tmp_path):
    with pytest.raises(CLIError, match=r"model\.num_timesteps: given 50, checkpoint 1000"):
        run_cli(
            [
                "fit",
                "--config",
                TOY_COND,
                *_quiet(tmp_path),
                "--model.backbone",
                TINY_MLP,
                "--model.num_timesteps=50",
                "--ckpt_path",
                str(toy_ckpt),
                "--trainer.max_steps=6",
            ]
        )
    with pytest.raises(CLIError, match=r"model: guidance_scale must be >= 0, got -1"):
        _predict(toy_ckpt, tmp_path / "neg", "--model.guidance_scale=-1")


def test_a_checkpoint_from_another_config_names_the_difference(tmp_path):
    digits = tmp_path / "digits"
    run_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs/digits.yaml"),
            *_quiet(digits),
            "--model.backbone",
            TINY_UNET,
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.callbacks",
            _checkpointing(digits),
        ]
    )
    with pytest.raises(
        CLIError, match=r"was trained with other settings .* model\.backbone: given .*'mlp'.*checkpoint .*'unet'"
    ):
        run_cli(["predict", "--config", TOY, *_quiet(tmp_path), "--ckpt_path", str(digits / "ckpt/last.ckpt")])


def test_no_argparse_abbreviations():
    with pytest.raises(CLIError, match="unrecognized arguments: --model.lr 5"):
        run_cli(["--config", TOY, "--model.lr", "5"], run=False)


def test_saved_config_reads_back_and_reproduces_the_run(tmp_path):
    first = tmp_path / "first"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli(
            [
                "fit",
                "--config",
                TOY,
                *_quiet(first),
                "--model.backbone",
                TINY_MLP,
                "--trainer.max_steps=2",
                "--trainer.limit_val_batches=0",
                "--data.init_args.num_train=512",
                "--trainer.callbacks=[]",
            ]
        )
    assert not [w for w in caught if w.category.__name__ == "JsonargparseWarning"], "no unserialisable values"
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)  # still checks --ckpt_path files
    saved = next(first.rglob("config.yaml"))
    assert "SafeCheckpointIO" not in saved.read_text() and "object at 0x" not in saved.read_text()
    again = run_cli(["fit", "--config", str(saved), *_quiet(tmp_path / "again")])
    assert again.trainer.global_step == 2 and again.datamodule.num_train == 512
    for (name, a), b in zip(cli.model.state_dict().items(), again.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # the same run, bit for bit


def test_predict_refuses_an_untrained_network_unless_asked(tmp_path):
    args = [
        "predict",
        "--config",
        TOY,
        *_quiet(tmp_path),
        "--model.backbone",
        TINY_MLP,
        "--data.init_args.num_predict_samples=8",
        "--predict_writer.output_dir",
        str(tmp_path / "p"),
        "--model.sampler",
        '{"name": "ddim", "init_args": {"num_steps": 2}}',
    ]
    with pytest.raises(CLIError, match="predict needs --ckpt_path"):
        run_cli(args)
    run_cli([*args, "--untrained"])
    assert (tmp_path / "p/samples.pt").exists()


def test_data_smaller_than_one_batch_fails_with_the_sizes(tmp_path):
    with pytest.raises(CLIError, match=r"data: num_train=100 must hold at least one batch of batch_size=256"):
        run_cli(["--config", TOY, *_quiet(tmp_path), "--data.init_args.num_train=100"], run=False)
    with pytest.raises(CLIError, match=r"data: num_train=0"):
        run_cli(["--config", TOY, *_quiet(tmp_path), "--data.init_args.num_train=0"], run=False)


def _flip_tensor_bytes(path: Path) -> None:
    """Flip bytes inside the largest tensor record, leaving the zip structure (and data.pkl) intact."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + k : info.header_offset + k + 2], "little") for k in (26, 28)
    )
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[start : start + 4] = bytes(b ^ 0xFF for b in data[start : start + 4])
    path.write_bytes(bytes(data))


def test_a_corrupted_checkpoint_is_refused_and_never_becomes_the_last_good_state(toy_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(toy_ckpt, ckpt)
    assert isinstance(torch.load(ckpt, weights_only=True)[DIGEST_KEY], str)
    DiffusionModule.load_from_checkpoint(ckpt)  # intact: loads
    _flip_tensor_bytes(ckpt)
    torch.load(ckpt, weights_only=True)  # torch itself does not notice
    corrupt = ckpt.read_bytes()
    with pytest.raises(ValueError, match="is corrupt: its tensors do not match the digest"):
        DiffusionModule.load_from_checkpoint(ckpt)
    common = [
        "--config",
        TOY_COND,
        *_quiet(tmp_path),
        "--model.backbone",
        TINY_MLP,
        "--trainer.max_steps=8",
        "--trainer.limit_val_batches=0",
        "--data.init_args.num_train=1024",
        "--trainer.callbacks",
        _checkpointing(tmp_path),
    ]
    with pytest.raises(ValueError, match=r"checkpoint '.*last.ckpt' is corrupt"):
        run_cli(["fit", *common, "--ckpt_path", str(ckpt)])  # checked before training starts
    with pytest.raises(ValueError, match="is corrupt"):
        with pytest.warns(UserWarning):  # Lightning mentions it resumes mid-epoch
            run_cli(["fit", *common, "--ckpt_path", "last"])  # resolved by Lightning, checked on load
    assert ckpt.read_bytes() == corrupt, "the corrupt file was not overwritten by a run built on it"


def test_digest_covers_every_tensor_and_ignores_non_tensors():
    from lightning_ddpm.training.checkpoints import checkpoint_digest, verify_checkpoint

    checkpoint = {
        "state_dict": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}}],
        "epoch": 1,
    }
    checkpoint[DIGEST_KEY] = checkpoint_digest(checkpoint)
    verify_checkpoint(checkpoint)
    checkpoint["epoch"] = 2  # not a tensor: not covered (a corrupt pickle fails to load anyway)
    verify_checkpoint(checkpoint)
    for mutate in (
        lambda c: c["state_dict"]["w"].view(-1)[4].add_(1e-6),
        lambda c: c["optimizer_states"][0]["state"][0]["step"].add_(1),
        lambda c: c["state_dict"].__setitem__("b", torch.zeros(1, 2, dtype=torch.bfloat16)),
    ):
        broken = {
            **checkpoint,
            "state_dict": {k: v.clone() for k, v in checkpoint["state_dict"].items()},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}}],
        }
        mutate(broken)
        with pytest.raises(ValueError, match="is corrupt"):
            verify_checkpoint(broken)


def test_the_plain_install_has_every_config_dependency_and_the_dev_extra_only_development_tools():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "scikit-learn" in core, "configs/digits.yaml reads sklearn's digits on a plain `pip install -e .`"
    dev = [d.split(">")[0].split("=")[0] for d in project["optional-dependencies"]["dev"]]
    # test tools (diffusers is the samplers' independent oracle, tests/samplers/test_samplers_diffusers.py), the
    # wheel test's build tools, and the linter and type checker CI runs, pinned so that CI and pre-commit agree
    tools = {"pytest", "pyyaml", "diffusers", "safetensors", "build", "setuptools", "ruff", "mypy"}
    assert set(dev) <= tools, f"the dev extra holds development tools only, got {dev}"
    pinned = [d for d in project["optional-dependencies"]["dev"] if d.startswith(("ruff", "mypy"))]
    assert len(pinned) == 2 and all("==" in d for d in pinned), pinned


def _project_folder(tmp_path: Path) -> Path:
    (tmp_path / "my_nets.py").write_text(
        "import torch\nfrom lightning_ddpm import register_backbone\n\n\n"
        "@register_backbone('user_mlp')\nclass UserMLP(torch.nn.Module):\n"
        "    def __init__(self, in_channels: int = 2, out_channels: int | None = None):\n"
        "        super().__init__()\n"
        "        self.net = torch.nn.Sequential(torch.nn.Linear(in_channels + 1, 16), torch.nn.SiLU(),\n"
        "                                       torch.nn.Linear(16, out_channels or in_channels))\n\n"
        "    def forward(self, x, t, cond=None):\n"
        "        return self.net(torch.cat([x, t[:, None].float() / 1000], dim=1))\n"
    )
    return tmp_path


@pytest.mark.parametrize("backbone", ["user_mlp", "my_nets.UserMLP", "user_mlp in the config"])
def test_a_backbone_from_the_working_directory_through_the_console_script(tmp_path, backbone):
    folder = _project_folder(tmp_path)
    args = [
        CONSOLE,
        "fit",
        "--config",
        TOY,
        *_quiet(folder),
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--data.init_args.num_train=512",
        "--trainer.callbacks=[]",
    ]
    if backbone == "user_mlp":
        args += ["--model.backbone", backbone, "--imports", "[my_nets]"]  # import the file that registers it
    elif backbone == "my_nets.UserMLP":
        args += ["--model.backbone", backbone]
    else:  # the README's other spelling: `imports: [my_nets]` at the top of the config
        (folder / "mine.yaml").write_text("imports: [my_nets]\nmodel:\n  backbone: user_mlp\n")
        args += ["--config", "mine.yaml"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Trainer.fit` stopped: `max_steps=2` reached" in result.stderr + result.stdout


def test_errors_are_one_line_with_the_config_key_and_debug_shows_the_traceback(tmp_path):
    args = [CONSOLE, "fit", "--config", TOY, *_quiet(tmp_path), "--model.schedule", "cosin"]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "lightning-ddpm: error: model: unknown schedule 'cosin'; choose one of: linear, scaled_linear, cosine, sigmoid, custom"
    )
    debug = subprocess.run(
        args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "LIGHTNING_DDPM_DEBUG": "1"}
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--data.init_args.distribution", "spiral"],
            "data: unknown distribution 'spiral'; choose one of: two_moons, eight_gaussians, swiss_roll, checkerboard, rings",
        ),
        (
            [
                "--trainer.callbacks+",
                '{"class_path": "lightning_ddpm.callbacks.SampleLogger", "init_args": {"every_n_steps": 0}}',
            ],
            "trainer.callbacks[3]: every_n_steps must be None or >= 1, got 0",
        ),
        (
            ["--model.num_timesteps=10", "--trainer.max_steps=1"],
            "trainer.callbacks[2].init_args.sampler: num_steps must lie in [1, T=10], got 50",
        ),
        (["--imports", "[no_such_module_here]"], "imports: cannot import 'no_such_module_here'"),
        # the checkpoint the user named, not the data module (whose `trainer` attribute is the raising Trainer)
        (
            ["--ckpt_path", "no/such.ckpt", "--trainer.max_steps=1"],
            "ckpt_path: checkpoint 'no/such.ckpt' does not exist",
        ),
    ],
)
def test_library_errors_name_their_config_key(tmp_path, args, message):
    with pytest.raises(CLIError) as info:
        run_cli(["fit", "--config", TOY, *_quiet(tmp_path), "--model.backbone", TINY_MLP, *args])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_killed_data_worker_names_the_data_setting(tmp_path):
    """torch raises it wherever the batch was awaited (before: keyed ``model``); the user's setting is the data's."""
    with pytest.raises(CLIError) as info:
        run_cli(
            [
                "fit",
                "--model.backbone",
                TINY_MLP,
                "--data",
                "tests.helpers.WorkerKilledData",
                *_quiet(tmp_path),
                "--trainer.max_steps=1",
                "--trainer.logger=false",
                "--trainer.enable_checkpointing=false",
            ]
        )
    assert str(info.value).startswith("data.init_args.num_workers: DataLoader worker (pid(s) ")
    assert "fewer data.init_args.num_workers or a smaller batch_size" in str(info.value)


def test_the_console_is_quiet(toy_ckpt, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # what a user's shell has
    fit = subprocess.run(
        [
            CONSOLE,
            "fit",
            "--config",
            str(ROOT / "configs/digits.yaml"),
            *_quiet(tmp_path),
            "--model.backbone",
            TINY_UNET,
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    predict = subprocess.run(
        [
            CONSOLE,
            "predict",
            "--config",
            TOY_COND,
            *_quiet(tmp_path),
            "--model.backbone",
            TINY_MLP,
            "--ckpt_path",
            str(toy_ckpt),
            "--data.init_args.num_predict_samples=8",
            "--predict_writer.output_dir",
            str(tmp_path / "p"),
            "--model.sampler",
            '{"name": "ddim", "init_args": {"num_steps": 2}}',
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    for result in (fit, predict):
        assert result.returncode == 0, result.stderr[-2000:]
        console = result.stdout + result.stderr
        for noise in ("💡", "Tip:", "Warning", "warn(", "deprecated", "log_every_n_steps", "WeightAveraging"):
            assert noise not in console, f"{noise!r} in:\n{console}"
        assert not re.search(r"\.py:\d+: ", console), f"a warning in:\n{console}"  # warnings.warn's format
    help_text = subprocess.run(
        [sys.executable, "-m", "lightning_ddpm", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    assert help_text.startswith("usage: lightning-ddpm ")


def test_print_config_output_reads_back_and_reproduces_the_run(tmp_path, capsys):
    args = [
        "--config",
        TOY,
        "--model.backbone",
        TINY_MLP,
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--data.init_args.num_train=512",
        "--trainer.callbacks=[]",
        "--model.schedule=sigmoid",
    ]
    with pytest.raises(SystemExit):
        run_cli(["fit", *args, "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    first = run_cli(["fit", *args, *_quiet(tmp_path / "first")])
    again = run_cli(["fit", "--config", str(printed), *_quiet(tmp_path / "again")])
    assert again.model.hparams.schedule == "sigmoid" and again.trainer.global_step == 2
    for (name, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # the same run, bit for bit


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--trainer.max_step", "10"],
            "lightning-ddpm: error: unrecognized arguments: --trainer.max_step 10; did you mean --trainer.max_steps?",
        ),
        (
            ["--model.paramterization", "v"],
            "lightning-ddpm: error: unrecognized arguments: --model.paramterization v; did you mean --model.parameterization?",
        ),
        (
            ["--trainer.max_steps", "-5"],
            "lightning-ddpm: error: trainer.max_steps: `max_steps` must be a non-negative integer or -1 (infinite steps). "
            "You passed in -5.",
        ),
    ],
)
def test_typos_and_lightnings_own_checks_are_one_line_with_the_closest_option(tmp_path, args, message):
    """No usage dump, no traceback: one line, with the valid option closest to the typo."""
    result = subprocess.run(
        [CONSOLE, "fit", "--config", TOY, *_quiet(tmp_path), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == message


def test_a_mistyped_config_file_names_the_closest_one(tmp_path):
    result = subprocess.run(
        [CONSOLE, "fit", "--config", TOY.removesuffix(".yaml") + ".yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "usage:" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(f"File does not exist: '{TOY.removesuffix('.yaml')}.yml'; did you mean {TOY}?")
    )  # outside the working directory
    result = subprocess.run(
        [CONSOLE, "fit", "--config", "configs/toy2d.yml"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.stderr.strip().splitlines()[-1].endswith("; did you mean configs/toy2d.yaml?")  # as typed


def test_one_callbacks_setting_changes_by_index_or_class_name(tmp_path, capsys):
    """`--trainer.callbacks[1].init_args.every_n_train_steps 2` (or `[ModelCheckpoint]`) changes that argument of
    that configured callback only; the others keep the config's, and --print_config shows the change."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_ddpm.callbacks import SampleLogger

    cli = run_cli(
        [
            "--config",
            TOY,
            *_quiet(tmp_path),
            "--model.backbone",
            TINY_MLP,
            "--trainer.callbacks[1].init_args.every_n_train_steps",
            "2",
            "--trainer.callbacks[SampleLogger].init_args.num_samples=64",
        ],
        run=False,
    )
    checkpoint = next(c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath)
    pictures = next(c for c in cli.trainer.callbacks if isinstance(c, SampleLogger))
    assert checkpoint._every_n_train_steps == 2 and checkpoint.save_top_k == 2  # the rest as in the config
    assert pictures.num_samples == 64 and pictures.every_n_steps == 1000
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", TOY, "--trainer.callbacks[EMA].init_args.decay=0.5", "--print_config"])
    assert "decay: 0.5" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            "--trainer.callbacks[5].init_args.decay=0.5",
            "--trainer.callbacks[5].init_args.decay: trainer.callbacks has 3 entries (0: EMA, 1: ModelCheckpoint, 2: SampleLogger)",
        ),
        (
            "--trainer.callbacks[FID].init_args.num_samples=5",
            "--trainer.callbacks[FID].init_args.num_samples: no callback named 'FID' in trainer.callbacks (0: EMA, 1: "
            "ModelCheckpoint, 2: SampleLogger); give its index instead",
        ),
        (
            "--trainer.callbacks[0].init_args.decy=0.5",
            "--trainer.callbacks[0].init_args.decy: EMA has no argument 'decy'; did you mean decay?",
        ),
    ],
)
def test_a_callback_setting_that_does_not_exist_is_one_line(option, message):
    with pytest.raises(CLIError) as info:
        run_cli(["--config", TOY, option], run=False)
    assert str(info.value) == message


def test_one_root_moves_every_output_and_a_new_run_never_takes_over_last_ckpt(tmp_path, monkeypatch):
    """configs/toy2d.yaml with --trainer.default_root_dir: checkpoints, pictures, logs and the saved config all go
    under it and nothing under the working directory; a second fresh run there is refused (it would have saved
    last-v1.ckpt beside the first run's last.ckpt), and --ckpt_path last continues the first."""
    cwd, root = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = [
        "fit",
        "--config",
        TOY,
        *_quiet(root),
        "--model.backbone",
        TINY_MLP,
        "--trainer.limit_val_batches=0",
        "--data.init_args.num_train=512",
        "--trainer.callbacks[ModelCheckpoint].init_args.every_n_train_steps=1",
        "--trainer.callbacks[SampleLogger].init_args.num_samples=16",
    ]
    run_cli([*args, "--trainer.max_steps=2"])
    assert (root / "checkpoints" / "last.ckpt").is_file() and (root / "samples" / "step_0000002.png").is_file()
    assert list(root.glob("lightning_logs/version_0/config.yaml")) and list(
        root.glob("lightning_logs/version_0/events.*")
    )
    assert not list(cwd.iterdir()), "nothing is written outside the root"
    first = (root / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(
        CLIError,
        match=r"trainer.default_root_dir: .*run/checkpoints already holds checkpoints of an "
        r"earlier run \(.*last.ckpt\); resume that run with --ckpt_path last",
    ):
        run_cli([*args, "--trainer.max_steps=1"])
    assert (root / "checkpoints" / "last.ckpt").read_bytes() == first and not list(root.glob("checkpoints/last-v*"))
    resumed = run_cli([*args, "--trainer.max_steps=3", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 3 and not list(root.glob("checkpoints/last-v*"))
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_the_saved_config_predicts_from_another_working_directory(tmp_path, monkeypatch):
    """The saved config.yaml stores the data root (given relative) as an absolute path: predict with it and the
    checkpoint from another folder (before: the image folder was not found)."""
    from PIL import Image

    run_dir = tmp_path / "project"
    (run_dir / "faces").mkdir(parents=True)
    for i in range(8):
        Image.fromarray((torch.rand(8, 8, 3) * 255).byte().numpy()).save(run_dir / "faces" / f"{i}.png")
    monkeypatch.chdir(run_dir)
    tiny_unet = json.dumps(
        {
            "name": "unet",
            "init_args": {
                "ch": 8,
                "ch_mult": [1],
                "num_res_blocks": 1,
                "attn_resolutions": [],
                "norm_groups": 4,
                "dropout": 0.0,
            },
        }
    )
    run_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs/imagefolder.yaml"),
            "--trainer.default_root_dir=run",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--model.backbone",
            tiny_unet,
            "--data.init_args.root=faces",
            "--data.init_args.image_size=8",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--data.init_args.pin_memory=false",
            "--trainer.precision=32",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.callbacks[ModelCheckpoint].init_args.every_n_train_steps=1",
            "--trainer.callbacks[SampleLogger].init_args.num_samples=1",
        ]
    )
    saved = next((run_dir / "run").rglob("config.yaml"))
    assert yaml.safe_load(saved.read_text())["data"]["init_args"]["root"] == str(run_dir / "faces")
    monkeypatch.chdir(tmp_path)
    run_cli(
        [
            "predict",
            "--config",
            str(saved),
            "--ckpt_path",
            str(run_dir / "run/checkpoints/last.ckpt"),
            "--trainer.default_root_dir",
            str(tmp_path / "p"),
            "--data.init_args.num_predict_samples=2",
            "--model.sampler",
            '{"name": "ddim", "init_args": {"num_steps": 2}}',
        ]
    )
    assert torch.load(tmp_path / "p/predictions/samples.pt", weights_only=True)["samples"].shape == (2, 3, 8, 8)


def test_the_cpu_image_recipe_runs_as_docs_own_images_says(tmp_path, monkeypatch):
    """docs/own_images.md: `python -m benchmarks.shapes data/shapes`, then the CPU recipe with labels: class
    subfolders become labels in sorted order, the model is class-conditional, and a short run checkpoints and
    draws one row of pictures per class under outputs/imagefolder_cpu."""
    from benchmarks.shapes import CLASSES, write_folder
    from lightning_ddpm.data import ImageFolderDataset

    monkeypatch.chdir(tmp_path)
    write_folder("data/shapes", num_images=64, image_size=16)
    folder = ImageFolderDataset("data/shapes")
    assert folder.classes == list(CLASSES) and folder.labels[
        folder.files.index(next(p for p in folder.files if p.parent.name == "ring"))
    ] == CLASSES.index("ring")
    cli = run_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs/imagefolder_cpu.yaml"),
            "--data.init_args.labels=true",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=16",
            "--trainer.callbacks[ModelCheckpoint].init_args.every_n_train_steps=2",
            "--trainer.callbacks[SampleLogger].init_args.num_samples=4",
            "--model.sampler",
            '{"name": "ddim", "init_args": {"num_steps": 2}}',
        ]
    )
    assert (
        cli.model.num_classes == 4 and cli.model.data_shape == (3, 16, 16) and cli.model.hparams.parameterization == "v"
    )
    assert (tmp_path / "outputs/imagefolder_cpu/checkpoints/last.ckpt").is_file()
    picture = tmp_path / "outputs/imagefolder_cpu/samples/step_0000002.png"
    from PIL import Image

    width, height = Image.open(picture).size
    assert height > 3 * width  # one row per class, of one sample each


@pytest.mark.parametrize("option", ["--model.backbone.init_args.attn_resolutions", "--model.backbone.attn_resolutions"])
def test_one_backbone_setting_changes_under_a_config(option, tmp_path):
    """docs/own_images.md's 32x32 advice: one key of the config's backbone mapping from the command line (before:
    jsonargparse dropped it without a word under --config, and the U-Net kept attention at 4x4)."""
    cli = run_cli(
        [
            "--config",
            str(ROOT / "configs/imagefolder_cpu.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            f"--data.init_args.root={ROOT / 'docs'}",
            "--data.init_args.image_size=32",
            option,
            "[8]",
            "--model.backbone.init_args.ch=64",
        ],
        run=False,
    )
    assert cli.model.hparams.backbone == {
        "name": "unet",
        "init_args": {"ch": 64, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0},
    }
    assert cli.model.data_shape == (3, 32, 32) and cli.model.backbone.conv_in.out_channels == 64
    with pytest.raises(CLIError, match=r"backbone 'unet' got unexpected arguments \['atn_resolutions'\]"):
        run_cli(
            [
                "--config",
                str(ROOT / "configs/imagefolder_cpu.yaml"),
                f"--trainer.default_root_dir={tmp_path}",
                f"--data.init_args.root={ROOT / 'docs'}",
                "--model.backbone.init_args.atn_resolutions",
                "[8]",
            ],
            run=False,
        )
