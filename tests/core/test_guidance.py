import json
from pathlib import Path

import pytest
import torch

from lightning_ddpm import DDIMSampler, DiffusionModule, GaussianDiffusion
from lightning_ddpm.cli import run_cli
from lightning_ddpm.core.denoiser import Denoiser, Prediction
from lightning_ddpm.core.guidance import guided_denoiser
from lightning_ddpm.data import TOY_DISTRIBUTIONS, Toy2DDataModule
from tests.conftest import small_schedule

ROOT = Path(__file__).resolve().parents[2]


def _model(channels_out=3):
    """A per-example model whose output depends on x, t and the label."""
    weights = torch.randn(11, channels_out, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def model(x, t, cond):
        return torch.sin(x[:, :1] * (1 + t[:, None])) * weights[cond] + 0.1 * x[:, :1]

    return model


def _denoiser(d: GaussianDiffusion, channels: int = 3):
    """A conditional Denoiser over the stand-in network."""
    return Denoiser(_model(channels * d.output_channels_factor), d)


def _same(a: Prediction, b: Prediction, tol: float = 0.0) -> None:
    for u, v in zip(a, b):
        assert (u is None) == (v is None)
        if u is not None:
            torch.testing.assert_close(u, v, rtol=tol, atol=tol)


def test_scale_zero_and_one_are_exact():
    d = GaussianDiffusion(small_schedule("cosine", 20), parameterization="v")
    x, t, labels = torch.randn(5, 3, dtype=torch.float64), torch.arange(5), torch.tensor([0, 1, 2, 3, 4])
    model = _denoiser(d)
    _same(guided_denoiser(model, labels, 10, 0.0)(x, t), model(x, t, torch.full_like(labels, 10)))
    _same(guided_denoiser(model, labels, 10, 1.0)(x, t), model(x, t, labels))
    # the batched path agrees with separate calls at those scales too (w -> 0 and w -> 1 limits)
    for w, reference in ((1e-12, model(x, t, torch.full_like(labels, 10))), (1 - 1e-12, model(x, t, labels))):
        _same(guided_denoiser(model, labels, 10, w)(x, t), reference, tol=1e-9)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0, got -1"):
        guided_denoiser(model, labels, 10, -1.0)


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_guidance_is_eps_guidance_for_every_parameterization(parameterization, variance):
    """Mixing the predictions is Ho & Salimans' eps guidance, and x0 is the guided eps's x0."""
    d = GaussianDiffusion(small_schedule("cosine", 20), parameterization=parameterization, variance=variance)
    model = _denoiser(d)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t, labels, w = torch.tensor([0, 3, 7, 11, 15, 19]), torch.tensor([1, 2, 3, 4, 5, 6]), 2.5
    guided = guided_denoiser(model, labels, 10, w)(x, t)
    cond, uncond = model(x, t, labels), model(x, t, torch.full_like(labels, 10))
    eps = uncond.eps + w * (cond.eps - uncond.eps)
    torch.testing.assert_close(guided.eps, eps, rtol=1e-9, atol=1e-9)
    c = d.coefficients(t, x)
    torch.testing.assert_close(
        guided.x0, (x - c.sqrt_one_minus_alpha_bar * eps) / c.sqrt_alpha_bar, rtol=1e-9, atol=1e-9
    )
    if variance == "learned_range":
        torch.testing.assert_close(
            guided.variance_frac, cond.variance_frac, rtol=0, atol=0
        )  # conditional variance kept
    else:
        assert guided.variance_frac is None


def test_clipping_comes_after_guidance():
    """Guidance can push x0 out of [-1, 1]; the sampler clips the guided prediction, so the result stays inside."""
    d = GaussianDiffusion(small_schedule("cosine", 20), parameterization="x0", clip_denoised=True)
    model = Denoiser(lambda x, t, cond: torch.where(cond[:, None] == 10, -0.5, 0.9).expand_as(x).to(x.dtype), d)
    guided = guided_denoiser(model, torch.tensor([1, 2]), 10, 3.0)
    assert guided(torch.zeros(2, 3), torch.tensor([5, 5])).x0.max() > 1  # 0.9 + 2 (0.9 + 0.5) = 3.7
    out = DDIMSampler(num_steps=5).sample(guided, d, torch.randn(2, 3))
    torch.testing.assert_close(out, torch.ones_like(out))


def test_label_dropout_rate_is_honoured():
    module = DiffusionModule(
        backbone={"name": "mlp", "init_args": {"hidden_dim": 8, "num_blocks": 1}},
        data_shape=[2],
        num_classes=4,
        num_timesteps=20,
        cond_drop_prob=0.1,
    )
    seen = []
    forward = module.backbone.forward
    module.backbone.forward = lambda x, t, cond=None: (seen.append(cond.clone()), forward(x, t, cond))[1]
    torch.manual_seed(0)
    x, y = torch.randn(2000, 2), torch.randint(0, 4, (2000,))
    for _ in range(10):
        module._shared_step((x, y), "train", 0)
    labels = torch.cat(seen)
    dropped = (labels == 4).float().mean().item()
    assert abs(dropped - 0.1) < 0.01  # 20k draws: standard error 0.002
    kept = labels != 4
    assert torch.equal(labels[kept], y.repeat(10)[kept])  # the rest keep their true label


def test_conditional_toy_model_puts_samples_of_class_k_near_component_k():
    """8 Gaussians, a short training run: a model that ignored its labels would score ~1/8."""
    torch.manual_seed(0)
    dm = Toy2DDataModule("eight_gaussians", num_train=256 * 1200, batch_size=256, labels=True)
    module = DiffusionModule(
        backbone={"name": "mlp", "init_args": {"hidden_dim": 128, "num_blocks": 3}},
        data_shape=[2],
        num_classes=8,
        schedule="cosine",
        num_timesteps=100,
        optimizer={"name": "torch.optim.Adam", "init_args": {"lr": 2e-3}},
        lr_warmup_steps=50,
    )
    from lightning.pytorch import Trainer

    Trainer(
        max_steps=1200,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, datamodule=dm)
    labels = torch.arange(8).repeat_interleave(100)
    angle = torch.arange(8) * (2 * torch.pi / 8)
    centers = torch.stack([angle.cos(), angle.sin()], dim=1)
    accuracy = {}
    for w in (1.0, 3.0):
        samples = module.sample(
            800,
            sampler=DDIMSampler(num_steps=25),
            generator=torch.Generator().manual_seed(0),
            labels=labels,
            guidance_scale=w,
        )
        accuracy[w] = (torch.cdist(samples, centers).argmin(dim=1) == labels).float().mean().item()
    assert accuracy[1.0] > 0.8 and accuracy[3.0] >= 0.9, accuracy


def test_bad_labels_and_scales():
    module = DiffusionModule(
        backbone={"name": "mlp", "init_args": {"hidden_dim": 8, "num_blocks": 1}},
        data_shape=[2],
        num_classes=3,
        num_timesteps=20,
    )
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got range \[0, 5\]"):
        module.sample(2, labels=[0, 5])
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(2,\)"):
        module.sample(2, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="guidance_scale must be >= 0, got -0.5"):
        module.sample(2, labels=[0, 1], guidance_scale=-0.5)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        DiffusionModule(guidance_scale=-1.0)


def test_cli_predict_with_requested_labels_and_scale(tmp_path):
    tiny = json.dumps({"name": "mlp", "init_args": {"hidden_dim": 16, "num_blocks": 1}})
    common = [
        "--config",
        str(ROOT / "configs/toy2d_cond.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--model.backbone",
        tiny,
        "--trainer.callbacks",
        json.dumps(
            [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
                }
            ]
        ),
    ]
    run_cli(
        ["fit", *common, "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--data.init_args.num_train=768"]
    )
    out = tmp_path / "pred"
    run_cli(
        [
            "predict",
            *common,
            "--ckpt_path",
            str(tmp_path / "ckpt" / "last.ckpt"),
            "--model.guidance_scale=3.0",
            "--data.init_args.predict_labels=[2, 5]",
            "--data.init_args.num_predict_samples=6",
            "--predict_writer.output_dir",
            str(out),
            "--model.sampler",
            '{"name": "ddim", "init_args": {"num_steps": 3}}',
        ]
    )
    saved = torch.load(out / "samples.pt", weights_only=True)
    assert saved["samples"].shape == (6, 2) and saved["labels"].tolist() == [2, 5, 2, 5, 2, 5]
    # a fast solver by name from the command line, and as a SampleLogger's sampler in YAML-style mapping
    fast = tmp_path / "fast"
    run_cli(
        [
            "predict",
            *common,
            "--ckpt_path",
            str(tmp_path / "ckpt" / "last.ckpt"),
            "--model.guidance_scale=3.0",
            "--data.init_args.num_predict_samples=4",
            "--predict_writer.output_dir",
            str(fast),
            "--model.sampler",
            '{"name": "dpmpp_2m", "init_args": {"num_steps": 4}}',
        ]
    )
    assert torch.isfinite(torch.load(fast / "samples.pt", weights_only=True)["samples"]).all()
    pictures = tmp_path / "pictures"
    logger = {
        "class_path": "lightning_ddpm.callbacks.SampleLogger",
        "init_args": {
            "every_n_steps": 1,
            "every_n_epochs": None,
            "num_samples": 16,
            "output_dir": str(pictures),
            "sampler": {"name": "unipc", "init_args": {"num_steps": 3, "order": 3}},
        },
    }
    run_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs/toy2d_cond.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--model.backbone",
            tiny,
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--data.init_args.num_train=768",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks",
            json.dumps([logger]),
        ]
    )
    assert sorted(p.name for p in pictures.iterdir()) == ["step_0000001.png"]
    assert TOY_DISTRIBUTIONS["eight_gaussians"][1] == 8
