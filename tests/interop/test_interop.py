"""diffusers interop, both ways: folders and objects -> DiffusionModule -> folders diffusers' pipelines load.

Everything runs on randomly initialised diffusers models (this machine cannot download the published
checkpoints); the U-Net weight mapping itself is tested in tests/interop/test_interop_unet.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

from lightning_ddpm import DDIMSampler, DDPMSampler, DiffusionModule, make_schedule  # noqa: E402
from lightning_ddpm.interop.diffusers import (  # noqa: E402
    SCHEDULER_SAMPLERS,
    require_diffusers,
    scheduler_config_from_settings,
    settings_from_scheduler_config,
)
from tests.helpers import documentation  # noqa: E402

# A small UNet2DModel laid out like the published DDPM ones (attention at one level, positional time
# embedding with freq_shift=1, GroupNorm eps 1e-6), on 8x8 grey images.
TINY = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    norm_eps=1e-6,
    freq_shift=1,
    flip_sin_to_cos=False,
    attention_head_dim=None,
)
T = 50
ROOT = Path(__file__).resolve().parents[2]


def _unet(seed: int = 0, **config) -> diffusers.UNet2DModel:
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**{**TINY, **config})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # both libraries zero-initialise some layers, which would hide mapping errors
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return unet.eval()


def _scheduler(**config) -> diffusers.DDPMScheduler:
    return diffusers.DDPMScheduler(**{"num_train_timesteps": T, "beta_end": 0.2, **config})


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("rescale", [False, True])
def test_schedules_map_to_the_same_betas_both_ways(beta_schedule, rescale):
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale
    )
    settings = settings_from_scheduler_config(scheduler.config)
    ours = make_schedule(
        settings["schedule"],
        settings["num_timesteps"],
        **settings["schedule_kwargs"],
        rescale_to_zero_terminal_snr=settings["rescale_to_zero_terminal_snr"],
    )
    # diffusers rescales in float32 (sqrt, cumprod, difference): ~5e-7 absolute from our float64 betas
    torch.testing.assert_close(ours.betas.float(), scheduler.betas, rtol=1e-5, atol=1e-6 if rescale else 1e-8)
    back = diffusers.DDPMScheduler(**scheduler_config_from_settings(settings))
    torch.testing.assert_close(back.betas, scheduler.betas, rtol=1e-6, atol=1e-6 if rescale else 1e-9)


@pytest.mark.parametrize(("theirs", "ours"), [("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v")])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_prediction_variance_and_clipping_map_both_ways(theirs, ours, variance):
    settings = settings_from_scheduler_config(
        {"prediction_type": theirs, "variance_type": variance, "clip_sample": True}
    )
    assert (settings["parameterization"], settings["variance"], settings["clip_denoised"]) == (ours, variance, True)
    config = scheduler_config_from_settings(settings)
    assert (config["prediction_type"], config["variance_type"], config["clip_sample"]) == (theirs, variance, True)


@pytest.mark.parametrize(
    ("config", "class_name", "message"),
    [
        (
            {"prediction_type": "flow_prediction"},
            "DDPMScheduler",
            "prediction_type: 'flow_prediction' is not supported",
        ),
        (
            {"variance_type": "learned"},
            "DDPMScheduler",
            "variance_type: 'learned' is not supported; supported: fixed_small",
        ),
        ({"thresholding": True}, "DDPMScheduler", "thresholding: True is not supported"),
        ({"steps_offset": 1}, "DDIMScheduler", "steps_offset: 1 is not supported; supported: 0"),
        ({"clip_sample": True, "clip_sample_range": 2.0}, "DDPMScheduler", "clip_sample_range: 2.0 is not supported"),
        ({"beta_schedule": "exp"}, "DDPMScheduler", "beta_schedule: 'exp' is not supported"),
        ({}, "PNDMScheduler", "_class_name: 'PNDMScheduler' is not supported; supported: DDPMScheduler, DDIMScheduler"),
        (
            {"algorithm_type": "dpmsolver"},
            "DPMSolverMultistepScheduler",
            "algorithm_type: 'dpmsolver' is not supported",
        ),
        ({"solver_order": 3}, "DPMSolverMultistepScheduler", "solver_order: 3 is not supported; supported: 2"),
        ({"solver_type": "heun"}, "DPMSolverMultistepScheduler", "solver_type: 'heun' is not supported"),
        ({"euler_at_final": True}, "DPMSolverMultistepScheduler", "euler_at_final: True is not supported"),
        ({"final_sigmas_type": "sigma_min"}, "DPMSolverMultistepScheduler", "final_sigmas_type: 'sigma_min' is not"),
        ({"lower_order_final": False}, "UniPCMultistepScheduler", "lower_order_final: False is not supported"),
        ({"solver_type": "bh1"}, "UniPCMultistepScheduler", "solver_type: 'bh1' is not supported; supported: bh2"),
        ({"predict_x0": False}, "UniPCMultistepScheduler", "predict_x0: False is not supported"),
        ({"solver_order": 4}, "UniPCMultistepScheduler", "solver_order: 4 is not supported"),
        ({"disable_corrector": [0]}, "UniPCMultistepScheduler", r"disable_corrector: \[0\] is not supported"),
        ({"use_exponential_sigmas": True}, "EulerDiscreteScheduler", "use_exponential_sigmas: True is not supported"),
        ({"use_lu_lambdas": True}, "DPMSolverMultistepScheduler", "use_lu_lambdas: True is not supported"),
        ({"interpolation_type": "log_linear"}, "EulerDiscreteScheduler", "interpolation_type: 'log_linear' is not"),
        ({"timestep_type": "continuous"}, "EulerDiscreteScheduler", "timestep_type: 'continuous' is not supported"),
        ({"sigma_min": 0.01}, "HeunDiscreteScheduler", "sigma_min: 0.01 is not supported; supported: null"),
        ({"lambda_min_clipped": -5.1}, "DPMSolverMultistepScheduler", "lambda_min_clipped: -5.1 is not supported"),
    ],
)
def test_scheduler_configs_we_cannot_represent_are_refused_by_field(config, class_name, message):
    with pytest.raises(ValueError, match=message):
        settings_from_scheduler_config(config, class_name)


def test_scheduler_classes_choose_our_sampler_of_the_same_method():
    pick = lambda name, **c: settings_from_scheduler_config(c, name)["sampler"]  # noqa: E731
    assert pick("DDPMScheduler") == "ddpm"
    assert pick("DDIMScheduler", timestep_spacing="trailing") == {"name": "ddim", "init_args": {"spacing": "trailing"}}
    assert pick("DPMSolverMultistepScheduler", use_karras_sigmas=True) == {
        "name": "dpmpp_2m",
        "init_args": {"spacing": "karras"},
    }
    # diffusers' default spacing of the multistep schedulers is linspace (N + 1 points, t = 0 dropped), as ours
    assert pick("UniPCMultistepScheduler") == {"name": "unipc", "init_args": {"spacing": "linspace"}}
    assert pick("UniPCMultistepScheduler", solver_order=3, timestep_spacing="leading") == {
        "name": "unipc",
        "init_args": {"spacing": "leading", "order": 3},
    }
    assert pick("DPMSolverMultistepScheduler", timestep_spacing="trailing") == {
        "name": "dpmpp_2m",
        "init_args": {"spacing": "trailing"},
    }
    # Euler / Heun linspace is fractional in diffusers, a grid we do not offer: trailing is the nearest
    assert pick("HeunDiscreteScheduler") == {"name": "heun", "init_args": {"spacing": "trailing"}}
    assert pick("EulerDiscreteScheduler", timestep_spacing="leading") == {
        "name": "euler",
        "init_args": {"spacing": "leading"},
    }
    assert pick("EulerDiscreteScheduler", use_karras_sigmas=True, sigma_max=80.0) == {
        "name": "euler",
        "init_args": {"spacing": "karras", "sigma_max": 80.0},
    }
    assert pick("EulerDiscreteScheduler", sigma_max=80.0) == {"name": "euler", "init_args": {"spacing": "trailing"}}
    for cls in (
        "DDPMScheduler",
        "DDIMScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
    ):  # every default config is accepted
        sampler = pick(cls, **getattr(diffusers, cls)().config)
        assert (sampler if isinstance(sampler, str) else sampler["name"]) == SCHEDULER_SAMPLERS[cls]
    assert pick("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++") == {
        "name": "dpmpp_2m_sde",
        "init_args": {"spacing": "linspace"},
    }


def test_from_diffusers_objects_gives_the_same_network_and_settings():
    unet = _unet()
    module = DiffusionModule.from_diffusers(
        unet, scheduler=_scheduler(prediction_type="v_prediction", variance_type="fixed_large", clip_sample=True)
    )
    assert module.data_shape == (1, 8, 8) and module.diffusion.num_timesteps == T
    assert (module.diffusion.parameterization, module.diffusion.variance, module.diffusion.clip_denoised) == (
        "v",
        "fixed_large",
        True,
    )
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 17, 49])
    with torch.no_grad():
        torch.testing.assert_close(module.eval().backbone(x, t), unet(x, t).sample, rtol=1e-5, atol=1e-5)


def test_export_loads_in_diffusers_pipelines_and_round_trips_bit_exactly(tmp_path):
    unet = _unet()
    module = DiffusionModule.from_diffusers(unet, scheduler=_scheduler(clip_sample=True))
    folder = module.to_diffusers(tmp_path / "export")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    pipe.save_pretrained(tmp_path / "theirs")  # the README: exactly the files save_pretrained writes
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == sorted(
        p.relative_to(tmp_path / "theirs") for p in (tmp_path / "theirs").rglob("*")
    )
    torch.testing.assert_close(pipe.unet.state_dict(), unet.state_dict(), rtol=0, atol=0)
    back = DiffusionModule.from_diffusers(folder)
    torch.testing.assert_close(back.backbone.state_dict(), module.backbone.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(back.diffusion.schedule.betas, module.diffusion.schedule.betas, rtol=0, atol=0)
    assert diffusers.DDIMPipeline.from_pretrained(folder).scheduler.__class__.__name__ == "DDIMScheduler"


def _pipeline_images(images: torch.Tensor) -> torch.Tensor:
    """Our samples in [-1, 1] as the pipelines return them (output_type="pt": [0, 1])."""
    return (images / 2 + 0.5).clamp(0, 1)


def test_ddim_pipeline_on_our_export_gives_our_samples(tmp_path):
    module = DiffusionModule.from_diffusers(_unet(), scheduler=_scheduler(clip_sample=True))
    folder = module.to_diffusers(tmp_path / "export")
    pipe = diffusers.DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    # use_clipped_model_output: eps re-derived from the clipped x0, as our samplers do (diffusers' DDIM
    # default keeps the network's eps next to the clipped x0)
    theirs = pipe(
        batch_size=4,
        generator=torch.Generator().manual_seed(3),
        eta=0.0,
        num_inference_steps=10,
        use_clipped_model_output=True,
        output_type="pt",
        return_dict=False,
    )[0]
    ours = module.sample(4, sampler=DDIMSampler(num_steps=10), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        _pipeline_images(ours),
        torch.as_tensor(theirs).permute(0, 3, 1, 2) if theirs.shape[-1] == 1 else torch.as_tensor(theirs),
        rtol=1e-4,
        atol=1e-4,
    )


def test_ddpm_pipeline_on_our_export_gives_our_samples_from_the_same_generator(tmp_path):
    """Both draw x_T, then one normal per step but the last, from the generator in the same order."""
    module = DiffusionModule.from_diffusers(
        _unet(), scheduler=_scheduler(variance_type="fixed_large", clip_sample=True)
    )
    folder = module.to_diffusers(tmp_path / "export")
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        batch_size=2,
        generator=torch.Generator().manual_seed(4),
        num_inference_steps=T,
        output_type="pt",
        return_dict=False,
    )[0]
    ours = module.sample(2, sampler=DDPMSampler(), generator=torch.Generator().manual_seed(4))
    theirs = torch.as_tensor(theirs)
    theirs = theirs.permute(0, 3, 1, 2) if theirs.shape[-1] == 1 else theirs
    torch.testing.assert_close(_pipeline_images(ours), theirs, rtol=1e-4, atol=1e-4)


def test_a_model_trained_here_exports_and_reimports_to_identical_samples(tmp_path):
    from lightning.pytorch import Trainer

    from lightning_ddpm.data import ImageDataModule

    backbone = {
        "name": "unet",
        "init_args": {
            "ch": 32,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [4],
            "dropout": 0.0,
            "norm_groups": 8,
        },
    }
    module = DiffusionModule(
        backbone=backbone,
        data_shape=[1, 8, 8],
        num_timesteps=T,
        parameterization="v",
        schedule="cosine",
        clip_denoised=True,
        lr_warmup_steps=0,
    )
    Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, ImageDataModule("digits", batch_size=16))
    back = DiffusionModule.from_diffusers(module.to_diffusers(tmp_path / "export"))
    for sampler in (DDIMSampler(num_steps=5), DDPMSampler()):
        a = module.sample(4, sampler=sampler, generator=torch.Generator().manual_seed(0))
        b = back.sample(4, sampler=sampler, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (back.diffusion.parameterization, back.diffusion.schedule.num_timesteps) == ("v", T)


def test_cli_export_writes_the_checkpoints_weights(tmp_path):
    from lightning_ddpm.cli import main

    module = DiffusionModule.from_diffusers(_unet(), scheduler=_scheduler())
    from lightning.pytorch import Trainer

    trainer = Trainer(max_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    main(["export", "--ckpt_path", str(tmp_path / "model.ckpt"), "--output_dir", str(tmp_path / "out")])
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    back = DiffusionModule.from_diffusers(tmp_path / "out")
    torch.testing.assert_close(back.backbone.state_dict(), module.backbone.state_dict(), rtol=0, atol=0)
    assert pipe.scheduler.config.num_train_timesteps == T


def test_cli_export_writes_the_ema_weights_of_a_checkpoint_trained_with_ema(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_ddpm.callbacks import EMA
    from lightning_ddpm.cli import main
    from lightning_ddpm.data import ImageDataModule

    module = DiffusionModule.from_diffusers(
        _unet(),
        scheduler=_scheduler(),
        lr_warmup_steps=0,
        optimizer={"name": "torch.optim.Adam", "init_args": {"lr": 1e-2}},
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    Trainer(
        max_steps=2,
        callbacks=[EMA(decay=0.5), ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    ).fit(module, ImageDataModule("digits", batch_size=16))
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)

    def backbone(state):
        return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}

    ema, raw = backbone(checkpoint["state_dict"]), backbone(checkpoint["current_model_state"])
    assert max((ema[k] - raw[k]).abs().max() for k in ema) > 1e-3, "2 steps at lr 1e-2 move the raw weights"
    main(["export", "--ckpt_path", str(path), "--output_dir", str(tmp_path / "out")])
    back = DiffusionModule.from_diffusers(tmp_path / "out").backbone.state_dict()
    torch.testing.assert_close(back, ema, rtol=0, atol=0)


def _published(tmp_path):
    """A 'published' diffusers folder, the module it came from and the settings that match its model."""
    source = DiffusionModule.from_diffusers(_unet(), scheduler=_scheduler(clip_sample=True))
    folder = source.to_diffusers(tmp_path / "pretrained")
    settings = {
        k: v
        for k, v in source.hparams.items()
        if k
        in ("backbone", "data_shape", "schedule", "num_timesteps", "schedule_kwargs", "parameterization", "variance")
    }
    return source, folder, settings


def test_init_from_a_folder_fine_tunes_from_its_weights_and_checks_the_config(tmp_path):
    from lightning.pytorch import Trainer

    from lightning_ddpm.data import ImageDataModule

    source, folder, settings = _published(tmp_path)
    frozen = DiffusionModule(
        **settings,
        init_from=str(folder),
        lr_warmup_steps=0,
        optimizer={"name": "torch.optim.SGD", "init_args": {"lr": 0.0}},
    )
    assert not torch.equal(frozen.backbone.conv_in.weight, source.backbone.conv_in.weight)
    Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(frozen, ImageDataModule("digits", batch_size=16))
    torch.testing.assert_close(frozen.backbone.state_dict(), source.backbone.state_dict(), rtol=0, atol=0)
    wrong = DiffusionModule(**{**settings, "parameterization": "v"}, init_from=str(folder))
    with pytest.raises(
        ValueError,
        match=r"init_from .*: the folder's model differs from this config: "
        r"model.parameterization: given 'v', folder 'eps'",
    ):
        wrong.setup("fit")


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        DiffusionModule.from_diffusers(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError, match="is not a diffusers model folder: it has neither model_index.json nor config.json"
    ):
        DiffusionModule.from_diffusers(tmp_path / "empty")
    _unet().save_pretrained(tmp_path / "bare")
    (tmp_path / "bare" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model.safetensors"):
        DiffusionModule.from_diffusers(tmp_path / "bare")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="_class_name: 'AutoencoderKL' is not supported; supported: UNet2DModel"):
        DiffusionModule.from_diffusers(tmp_path / "vae")
    module = DiffusionModule(backbone={"name": "mlp"}, data_shape=[2])
    with pytest.raises(ValueError, match="to_diffusers writes a UNet2DModel and needs backbone 'unet', got 'mlp'"):
        module.to_diffusers(tmp_path / "out")


def test_a_bare_unet_folder_takes_the_scheduler_from_the_caller(tmp_path):
    _unet().save_pretrained(tmp_path / "bare")
    module = DiffusionModule.from_diffusers(
        tmp_path / "bare", scheduler={"prediction_type": "sample", "num_train_timesteps": 30}
    )
    assert module.diffusion.parameterization == "x0" and module.diffusion.num_timesteps == 30


def test_missing_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-ddpm\[diffusers\]'"):
        require_diffusers()


# google/ddpm-cifar10-32's configs (its unet/config.json and scheduler/scheduler_config.json on the Hub).
PUBLISHED_CIFAR10_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_eps=1e-6,
    norm_num_groups=32,
    act_fn="silu",
    time_embedding_type="positional",
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    center_input_sample=False,
    mid_block_scale_factor=1,
)
PUBLISHED_CIFAR10_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    variance_type="fixed_large",
    clip_sample=True,
)


def test_the_fine_tuning_config_accepts_the_published_cifar10_layout(tmp_path):
    """configs/cifar10_finetune_diffusers.yaml + a folder laid out like google/ddpm-cifar10-32 (random weights):
    the config check passes, the weights load, and the published settings come through from_diffusers too."""
    from lightning_ddpm.cli import run_cli

    folder = tmp_path / "ddpm-cifar10-32"
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**PUBLISHED_CIFAR10_UNET)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**PUBLISHED_CIFAR10_SCHEDULER)).save_pretrained(
        folder
    )
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs/cifar10_finetune_diffusers.yaml"
    cli = run_cli(
        ["--config", str(config), f"--trainer.default_root_dir={tmp_path}", "--model.init_from", str(folder)], run=False
    )
    cli.model.setup("validate")
    torch.testing.assert_close(cli.model.backbone.conv_in.weight, unet.conv_in.weight, rtol=0, atol=0)
    module = DiffusionModule.from_diffusers(folder)
    assert (module.diffusion.variance, module.diffusion.clip_denoised, module.hparams.sampler) == (
        "fixed_large",
        True,
        "ddpm",
    )
    assert sum(p.numel() for p in module.backbone.parameters()) == 35_746_307


def test_trained_betas_and_the_log_variances_map_to_our_settings():
    betas = torch.linspace(1e-4, 0.05, 30, dtype=torch.float64).tolist()
    settings = settings_from_scheduler_config({"trained_betas": betas, "num_train_timesteps": 30})
    assert settings["schedule"] == "custom" and settings["schedule_kwargs"]["betas"] == pytest.approx(betas, rel=1e-12)
    module = DiffusionModule(
        backbone={"name": "mlp", "init_args": {"hidden_dim": 8, "num_blocks": 1}},
        data_shape=[2],
        **{k: v for k, v in settings.items() if k != "sampler"},
    )
    torch.testing.assert_close(module.diffusion.schedule.betas, torch.tensor(betas, dtype=torch.float64))
    for theirs, ours in (("fixed_small_log", "fixed_small"), ("fixed_large_log", "fixed_large")):
        assert settings_from_scheduler_config({"variance_type": theirs})["variance"] == ours


def test_a_checkpoint_given_to_the_trainer_takes_precedence_over_init_from(tmp_path):
    from lightning.pytorch import Trainer

    from lightning_ddpm.data import ImageDataModule

    source, folder, settings = _published(tmp_path)
    other = DiffusionModule(**settings)  # fresh random weights: what the checkpoint holds
    trainer = Trainer(max_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(other)
    trainer.save_checkpoint(tmp_path / "other.ckpt")
    module = DiffusionModule(**settings, init_from=str(folder))
    Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1).validate(
        module, ImageDataModule("digits", batch_size=16), ckpt_path=tmp_path / "other.ckpt"
    )
    torch.testing.assert_close(module.backbone.state_dict(), other.backbone.state_dict(), rtol=0, atol=0)
    assert not torch.equal(module.backbone.conv_in.weight, source.backbone.conv_in.weight)
    fresh = DiffusionModule(**settings, init_from=str(folder))  # without a checkpoint: the folder's weights
    Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1).validate(
        fresh, ImageDataModule("digits", batch_size=16)
    )
    torch.testing.assert_close(fresh.backbone.state_dict(), source.backbone.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "cls",
    [
        "DDPMScheduler",
        "DDIMScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
    ],
)
def test_a_config_without_clip_sample_gets_that_schedulers_default(cls):
    """diffusers' default clip_sample, read from the class itself: a config that omits the field (saved by
    hand, or a bare U-Net folder with DDPMScheduler()'s defaults) must not turn clipping off."""
    default = bool(getattr(diffusers, cls)().config.get("clip_sample", False))
    assert settings_from_scheduler_config({}, cls)["clip_denoised"] is default
    assert settings_from_scheduler_config({"clip_sample": not default}, cls)["clip_denoised"] is (not default)


def test_a_bare_unet_folder_samples_clipped_as_ddpm_scheduler_does(tmp_path):
    _unet().save_pretrained(tmp_path / "bare")
    assert DiffusionModule.from_diffusers(tmp_path / "bare").diffusion.clip_denoised is True
    assert DiffusionModule.from_diffusers(_unet()).diffusion.clip_denoised is True


def test_a_fine_tuned_checkpoint_keeps_its_weights_after_load_from_checkpoint(tmp_path):
    """init_from is applied at the first setup of a fresh module only: a module loaded from a checkpoint holds
    every weight, and validate / predict must neither put the published weights back nor need the folder."""
    import shutil

    from lightning.pytorch import Trainer

    from lightning_ddpm.data import ImageDataModule

    source, folder, settings = _published(tmp_path)
    tuned = DiffusionModule(
        **settings,
        init_from=str(folder),
        lr_warmup_steps=0,
        optimizer={"name": "torch.optim.SGD", "init_args": {"lr": 0.1}},
    )
    trainer = Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(tuned, ImageDataModule("digits", batch_size=16))
    trainer.save_checkpoint(tmp_path / "tuned.ckpt")
    assert not torch.equal(tuned.backbone.conv_in.weight, source.backbone.conv_in.weight)  # fine-tuning moved it
    for gone in (False, True):
        if gone:
            shutil.rmtree(folder)  # the published folder is not needed once the checkpoint exists
        loaded = DiffusionModule.load_from_checkpoint(tmp_path / "tuned.ckpt")
        Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1).validate(
            loaded, ImageDataModule("digits", batch_size=16)
        )
        torch.testing.assert_close(loaded.backbone.state_dict(), tuned.backbone.state_dict(), rtol=0, atol=0)


def test_the_readme_loop_samples_an_exported_class_conditional_model_as_we_do(tmp_path):
    """DDPMPipeline has no labels: the README's U-Net + scheduler loop (run here as written, on our export) gives
    module.sample's images for the same x_T, labels and guidance scale; to_diffusers warns about the pipelines."""
    import re

    module = DiffusionModule.from_diffusers(_unet(num_class_embeds=4), scheduler=_scheduler(clip_sample=True))
    assert module.num_classes == 3
    with pytest.warns(
        UserWarning, match="class-conditional: diffusers' DDPMPipeline and DDIMPipeline load it but pass no"
    ):
        folder = module.to_diffusers(tmp_path / "exported")
    block = re.search(
        r"```python\n  (# sample an exported class-conditional model with diffusers\n.*?)\n  ```",
        documentation(),
        re.S,
    ).group(1)
    code = "\n".join(line.removeprefix("  ") for line in block.splitlines())
    namespace: dict = {}
    exec(code.replace('"exported/"', repr(str(folder))), namespace)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = module.sample(4, sampler=DDIMSampler(num_steps=50), labels=[0, 1, 2, 0], guidance_scale=2.0, x_T=x_T)
    torch.testing.assert_close(namespace["images"], _pipeline_images(ours), rtol=1e-4, atol=1e-4)
