"""The CUDA path (``pytest -m cuda``; every test skips itself without a GPU).

What a CPU run cannot show: mixed precision with Lightning's GradScaler, channels-last
convolutions, torch.compile, EMA/FID/sampling on the device, host-device synchronisation in
the step (``torch.cuda.set_sync_debug_mode("error")``) and bit-exact resume on CUDA.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch

from lightning_ddpm import DiffusionModule
from lightning_ddpm.cli import run_cli
from tests.conftest import sampler_spec

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = {
    "mlp": {"name": "mlp", "init_args": {"hidden_dim": 64, "num_blocks": 2}},
    "unet": {
        "name": "unet",
        "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.1},
    },
}


def _data_args(config: Path, tmp_path: Path) -> list[str]:
    """Offline stand-ins: torchvision datasets and image folders become sklearn digits or a tiny folder."""
    text = config.read_text()
    if "Toy2DDataModule" in text:
        return ["--data.init_args.num_train=4096"]
    args = [
        "--data.init_args.dataset=digits",
        "--data.init_args.num_workers=0",
        "--data.init_args.image_size=8",
        "--data.init_args.batch_size=32",
        "--data.init_args.random_flip=false",
    ]
    args += ["--model.init_from=null"] if "init_from" in text else []  # no diffusers folder offline
    return args + (["--data.init_args.channels=1"] if "imagefolder" in config.name else [])


def _backbone(config: Path) -> str:
    return json.dumps(TINY["mlp" if "toy2d" in config.name else "unet"])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_fits_on_cuda(config, precision, tmp_path):
    cli = run_cli(
        [
            "fit",
            "--config",
            str(config),
            *_data_args(config, tmp_path),
            "--model.backbone",
            _backbone(config),
            "--trainer.accelerator=cuda",
            "--trainer.devices=1",
            f"--trainer.precision={precision}",
            "--trainer.max_steps=4",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks=[{class_path: lightning_ddpm.callbacks.EMA, init_args: {decay: 0.9}}]",
        ]
    )
    assert cli.trainer.global_step == 4
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    if precision == "16-mixed":
        assert cli.trainer.precision_plugin.scaler is not None  # Lightning's GradScaler
    if cli.model.use_channels_last:
        conv = next(m for m in cli.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    samples = cli.model.sample(8, generator=torch.Generator("cuda").manual_seed(0))
    assert samples.is_cuda and torch.isfinite(samples).all()


class _SyncFreeSteps:
    """Runs the module's training step and optimizer hook under set_sync_debug_mode("error")."""

    def __init__(self, module: DiffusionModule) -> None:
        for name in ("training_step", "on_before_optimizer_step"):
            setattr(module, name, self._strict(getattr(module, name)))

    @staticmethod
    def _strict(fn):
        def wrapped(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return wrapped


@pytest.mark.parametrize("timestep_sampler", ["uniform", "loss_second_moment"])
def test_training_steps_do_not_synchronise_with_the_host(tmp_path, timestep_sampler):
    from lightning.pytorch import Trainer

    module = DiffusionModule(
        backbone=TINY["unet"],
        data_shape=[1, 8, 8],
        num_classes=3,
        num_timesteps=100,
        timestep_sampler=timestep_sampler,
        clip_denoised=True,
    )
    _SyncFreeSteps(module)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(10)]
    trainer = Trainer(
        accelerator="cuda",
        devices=1,
        precision="bf16-mixed",
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=100,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 10 and module.nonfinite.on_device


LIBRARY = str(ROOT / "lightning_ddpm")


class _AuditSyncs:
    """Records every synchronising CUDA call (set_sync_debug_mode("warn")) from the first callback's
    on_train_batch_start to the end of the module's on_train_batch_end (the last hook of a step), with the
    Python stack at that point: a sync counts for the library when any frame of the stack is library code,
    so torch helpers that the library calls (AveragedModel.update_parameters, say) count too."""

    def __init__(self, module: DiffusionModule) -> None:
        self.found: dict[int, list[str]] = {}
        self._step: int | None = None
        end = module.on_train_batch_end

        def on_train_batch_end(*args, **kwargs):
            try:
                return end(*args, **kwargs)
            finally:
                self.stop()

        module.on_train_batch_end = on_train_batch_end

    def start(self, step: int) -> None:
        import warnings

        self._step, self._warnings = step, warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self._step is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(None, None, None)
            self._step = None

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        import traceback

        if "synchroniz" not in str(message):
            return
        ours = [
            f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack() if f.filename.startswith(LIBRARY)
        ]
        if ours:
            self.found.setdefault(self._step, []).append(ours[-1])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_whole_training_steps_of_every_config_do_not_synchronise(config, tmp_path, monkeypatch):
    """Trainer.fit with each shipped config's own callbacks (EMA, checkpoints, pictures, FID): the steps with no
    periodic work (not a logging step, no checkpoint, picture or validation due) make no synchronising CUDA
    call from library code or the torch helpers it calls. Logging / validation at steps 0, 3 and 7 only."""
    from lightning.pytorch import Callback

    monkeypatch.chdir(tmp_path)  # the configs' callbacks write under outputs/ in the working directory
    cli = run_cli(
        [
            "--config",
            str(config),
            *_data_args(config, tmp_path),
            "--model.backbone",
            _backbone(config),
            "--trainer.accelerator=cuda",
            "--trainer.devices=1",
            "--trainer.precision=bf16-mixed",
            "--trainer.max_steps=8",
            "--trainer.log_every_n_steps=4",
            "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    audit = _AuditSyncs(cli.model)

    class Start(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            audit.start(trainer.global_step)

        def on_exception(self, trainer, pl_module, exception):
            audit.stop()

    cli.trainer.callbacks.insert(0, Start())  # first: its on_train_batch_start opens the window
    assert any(type(c).__name__ == "EMA" for c in cli.trainer.callbacks), "the shipped configs average"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 8
    quiet = {1, 2, 4, 5, 6}  # 0: label check and first log; 3, 7: log, non-finite read-back, validation
    assert {step: where for step, where in audit.found.items() if step in quiet} == {}


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_every_sampler_loop_runs_without_host_synchronisation(spacing):
    """The sampler loops on the device: grids and coefficients are host floats, the device only computes."""
    from lightning_ddpm.core.guidance import guided_denoiser
    from lightning_ddpm.samplers import SAMPLERS, make_sampler

    module = DiffusionModule(
        backbone=TINY["unet"],
        data_shape=[1, 8, 8],
        num_classes=3,
        num_timesteps=100,
        variance="learned_range",
        loss="hybrid",
        clip_denoised=True,
        guidance_scale=2.0,
    ).cuda()
    for name in SAMPLERS.names():
        if spacing not in SAMPLERS.get(name).spacings:
            continue
        sampler = make_sampler(sampler_spec(name, num_steps=8, spacing=spacing))
        generators = [torch.Generator("cuda").manual_seed(i) for i in range(4)]
        model = guided_denoiser(module.eval().denoiser(), torch.tensor([0, 1, 2, 0], device="cuda"), 3, 2.0)
        x_T = torch.randn(4, 1, 8, 8, device="cuda", generator=generators[0])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the loop only; sample()'s label check reads labels once
        try:
            out = sampler.sample(model, module.diffusion, x_T, generator=generators)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(out).all(), name
        # inpainting: the mask's range is read back once (check_mask), before the loop; the loop reads nothing
        images, mask = out.clamp(-1, 1), torch.ones(1, 1, 8, 8, device="cuda")
        mask[..., 4:, :] = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                painted = sampler.inpaint(model, module.diffusion, images, mask, generator=generators)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, (name, [str(w.message) for w in syncs])
        assert torch.isfinite(painted).all() and torch.equal(painted[..., :4, :], images[..., :4, :]), name


def test_compile_fits_and_samples_on_cuda(tmp_path):
    from lightning.pytorch import Trainer

    module = DiffusionModule(
        backbone=TINY["unet"], data_shape=[1, 8, 8], num_timesteps=100, clip_denoised=True, compile=True
    )
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader([torch.randn(16, 1, 8, 8, generator=g) for _ in range(4)], batch_size=None)
    Trainer(
        accelerator="cuda",
        devices=1,
        precision="bf16-mixed",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    ).fit(module, loader)
    assert module.sample(4, sampler={"name": "ddim", "init_args": {"num_steps": 5}}).is_cuda


def test_fid_on_cuda(tmp_path):
    cli = run_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs/digits.yaml"),
            "--model.backbone",
            json.dumps(TINY["unet"]),
            "--trainer.accelerator=cuda",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=2",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks",
            json.dumps(
                [
                    {"class_path": "lightning_ddpm.callbacks.EMA", "init_args": {"decay": 0.9}},
                    {
                        "class_path": "lightning_ddpm.callbacks.FIDCallback",
                        "init_args": {
                            "num_samples": 64,
                            "feature_extractor": {"class_path": "tests.helpers.TinyFeatures"},
                            "sampler": {
                                "class_path": "lightning_ddpm.samplers.DDIMSampler",
                                "init_args": {"num_steps": 5},
                            },
                        },
                    },
                ]
            ),
        ]
    )
    assert torch.isfinite(cli.trainer.callback_metrics["val/fid"])


def test_resume_on_cuda_is_bit_exact(tmp_path):
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(root: Path, max_steps: int, ckpt_path=None) -> DiffusionModule:
        seed_everything(0)
        module = DiffusionModule(backbone=TINY["unet"], data_shape=[1, 8, 8], num_timesteps=100, clip_denoised=True)
        g = torch.Generator().manual_seed(0)
        # 4 batches an epoch and a checkpoint every 4 steps: the resume starts a fresh epoch (a plain
        # DataLoader cannot resume mid-epoch; the library's data modules can, tests/integration/test_resume.py)
        loader = torch.utils.data.DataLoader([torch.randn(16, 1, 8, 8, generator=g) for _ in range(4)], batch_size=None)
        Trainer(
            accelerator="cuda",
            devices=1,
            max_steps=max_steps,
            deterministic=True,
            logger=False,
            enable_progress_bar=False,
            default_root_dir=root,
            callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=4)],
        ).fit(module, loader, ckpt_path=ckpt_path)
        return module

    straight = fit(tmp_path / "a", 8)
    fit(tmp_path / "b", 4)
    resumed = fit(tmp_path / "b", 8, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_the_progress_bar_refresh_reads_nothing_back_from_the_gpu(tmp_path):
    """Lightning's progress bar converts the logged step values to numbers at every refresh (until the
    epoch ends); the module logs the step loss as a host copy, so a refresh never waits for the GPU."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import TQDMProgressBar

    bar = TQDMProgressBar(refresh_rate=1)
    bar.on_train_batch_end = _SyncFreeSteps._strict(bar.on_train_batch_end)
    module = DiffusionModule(backbone=TINY["mlp"], data_shape=[2], num_timesteps=100)
    loader = torch.utils.data.DataLoader(torch.randn(12 * 16, 2), batch_size=16)
    trainer = Trainer(
        accelerator="cuda",
        devices=1,
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
        callbacks=[bar],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 12 and "train/loss_step" in trainer.progress_bar_metrics


def test_fsdp2_fits_on_one_gpu(tmp_path, accelerator="cuda", precision="bf16-mixed"):
    """ModelParallelStrategy (FSDP2) on one device: the NCCL path of tests/integration/test_sharded.py's CPU runs."""
    callbacks = json.dumps(
        [
            {"class_path": "lightning_ddpm.callbacks.EMA", "init_args": {"decay": 0.9}},
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
            },
        ]
    )
    cli = run_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs/toy2d.yaml"),
            "--model.backbone",
            json.dumps(TINY["mlp"]),
            "--data.init_args.num_train=4096",
            f"--trainer.accelerator={accelerator}",
            "--trainer.devices=1",
            f"--trainer.precision={precision}",
            "--trainer.max_steps=4",
            "--trainer.limit_val_batches=0",
            "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
            "--trainer.strategy.data_parallel_size=1",
            "--trainer.strategy.tensor_parallel_size=1",
            "--trainer.strategy.save_distributed_checkpoint=false",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks={callbacks}",
        ]
    )
    assert cli.trainer.global_step == 4
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    for key in ("state_dict", "current_model_state"):
        assert all(type(v) is torch.Tensor and torch.isfinite(v).all() for v in checkpoint[key].values()), key
    assert not torch.equal(
        checkpoint["state_dict"]["backbone.inp.weight"], checkpoint["current_model_state"]["backbone.inp.weight"]
    )
