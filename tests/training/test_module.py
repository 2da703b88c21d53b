import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning_ddpm import DDIMSampler, DiffusionModule
from lightning_ddpm.backbones import MLP
from lightning_ddpm.samplers import SAMPLERS
from tests.conftest import sampler_spec

TINY_MLP = {"name": "mlp", "init_args": {"hidden_dim": 32, "num_blocks": 1}}
TINY_UNET = {
    "name": "unet",
    "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0},
}


def test_builds_backbone_with_shared_values():
    m = DiffusionModule(
        backbone=TINY_UNET, data_shape=[1, 8, 8], num_classes=10, variance="learned_range", num_timesteps=20
    )
    assert m.backbone.in_channels == 1 and m.backbone.out_channels == 2 and m.backbone.num_classes == 10
    assert m.backbone.image_size == (8, 8)
    with pytest.raises(ValueError, match=r"backbone outputs 1 channels but variance='learned_range'"):
        DiffusionModule(
            backbone={"name": "mlp", "init_args": {"out_channels": 1}}, data_shape=[1], variance="learned_range"
        )
    with pytest.raises(ValueError, match=r"backbone image_size \(16, 16\) does not match the data's \(8, 8\)"):
        DiffusionModule(
            backbone={
                "name": "unet",
                "init_args": {"image_size": 16, "ch": 32, "ch_mult": [1, 2], "attn_resolutions": []},
            },
            data_shape=[3, 8, 8],
        )
    with pytest.raises(ValueError, match=r"unknown schedule 'cosin'"):
        DiffusionModule(schedule="cosin")
    with pytest.raises(ValueError, match=r"optimizer mapping needs 'name'"):
        DiffusionModule(optimizer={"lr": 1e-3})


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_batch_forms_and_quartile_logging(form):
    m = DiffusionModule(backbone=TINY_MLP, data_shape=[2], num_timesteps=20)
    x = torch.randn(64, 2)
    y = torch.zeros(64, dtype=torch.long)
    batch = {"tensor": x, "tuple": (x, y), "dict": {"x": x, "y": y}}[form]
    trainer = Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer.fit(m, loader, loader)
    logged = trainer.logged_metrics
    assert {"train/loss_step", "val/loss", "val/loss_q0", "val/loss_q3"} <= set(logged)
    assert all(torch.isfinite(logged[k]) for k in ("val/loss_q0", "val/loss_q1", "val/loss_q2", "val/loss_q3"))


def test_quartile_losses_are_the_per_quartile_means_over_the_epoch():
    # Known per-example losses (loss = t) over three batches of different sizes: each logged quartile
    # value must be the mean of t over that quartile's examples, pooled across batches.
    m = DiffusionModule(backbone=TINY_MLP, data_shape=[2], num_timesteps=20)
    seen = []

    def fake_losses(denoise_fn, x0, t, generator=None):
        seen.append(t.clone())
        return {"loss": t.float() + 0 * denoise_fn(x0, t).sum()}

    m.diffusion.training_losses = fake_losses
    loader = torch.utils.data.DataLoader([torch.randn(n, 2) for n in (7, 13, 30)], batch_size=None)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(m, loader)
    t = torch.cat(seen).float()
    quartile = (t * 4).div(20, rounding_mode="floor")
    for q in range(4):
        assert trainer.logged_metrics[f"val/loss_q{q}"].item() == pytest.approx(t[quartile == q].mean().item())


def test_label_checks():
    from lightning_ddpm.data.batches import check_labels, unpack_batch

    x = torch.randn(4, 2)

    def checked(batch, num_classes=3):
        x, y = unpack_batch(batch, (2,))
        return check_labels(y, x.shape[0], num_classes)

    with pytest.raises(ValueError, match=r"class-conditional \(num_classes=3\) but the batch has no labels"):
        checked(x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got range \[0, 3\]"):
        checked((x, torch.tensor([0, 1, 2, 3])))
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(4,\)"):
        checked((x, torch.zeros(4, 1, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"batch examples have shape \(3,\), the model expects \(2,\)"):
        checked(torch.randn(4, 3))
    unconditional = DiffusionModule(backbone=TINY_MLP, data_shape=[2], num_timesteps=20)
    with pytest.raises(ValueError, match="labels given to an unconditional model"):
        unconditional.sample(2, labels=[0, 1])
    assert checked((x, torch.zeros(4)), num_classes=None) is None  # dataset labels are ignored
    # In training the label values are checked on the first batch of each epoch (one host read per epoch).
    m = DiffusionModule(backbone=TINY_MLP, data_shape=[2], num_classes=3, num_timesteps=20)
    loader = torch.utils.data.DataLoader([(x, torch.tensor([0, 1, 2, 7]))], batch_size=None)
    trainer = Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got range \[0, 7\]"):
        trainer.fit(m, loader)


def test_sample_is_reproducible_and_shaped():
    m = DiffusionModule(backbone=TINY_UNET, data_shape=[1, 8, 8], num_timesteps=20, clip_denoised=True)
    a = m.sample(3, sampler=DDIMSampler(num_steps=5), generator=torch.Generator().manual_seed(0))
    b = m.sample(3, sampler={"name": "ddim", "init_args": {"num_steps": 5}}, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 1, 8, 8) and a.abs().max() <= 1
    torch.testing.assert_close(a, b)
    assert m.training  # sample() restores the mode


def test_warmup_schedule():
    m = DiffusionModule(
        backbone=TINY_MLP,
        lr_warmup_steps=4,
        optimizer={"name": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.0}},
    )
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert isinstance(opt, torch.optim.AdamW)


def test_nn_module_backbone_needs_passing_again(tmp_path):
    with pytest.warns(UserWarning, match="pass backbone=... again"):
        m = DiffusionModule(backbone=MLP(hidden_dim=16, num_blocks=1), data_shape=[2])
    assert "backbone" not in m.hparams
    assert isinstance(m.backbone, nn.Module)


@pytest.mark.parametrize("example", [["own_lightning_project.py"], ["train_toy2d_plain.py", "--steps", "100"]])
def test_examples_run_warning_free(tmp_path, example):
    """As a user runs them, with every warning turned into an error (`python -W error`)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-W", "error", str(root / "examples" / example[0]), *example[1:]]
    if example[0] == "train_toy2d_plain.py":
        cmd += ["--out", str(tmp_path / "plain.png")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    if example[0] == "own_lightning_project.py":
        source = (root / "examples" / example[0]).read_text()
        from tests.helpers import documentation

        assert source.split('"""', 2)[2].strip() in documentation(), "docs/python.md shows it verbatim"
        near = float(result.stdout.split("% of samples lie within 0.1")[0].split()[-1])
        assert near > 85  # most samples land on the unit circle


def test_loss_aware_timestep_sampler_learns_from_training_losses(tmp_path):
    m = DiffusionModule(
        backbone=TINY_MLP, data_shape=[2], num_timesteps=4, timestep_sampler="loss_second_moment", loss="vlb"
    )
    batch = torch.randn(64, 2)
    loader = torch.utils.data.DataLoader([batch] * 8, batch_size=None)
    trainer = Trainer(
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(m, loader)
    sampler = m.timestep_sampler
    assert sampler.warmed_up() and int(sampler.loss_counts.sum()) == 4 * sampler.history
    assert not torch.allclose(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    state = {}
    m.on_save_checkpoint(state)
    fresh = DiffusionModule(backbone=TINY_MLP, data_shape=[2], num_timesteps=4, timestep_sampler="loss_second_moment")
    fresh.on_load_checkpoint(state)
    torch.testing.assert_close(fresh.timestep_sampler.probabilities(), sampler.probabilities())


def test_warns_when_eps_and_the_schedule_amplify_errors():
    with pytest.warns(UserWarning, match=r"multiplies eps errors by 32x.*prefer parameterization='v'"):
        DiffusionModule(backbone=TINY_MLP, schedule="cosine", parameterization="eps", clip_denoised=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DiffusionModule(backbone=TINY_MLP, schedule="cosine", parameterization="v")
        DiffusionModule(backbone=TINY_MLP, schedule="cosine", parameterization="eps", clip_denoised=True)
        DiffusionModule(backbone=TINY_MLP, schedule="linear", parameterization="eps")  # beta_T = 0.02


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_samples_a_guided_learned_variance_model(name):
    """Every registered sampler by name: class-conditional with guidance, learned variance, clipped
    images, reproducible with a generator, and sample i depends on generator i alone."""
    m = DiffusionModule(
        backbone=TINY_UNET,
        data_shape=[1, 8, 8],
        num_classes=10,
        variance="learned_range",
        loss="hybrid",
        num_timesteps=20,
        clip_denoised=True,
        guidance_scale=2.0,
        sampler=sampler_spec(name, num_steps=4),
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the U-Net's zero-initialised output layers would make every label look alike
        for p in m.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    labels = [1, 2, 3]
    seeds = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    a = m.sample(3, labels=labels, generator=seeds)
    b = m.sample(3, labels=labels, generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    alone = m.sample(1, labels=[2], generator=[torch.Generator().manual_seed(6)])
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all() and a.abs().max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[1:2], alone, rtol=1e-5, atol=1e-5)
    unguided = m.sample(
        3, labels=labels, guidance_scale=1.0, generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    )
    assert not torch.allclose(a, unguided)


def test_a_bare_sampler_name_fits_a_short_schedule():
    m = DiffusionModule(backbone=TINY_MLP, num_timesteps=8, sampler="dpmpp_2m")
    assert m.default_sampler.num_steps == 8
    with pytest.raises(ValueError, match=r"num_steps must lie in \[1, T=8\], got 10"):
        DiffusionModule(backbone=TINY_MLP, num_timesteps=8, sampler={"name": "unipc", "init_args": {"num_steps": 10}})


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # the training step outside a Trainer
def test_a_device_without_float64_gets_float32_constants_on_every_path(monkeypatch):
    """MPS refuses float64: moving the module, training steps and the loss-aware timestep sampler, every kind of
    sampler (respaced DDPM, DDIM, a multistep solver on fractional Karras timesteps) and bits/dim must keep
    float64 off such a device, and keep it where the device has it."""
    from lightning_ddpm.core import dtypes
    from lightning_ddpm.core.timestep_sampling import LossSecondMomentSampler
    from tests.helpers import DeviceWithoutFloat64

    def model(**kw):
        return DiffusionModule(
            backbone=TINY_UNET,
            data_shape=[1, 8, 8],
            num_timesteps=20,
            num_classes=3,
            variance="learned_range",
            loss="hybrid",
            clip_denoised=True,
            **kw,
        )

    module = model()
    assert module.to("cpu").diffusion.betas.dtype == torch.float64  # a device with float64 keeps it
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    monkeypatch.setattr(dtypes, "NO_FLOAT64", {*dtypes.NO_FLOAT64, "cpu"})
    module = model()
    with DeviceWithoutFloat64():
        module.to("cpu")
        assert {b.dtype for b in module.diffusion.buffers()} == {torch.float32}
        batch = (x0.to("cpu"), torch.tensor([0, 1, 2, 0]).to("cpu"))
        for step in range(2):
            loss, _ = module._shared_step(batch, "train", step)
            loss.backward()
        importance = LossSecondMomentSampler(20, history=1)  # its loss history lives on the device
        t = torch.arange(20).to("cpu")
        importance.update(t, t.float() + 1)
        t, weights = importance.sample(64, "cpu", generator=torch.Generator().manual_seed(0))
        importance.update(t, t.float() + 1)
        assert importance.warmed_up() and importance.loss_history.dtype == torch.float32 and weights.isfinite().all()
        for sampler in (
            "ddpm",
            {"name": "ddpm", "init_args": {"num_steps": 5}},
            "ddim",
            {"name": "dpmpp_2m", "init_args": {"num_steps": 4, "spacing": "karras"}},
            {"name": "unipc", "init_args": {"num_steps": 4}},
        ):
            samples = module.sample(2, sampler=sampler, labels=[0, 1], generator=torch.Generator().manual_seed(0))
            assert samples.dtype == torch.float32 and torch.isfinite(samples).all()
        bpd = module.diffusion.bits_per_dim(module.denoiser(), x0.to("cpu"))
        assert bpd.dtype == torch.float32 and torch.isfinite(bpd).all()
