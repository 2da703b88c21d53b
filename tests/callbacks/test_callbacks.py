import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_ddpm import DDIMSampler, DiffusionModule
from lightning_ddpm.backbones import MLP
from lightning_ddpm.callbacks import EMA, BitsPerDimCallback, FIDCallback, SampleLogger
from lightning_ddpm.data import ImageDataModule, Toy2DDataModule
from tests.helpers import TINY_MLP, RecordWeights, TinyFeatures, run_cli_process, toy_module

ROOT = Path(__file__).resolve().parents[2]
TINY_UNET = {
    "name": "unet",
    "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
}


def _trainer(tmp_path, callbacks, max_steps, **kw):
    kw.setdefault("logger", False)
    return Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"enable_checkpointing": False, **kw},
    )


def _toy(**kw):
    return Toy2DDataModule("two_moons", num_train=512, num_val=128, batch_size=64, **kw)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    name, version = "recording", 0

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def _expected_ema(history, decay, warmup=True):
    ema = [p.clone() for p in history[0]]
    for n, weights in enumerate(history[1:], start=1):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        ema = [d * e + (1 - d) * w for e, w in zip(ema, weights)]
    return ema


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_matches_a_hand_computed_average(tmp_path, warmup):
    torch.manual_seed(0)
    record, ema = RecordWeights(), EMA(decay=0.9, warmup=warmup)
    module = toy_module()
    _trainer(tmp_path, [record, ema], max_steps=6, limit_val_batches=0).fit(module, datamodule=_toy())
    expected = _expected_ema(record.after_step, 0.9, warmup)
    for got, want in zip(ema._average_model.module.backbone.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # fit ends with the EMA weights in the module (ready for sampling)
    for got, want in zip(module.backbone.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert ema.num_updates == 6


def test_ema_serves_a_lightning_module_without_a_backbone(tmp_path):
    """EMA is a general Lightning callback: a module of another kind (no ``backbone``, its layers built in
    ``configure_model`` as Lightning recommends for large models) averages too."""
    import lightning.pytorch as pl

    class Regression(pl.LightningModule):
        def configure_model(self) -> None:
            if not hasattr(self, "net"):  # idempotent: Lightning may call it more than once
                self.net = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return (self.net(batch) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    record, ema, module = RecordWeights(), EMA(decay=0.9), Regression()
    loader = DataLoader(torch.randn(24, 2), batch_size=4)
    _trainer(tmp_path, [record, ema], max_steps=6, limit_val_batches=0).fit(module, loader)
    for got, want in zip(module.parameters(), _expected_ema(record.after_step, 0.9, True)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ema_weights_in_validation_then_restored(tmp_path):
    torch.manual_seed(0)
    record, ema = RecordWeights(), EMA(decay=0.9)
    _trainer(
        tmp_path, [record, ema], max_steps=4, val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0
    ).fit(toy_module(), datamodule=_toy())
    expected = _expected_ema(record.after_step[:3], 0.9)
    for got, want in zip(record.at_validation[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the 4th training step starts from the raw weights of step 3, not the EMA
    for got, want in zip(record.at_train_batch_start[3], record.after_step[2]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(record.after_step[2], expected))


def test_ema_follows_the_raw_weights_until_start_step(tmp_path):
    """Before its first update the average is the raw model, not the untrained copy: validation, the end of
    fit and the checkpoint's state_dict of a run that ends before start_step see the trained weights."""
    torch.manual_seed(0)
    record, ema = RecordWeights(), EMA(decay=0.9, start_step=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    module = toy_module()
    _trainer(
        tmp_path,
        [record, ema, ckpt],
        max_steps=6,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
    ).fit(module, datamodule=_toy())
    for got, want in zip(record.at_validation[0], record.after_step[1]):  # validation after step 2: the raw weights
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    names = [n for n, _ in module.backbone.named_parameters()]
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)["state_dict"]
    for name, want in zip(names, record.after_step[1]):
        torch.testing.assert_close(saved[f"backbone.{name}"], want, rtol=0, atol=0)
    # updates at optimizer steps 3, 4, 5 (0-based): the first copies, the next two average with warm-up
    assert ema.num_updates == 3
    for got, want in zip(module.backbone.parameters(), _expected_ema(record.after_step[3:], 0.9)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a run that ends before start_step ends with its trained weights, not the initial ones
    record, early = RecordWeights(), toy_module()
    _trainer(tmp_path, [record, EMA(decay=0.9, start_step=100)], max_steps=4, limit_val_batches=0).fit(
        early, datamodule=_toy()
    )
    for got, want in zip(early.backbone.parameters(), record.after_step[-1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class CountingMLP(MLP):
    """An MLP with a buffer that training changes: EMA must neither average nor swap it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float32))

    def forward(self, x, t, cond=None):
        if self.training:
            self.calls += 1
        return super().forward(x, t, cond)


def test_ema_excludes_buffers(tmp_path):
    module = DiffusionModule(
        backbone={"name": "tests.callbacks.test_callbacks.CountingMLP", "init_args": {"hidden_dim": 8}},
        data_shape=[2],
        num_timesteps=20,
    )
    ema = EMA(decay=0.9)
    _trainer(tmp_path, [ema], max_steps=5, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0).fit(
        module, datamodule=_toy()
    )
    assert float(module.backbone.calls) == 5.0  # not reset by the validation swaps or the final copy
    # the average's copy is kept in sync, never averaged (an EMA of 1, 2, ..., 5 would not be 5)
    assert float(ema._average_model.module.backbone.calls) == 5.0
    assert module.diffusion.betas.dtype == torch.float64


def test_checkpoint_keeps_ema_and_resume_continues_it(tmp_path):
    torch.manual_seed(0)
    ema = EMA(decay=0.9)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_last=True, save_top_k=-1)
    record = RecordWeights()
    _trainer(tmp_path, [record, ema, ckpt], max_steps=3, limit_val_batches=0, enable_checkpointing=True).fit(
        toy_module(), datamodule=_toy()
    )
    path = tmp_path / "ckpt" / "last.ckpt"
    raw = torch.load(path, weights_only=False)
    expected = _expected_ema(record.after_step, 0.9)
    state_ema = [raw["state_dict"][f"backbone.{n}"] for n, _ in toy_module().backbone.named_parameters()]
    for got, want in zip(state_ema, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # one call gives a sampling-ready model with the EMA weights
    loaded = DiffusionModule.load_from_checkpoint(path)
    for got, want in zip(loaded.backbone.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # resuming restores the average and its update count, and keeps averaging the same way
    ema2, record2 = EMA(decay=0.9), RecordWeights()
    _trainer(tmp_path, [record2, ema2], max_steps=5, limit_val_batches=0).fit(
        toy_module(), datamodule=_toy(), ckpt_path=path
    )
    assert ema2.num_updates == 5
    continued = _expected_ema(record.after_step + record2.after_step, 0.9)
    for got, want in zip(ema2._average_model.module.backbone.parameters(), continued):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_checkpoints_written_when_fit_ends_keep_the_raw_weights(tmp_path):
    # ModelCheckpoint(save_last=True) writes last.ckpt in its on_train_end when no save fell on the last step, and
    # that runs after EMA's on_train_end has copied the average into the module; so may a save after fit.
    torch.manual_seed(0)
    record, ema = RecordWeights(), EMA(decay=0.9)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_train_epoch_end=False)
    trainer = _trainer(tmp_path, [record, ema, ckpt], max_steps=3, limit_val_batches=0, enable_checkpointing=True)
    trainer.fit(toy_module(), datamodule=_toy())
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    names = [n for n, _ in toy_module().backbone.named_parameters()]
    expected = _expected_ema(record.after_step, 0.9)
    assert not all(torch.equal(a, b) for a, b in zip(record.after_step[-1], expected))
    for path in (tmp_path / "ckpt" / "last.ckpt", tmp_path / "after_fit.ckpt"):
        saved = torch.load(path, weights_only=True)
        assert saved["global_step"] == 3
        for name, raw, ema_value in zip(names, record.after_step[-1], expected):
            torch.testing.assert_close(saved["current_model_state"][f"backbone.{name}"], raw, rtol=0, atol=0)
            torch.testing.assert_close(saved["state_dict"][f"backbone.{name}"], ema_value, rtol=1e-5, atol=1e-6)
    # so a resume continues training from the raw weights, not from their average
    record2 = RecordWeights()
    _trainer(tmp_path, [record2, EMA(decay=0.9)], max_steps=4, limit_val_batches=0).fit(
        toy_module(), datamodule=_toy(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    for got, want in zip(record2.at_train_batch_start[0], record.after_step[-1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _digits_batch(n=180):
    dm = ImageDataModule("digits", batch_size=n)
    dm.setup()
    return next(iter(dm.val_dataloader()))[0]


def test_fid_is_low_for_data_and_high_for_noise():
    real = _digits_batch()
    fid = FIDCallback(num_samples=180, feature_extractor=TinyFeatures(), kid=True, kid_subset_size=50)
    fid.build_metrics()
    results = {}
    for name, fake in {"data": real, "noise": torch.rand_like(real) * 2 - 1}.items():
        fid.fid.reset()
        fid.kid.reset()
        fid._update(real, real=True)
        fid._update(fake, real=False)
        results[name] = float(fid.fid.compute()), float(fid.kid.compute()[0])
    # FID and KID of the data against itself ~0 (KID is unbiased: it scatters around 0); noise far off
    # (measured: FID 0.80, KID 0.10 with these tiny features)
    assert results["data"][0] < 1e-3 and results["noise"][0] > 0.1
    assert abs(results["data"][1]) < 1e-3 and results["noise"][1] > 0.01
    with pytest.raises(ValueError, match="inception_score needs Inception logits"):
        FIDCallback(feature_extractor=TinyFeatures(), inception_score=True)


def test_fid_callback_logs_during_training(tmp_path, caplog):
    torch.manual_seed(0)
    module = DiffusionModule(backbone=TINY_UNET, data_shape=[1, 8, 8], num_timesteps=20, clip_denoised=True)
    fid = FIDCallback(num_samples=30, batch_size=16, feature_extractor=TinyFeatures(), sampler=DDIMSampler(num_steps=4))
    bpd = BitsPerDimCallback(num_examples=8, batch_size=8)
    trainer = _trainer(
        tmp_path,
        [EMA(decay=0.9), fid, bpd],
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=ImageDataModule("digits", batch_size=32))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val/fid"]) and metrics["val/fid"] > 0 and fid.counted_fake == 30
    assert "val/fid_time_s" in metrics
    assert torch.isfinite(metrics["val/bpd"]) and metrics["val/bpd"] > 0
    assert fid.fid.real_features_num_samples == 64  # cached from the 2 validation batches
    # the console line names the features it measured in (these are not Inception FIDs)
    assert f"FID (TinyFeatures features) over 30 samples: {float(metrics['val/fid']):.3f}" in caplog.text


class ChangingImages(torch.utils.data.Dataset):
    """Random 8x8 images in [-1, 1] that differ at every access: a second validation pass sees new ones."""

    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        self.reads += 1
        return (torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(self.reads)) * 2 - 1,)


class RecordFID(Callback):
    """After the FIDCallback (listed before it) at every validation: its real and fake counts and real sums."""

    def __init__(self, fid: FIDCallback) -> None:
        self.fid, self.real, self.real_sums, self.fake = fid, [], [], []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.real.append(int(self.fid.fid.real_features_num_samples))
        self.real_sums.append(self.fid.fid.real_features_sum.clone())
        self.fake.append(self.fid.counted_fake)


def test_fid_keeps_the_real_statistics_of_the_first_validation(tmp_path):
    torch.manual_seed(0)
    module = DiffusionModule(backbone=TINY_UNET, data_shape=[1, 8, 8], num_timesteps=20, clip_denoised=True)
    fid = FIDCallback(num_samples=6, batch_size=4, feature_extractor=TinyFeatures(), sampler=DDIMSampler(num_steps=2))
    record, val = RecordFID(fid), ChangingImages(64)
    _trainer(
        tmp_path, [fid, record], max_steps=2, val_check_interval=1, limit_val_batches=2, num_sanity_val_steps=0
    ).fit(
        module,
        train_dataloaders=DataLoader(ChangingImages(64), batch_size=32),
        val_dataloaders=DataLoader(val, batch_size=32),
    )
    assert val.reads == 128, "two validation passes over new images"
    assert record.real == [64, 64]  # the first pass's 2 batches of 32: not doubled by the second, not reset
    torch.testing.assert_close(record.real_sums[1], record.real_sums[0], rtol=0, atol=0)  # the first pass's images
    assert record.fake == [6, 6]  # num_samples each time: the fake statistics restart


def test_fid_at_train_end_evaluates_final_num_samples_with_the_final_sampler(tmp_path):
    torch.manual_seed(0)
    module = DiffusionModule(backbone=TINY_UNET, data_shape=[1, 8, 8], num_timesteps=20, clip_denoised=True)
    final_sampler, calls = DDIMSampler(num_steps=3), []
    sample = final_sampler.sample

    def counting(model, diffusion, x_T, **kwargs):
        calls.append(x_T.shape[0])
        return sample(model, diffusion, x_T, **kwargs)

    final_sampler.sample = counting
    fid = FIDCallback(
        num_samples=6,
        every_n_validations=None,
        at_train_end=True,
        final_num_samples=11,
        batch_size=4,
        feature_extractor=TinyFeatures(),
        sampler=DDIMSampler(num_steps=2),
        final_sampler=final_sampler,
    )
    logger = RecordingLogger()
    trainer = _trainer(
        tmp_path, [fid], max_steps=2, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=0, logger=logger
    )
    trainer.fit(module, datamodule=ImageDataModule("digits", batch_size=32))
    assert calls == [4, 4, 3] and fid.counted_fake == 11  # final_num_samples, all drawn by final_sampler
    assert "val/fid" not in trainer.callback_metrics  # every_n_validations=None: no evaluation during training
    final = {k: (v, step) for step, metrics in logger.logged for k, v in metrics.items() if k.startswith("final/")}
    assert set(final) == {"final/fid", "final/fid_time_s"}
    assert final["final/fid"] == (fid.last["val/fid"], 2) and fid.last["val/fid"] > 0  # at the last step
    fid = FIDCallback(
        num_samples=6, at_train_end=True, feature_extractor=TinyFeatures(), sampler=DDIMSampler(num_steps=2)
    )
    trainer = _trainer(tmp_path, [fid], max_steps=1, limit_val_batches=0)
    with pytest.raises(
        ValueError, match="needs validation batches for its real statistics; trainer.limit_val_batches is 0"
    ):
        trainer.fit(module, datamodule=ImageDataModule("digits", batch_size=32))
    assert trainer.global_step == 0  # refused before training, not after it
    images = ImageDataModule("digits", batch_size=32)
    images.setup("fit")
    with pytest.raises(RuntimeError, match="needs at least one validation epoch"):  # no validation data at all
        _trainer(tmp_path, [fid], max_steps=1).fit(module, train_dataloaders=images.train_dataloader())


def test_sample_logger_writes_and_logs_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    samples = SampleLogger(every_n_steps=2, every_n_epochs=None, num_samples=64, sampler=DDIMSampler(num_steps=3))
    module = DiffusionModule(backbone=TINY_MLP, data_shape=[2], num_timesteps=20, num_classes=2)
    _trainer(tmp_path, [samples], max_steps=4, logger=logger, limit_val_batches=0).fit(
        module, datamodule=_toy(labels=True)
    )
    pictures = sorted(p.name for p in Path(logger.log_dir, "samples").glob("*.png"))
    assert pictures == ["step_0000002.png", "step_0000004.png"]
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [2, 4]


def _with_weights(module, weights):
    with torch.no_grad():
        for p, w in zip(module.backbone.parameters(), weights):
            p.copy_(w)
    return module


@pytest.mark.parametrize("ema_first", [True, False])
def test_sample_pictures_are_drawn_with_the_ema_weights(tmp_path, ema_first):
    torch.manual_seed(0)
    record, ema = RecordWeights(), EMA(decay=0.5)
    ddim = DDIMSampler(num_steps=4)
    samples = SampleLogger(
        every_n_steps=3,
        every_n_epochs=None,
        num_samples=16,
        seed=5,
        sampler=ddim,
        output_dir=str(tmp_path / "pictures"),
    )
    callbacks = [record, ema, samples] if ema_first else [record, samples, ema]
    _trainer(tmp_path, callbacks, max_steps=3, limit_val_batches=0).fit(toy_module(), datamodule=_toy())
    assert (tmp_path / "pictures" / "step_0000003.png").exists()
    assert ema.num_updates == 3  # one update per step, whichever callback brought the average up to date
    expected = _expected_ema(record.after_step, 0.5)  # the average after all 3 steps
    generators = lambda: [torch.Generator().manual_seed(5 + i) for i in range(16)]  # noqa: E731
    with_ema = _with_weights(toy_module(), expected).sample(16, sampler=ddim, generator=generators())
    with_raw = _with_weights(toy_module(), record.after_step[-1]).sample(16, sampler=ddim, generator=generators())
    torch.testing.assert_close(samples.last_samples, with_ema, rtol=1e-4, atol=1e-5)
    assert (samples.last_samples - with_raw).abs().max() > 1e-2, "the picture must not come from the raw weights"


def _spy_weights(module, owner, name, seen):
    """Record the backbone's parameters whenever ``owner.name`` is called."""
    original = getattr(owner, name)

    def spied(*args, **kwargs):
        seen.append([p.detach().clone() for p in module.backbone.parameters()])
        return original(*args, **kwargs)

    setattr(owner, name, spied)


@pytest.mark.parametrize("ema_first", [True, False])
def test_fid_and_bits_per_dim_are_computed_with_the_ema_weights(tmp_path, ema_first):
    # EMA listed first swaps its weights back at the end of validation before the metric callbacks run, so they
    # must swap them in themselves; listed last, they run while validation's swap is still in place.
    torch.manual_seed(0)
    module = DiffusionModule(
        backbone=TINY_UNET,
        data_shape=[1, 8, 8],
        num_timesteps=20,
        clip_denoised=True,
        lr_warmup_steps=0,
        optimizer={"name": "torch.optim.Adam", "init_args": {"lr": 1e-2}},
    )
    fid_seen, bpd_seen = [], []
    _spy_weights(module, module, "sample", fid_seen)  # FID draws its images with module.sample
    _spy_weights(module, module.diffusion, "bits_per_dim", bpd_seen)
    record, ema = RecordWeights(), EMA(decay=0.5)
    fid = FIDCallback(
        num_samples=8,
        batch_size=8,
        feature_extractor=TinyFeatures(),
        sampler=DDIMSampler(num_steps=2),
        at_train_end=True,
    )
    bpd = BitsPerDimCallback(num_examples=4, batch_size=4)
    callbacks = [record, ema, fid, bpd] if ema_first else [record, fid, bpd, ema]
    _trainer(tmp_path, callbacks, max_steps=3, val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0).fit(
        module, datamodule=ImageDataModule("digits", batch_size=32)
    )
    assert len(fid_seen) == 2 and len(bpd_seen) == 1  # FID at the validation and at the end of fit, bits/dim once
    expected = _expected_ema(record.after_step, 0.5)
    assert not all(torch.equal(a, b) for a, b in zip(record.after_step[-1], expected))
    for seen in fid_seen + bpd_seen:
        for got, want in zip(seen, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ddp_ema_identical_and_fid_counts_exactly(tmp_path):
    dump = tmp_path / "dump"
    callbacks = json.dumps(
        [
            {"class_path": "lightning_ddpm.callbacks.EMA", "init_args": {"decay": 0.9}},
            {
                "class_path": "lightning_ddpm.callbacks.FIDCallback",
                "init_args": {
                    "num_samples": 7,
                    "batch_size": 3,
                    "feature_extractor": {"class_path": "tests.helpers.TinyFeatures"},
                    "sampler": {"class_path": "lightning_ddpm.samplers.DDIMSampler", "init_args": {"num_steps": 3}},
                },
            },
            {"class_path": "tests.helpers.DumpWeights", "init_args": {"dirpath": str(dump)}},
            {"class_path": "tests.helpers.DumpFID", "init_args": {"dirpath": str(dump)}},
        ]
    )
    cmd = [
        sys.executable,
        "-m",
        "lightning_ddpm",
        "fit",
        "--config",
        str(ROOT / "configs/digits.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--model.backbone",
        json.dumps(TINY_UNET),
        "--model.num_timesteps=20",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.callbacks",
        callbacks,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
    fids = [json.loads((dump / f"fid_rank{r}.json").read_text()) for r in (0, 1)]
    assert fids[0]["counted"] == fids[1]["counted"] == 7  # 4 + 3 over two ranks, exactly N
    # in the same batches on both ranks (3 + 1; the second rank drops its last sample), as FSDP2 needs
    assert fids[0]["sample_calls"] == fids[1]["sample_calls"] == 2
    assert fids[0]["fid"] == pytest.approx(fids[1]["fid"]) and fids[0]["fid"] > 0


def test_sample_pictures_are_drawn_by_every_rank_and_match_one_process(tmp_path):
    """Under DDP (and so under FSDP, whose forward needs every rank) each rank samples its share of
    the picture; rank 0 gathers them, and sample i is what a single process draws from seed + i."""
    import json

    from lightning_ddpm.samplers import DDIMSampler

    root = Path(__file__).resolve().parents[2]
    mlp = {"name": "mlp", "init_args": {"hidden_dim": 16, "num_blocks": 1}}
    callbacks = [
        {
            "class_path": "lightning_ddpm.callbacks.SampleLogger",
            "init_args": {
                "every_n_steps": None,
                "every_n_epochs": None,
                "num_samples": 10,
                "seed": 3,
                "output_dir": str(tmp_path / "pictures"),
                "sampler": {"class_path": "lightning_ddpm.samplers.DDIMSampler", "init_args": {"num_steps": 4}},
            },
        },
        {"class_path": "tests.helpers.DumpSamples", "init_args": {"dirpath": str(tmp_path / "dump")}},
        {"class_path": "tests.helpers.DumpWeights", "init_args": {"dirpath": str(tmp_path / "weights")}},
    ]
    run_cli_process(
        [
            "fit",
            "--config",
            str(root / "configs/toy2d.yaml"),
            "--model.backbone",
            json.dumps(mlp),
            "--model.num_timesteps=50",
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.num_train=2048",
            "--trainer.callbacks",
            json.dumps(callbacks),
        ],
        cwd=tmp_path,
    )
    rank0, rank1 = (torch.load(tmp_path / "dump" / f"samples_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["eval_calls"] == rank1["eval_calls"] == 4, "both ranks ran the 4 sampling steps"
    assert rank0["samples"].shape == (10, 2) and (tmp_path / "pictures" / "step_0000002.png").exists()
    # one process, the final weights, the same per-sample seeds
    module = DiffusionModule(backbone=mlp, data_shape=[2], num_timesteps=50, schedule="cosine", parameterization="v")
    module.backbone.load_state_dict(torch.load(tmp_path / "weights" / "rank0.pt", weights_only=True))
    generators = [torch.Generator().manual_seed(3 + i) for i in range(10)]
    alone = module.sample(10, sampler=DDIMSampler(num_steps=4), generator=generators)
    torch.testing.assert_close(rank0["samples"], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true", "bf16-mixed", "32-true"])
def test_sampling_works_in_every_precision(tmp_path, precision):
    """fit with SampleLogger and FIDCallback, then predict, under each precision Lightning offers (sample()
    drew float32 noise whatever the weights' dtype: a dtype mismatch in the backbone under *-true)."""
    from lightning_ddpm.data import SampleRequests

    torch.manual_seed(0)
    module = DiffusionModule(
        backbone=TINY_UNET,
        data_shape=[1, 8, 8],
        num_timesteps=20,
        clip_denoised=True,
        sampler={"name": "ddpm", "init_args": {"num_steps": 4}},
        lr_warmup_steps=0,
    )
    pictures = SampleLogger(
        output_dir=str(tmp_path / "pictures"),
        every_n_steps=2,
        every_n_epochs=None,
        num_samples=4,
        sampler=DDIMSampler(num_steps=3),
    )
    fid = FIDCallback(num_samples=6, batch_size=4, feature_extractor=TinyFeatures(), sampler=DDIMSampler(num_steps=2))
    trainer = _trainer(
        tmp_path,
        [pictures, fid],
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        precision=precision,
    )
    trainer.fit(module, datamodule=ImageDataModule("digits", batch_size=16))
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()), "SampleLogger wrote its picture"
    samples = torch.cat(trainer.predict(module, DataLoader(SampleRequests(3, seed=1), batch_size=2)))
    assert samples.shape == (3, 1, 8, 8) and torch.isfinite(samples).all()
    weights = module.network_dtype
    assert samples.dtype == torch.promote_types(weights, torch.float32)  # the state is never below float32
    for dtype in (torch.bfloat16, torch.float16):
        half = module.to(dtype)
        out = half.sample(2, generator=torch.Generator().manual_seed(0))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert half.diffusion.betas.dtype == torch.float64  # the schedule never rounds


def test_fid_runs_at_the_same_validations_after_a_resume(tmp_path):
    """every_n_validations counts the run's validations, not the process's: the counter is checkpointed, so a
    run resumed after its first validation evaluates FID where the uninterrupted run did (the same values too)."""

    def fit(root: Path, max_epochs: int, ckpt_path: Path | None = None) -> list[tuple[int, float]]:
        torch.manual_seed(0)
        module = DiffusionModule(backbone=TINY_UNET, data_shape=[1, 8, 8], num_timesteps=20, clip_denoised=True)
        fid = FIDCallback(
            num_samples=6,
            batch_size=6,
            every_n_validations=2,
            feature_extractor=TinyFeatures(),
            sampler=DDIMSampler(num_steps=2),
        )
        evaluate, done = fid.evaluate, []

        def recording(trainer, pl_module, total, sampler=None):
            values = evaluate(trainer, pl_module, total, sampler)
            done.append((trainer.global_step, values["val/fid"]))
            return values

        fid.evaluate = recording
        ckpt = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1)
        _trainer(
            root,
            [fid, ckpt],
            max_steps=-1,
            max_epochs=max_epochs,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            enable_checkpointing=True,
        ).fit(module, datamodule=ImageDataModule("digits", batch_size=512), ckpt_path=ckpt_path)
        return done

    straight = fit(tmp_path / "straight", 4)  # 3 batches an epoch, a validation at each epoch's end
    assert [step for step, _ in straight] == [6, 12]
    fit(tmp_path / "resumed", 1)
    resumed = fit(tmp_path / "resumed", 4, ckpt_path=tmp_path / "resumed" / "epoch=0-step=3.ckpt")
    assert resumed == straight


@pytest.mark.parametrize("sampler", [{"name": "ddpm", "init_args": {"num_steps": 5}}, "dpmpp_2m", "ddim"])
def test_sample_pictures_use_the_models_sampler_setting_unless_given_one(tmp_path, sampler):
    """One setting says how a config's model is sampled: model.sampler (paper configs: DDPM) also draws
    the SampleLogger's pictures; before, the pictures were always DDIM 50."""
    module = DiffusionModule(backbone=TINY_MLP, data_shape=[2], num_timesteps=20, sampler=sampler)
    default, given = (
        SampleLogger(num_samples=4),
        SampleLogger(num_samples=4, sampler={"name": "ddim", "init_args": {"num_steps": 3}}),
    )
    for callback in (default, given):
        callback.setup(_trainer(tmp_path, [], 1), module, "fit")
    assert default.sampler is module.default_sampler
    assert type(given.sampler).__name__ == "DDIMSampler" and given.sampler.num_steps == 3
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    torch.testing.assert_close(
        module.sample(4, sampler=default.sampler, generator=generators()),
        module.sample(4, generator=generators()),
        rtol=0,
        atol=0,
    )


def test_a_users_callback_sees_the_ema_model_through_the_public_api(tmp_path):
    """README, "Training callbacks": ``with ema.averaged(trainer, pl_module)`` holds the average (brought up to the
    current step, also for a callback listed before EMA) and puts the raw weights back after the block."""

    class Peek(Callback):
        def __init__(self):
            self.inside, self.outside = [], []

        def on_train_batch_end(self, trainer, pl_module, *args):
            ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
            with ema.averaged(trainer, pl_module):
                self.inside.append([p.detach().clone() for p in pl_module.backbone.parameters()])
            self.outside.append([p.detach().clone() for p in pl_module.backbone.parameters()])

    torch.manual_seed(0)
    record, peek, ema = RecordWeights(), Peek(), EMA(decay=0.5)
    _trainer(tmp_path, [record, peek, ema], max_steps=3, limit_val_batches=0).fit(toy_module(), datamodule=_toy())
    for step in range(3):
        for got, want in zip(peek.inside[step], _expected_ema(record.after_step[: step + 1], 0.5)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for got, raw in zip(peek.outside[step], record.after_step[step]):
            torch.testing.assert_close(got, raw, rtol=0, atol=0)
    assert ema.num_updates == 3
