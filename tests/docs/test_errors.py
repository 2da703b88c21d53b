"""Tries every row of docs/errors.md: each bad input must raise an error containing the documented text."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_ddpm import DDIMSampler, DiffusionModule, make_schedule, register_backbone
from lightning_ddpm.backbones import UNet
from lightning_ddpm.callbacks import PostHocEMA
from lightning_ddpm.cli.ema import write_posthoc_checkpoint
from lightning_ddpm.data import EditRequestsDataModule, ImageDataModule, ImageFolderDataset, Toy2DDataModule
from lightning_ddpm.ema import PowerProfile, reconstruct
from lightning_ddpm.ema.snapshots import save_snapshot
from lightning_ddpm.interop.diffusers_unet import unet_config_to_diffusers
from lightning_ddpm.training.checkpoints import SafeCheckpointIO

ROOT = Path(__file__).resolve().parents[2]
ROWS = {
    m.group(1): m.group(2)
    for m in re.finditer(r"^\| ([a-z0-9-]+) \| .* \| `(.*)` \|$", (ROOT / "docs/errors.md").read_text(), re.M)
}
MLP = {"name": "mlp", "init_args": {"hidden_dim": 8, "num_blocks": 1}}
UNET = {"name": "unet", "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}}


TINY_UNET_ERRORS = {
    "name": "unet",
    "init_args": {"ch": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "norm_groups": 4},
}


def _configs_in(folder: Path, *calls: list[str]):
    """``lightning-ddpm configs ...`` run from ``folder``, once per call."""
    from lightning_ddpm.cli.configs import configs_command

    for args in calls:
        configs_command([*args[:1], *args[1:], "--to", str(folder / "configs")] if args[:1] == ["copy"] else args)


def _run_cli_in(folder: Path, args: list[str]):
    """The CLI as run from ``folder`` (relative config paths as a user types them)."""
    import os

    from lightning_ddpm.cli import run_cli

    before = os.getcwd()
    os.chdir(folder)
    try:
        return run_cli(args)
    finally:
        os.chdir(before)


def _module(**kw):
    kw.setdefault("backbone", MLP)
    kw.setdefault("num_timesteps", 20)
    return DiffusionModule(**kw)


def _images(folder: Path, sizes=((8, 8),)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size).save(folder / f"{i}.png")
    return folder


def _edit_requests_with_a_missing_mask(tmp: Path):
    images, masks = _images(tmp / "images"), _images(tmp / "masks", sizes=((8, 8), (8, 8)))
    (masks / "0.png").unlink()  # images/0.png has no mask; masks/1.png belongs to no image
    return EditRequestsDataModule(str(images), masks=str(masks), channels=1).requests()


def _snapshots(tmp: Path, runs: dict, sigma_rels=(0.05, 0.10), widths=(4, 4)) -> Path:
    """A folder of post-hoc EMA snapshots of a (widths[i] x 2) matrix, for each run at each of its steps."""
    folder = tmp / "phema"
    for run, steps in runs.items():
        for step in steps:
            for sigma_rel, width in zip(sigma_rels, widths):
                save_snapshot(folder, run, step, PowerProfile(sigma_rel), {"w": torch.zeros(width, 2)}, torch.float32)
    return folder


def _fit(tmp_path: Path, module: DiffusionModule, steps: int, ckpt_path: Path | None = None):
    from lightning.pytorch import Trainer

    trainer = Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader([torch.randn(4, 2)] * 4, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def _checkpoint(tmp_path: Path, **kw) -> Path:
    path = tmp_path / "model.ckpt"
    _fit(tmp_path, _module(**kw), 1).save_checkpoint(path)
    return path


def _truncated(tmp_path: Path):
    path = _checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return SafeCheckpointIO().load_checkpoint(path)


def _cli(tmp: Path, *args: str):
    from lightning_ddpm.cli import run_cli

    return run_cli(
        [
            "predict",
            "--model.backbone",
            json.dumps(MLP),
            "--data",
            "lightning_ddpm.data.Toy2DDataModule",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp}",
            *args,
        ]
    )


def _corrupt(tmp_path: Path):
    from tests.cli.test_cli_user import _flip_tensor_bytes

    path = _checkpoint(tmp_path)
    _flip_tensor_bytes(path)
    return DiffusionModule.load_from_checkpoint(path)


def _final_fid_without_validation(tmp_path: Path):
    from lightning.pytorch import Trainer

    from lightning_ddpm.callbacks import FIDCallback
    from tests.helpers import TinyFeatures

    fid = FIDCallback(num_samples=4, at_train_end=True, feature_extractor=TinyFeatures(channels=2))
    Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[fid],
        default_root_dir=tmp_path,
    ).fit(_module(), torch.utils.data.DataLoader([torch.randn(4, 2)] * 4, batch_size=None))


class _FakeMesh:
    """What ModelParallelStrategy gives the module: a device mesh with named dimensions."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, **sizes: int) -> None:
        self.sizes = sizes

    def __getitem__(self, name: str):
        return type("SubMesh", (), {"size": lambda _: self.sizes[name]})()


def _sharded_module(**sizes: int) -> DiffusionModule:
    module = _module()
    module._device_mesh = _FakeMesh(**sizes)
    return module


def _ema_under_model_parallel(distributed_checkpoint: bool, device: str | None, module=None):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_ddpm.callbacks import EMA

    trainer = SimpleNamespace(strategy=ModelParallelStrategy(save_distributed_checkpoint=distributed_checkpoint))
    EMA(device=device).setup(trainer, module or _sharded_module(data_parallel=2, tensor_parallel=1), "fit")


def _ema_sharded_without_backbone():
    import lightning.pytorch as pl

    module = pl.LightningModule()
    module.net = torch.nn.Linear(2, 2)
    module._device_mesh = _FakeMesh(data_parallel=2, tensor_parallel=1)
    _ema_under_model_parallel(False, None, module)


def _ema_under_fsdp1():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_ddpm.callbacks import EMA

    EMA().setup(SimpleNamespace(strategy=FSDPStrategy()), _module(), "fit")


def _diffusers_unet(**config):
    import diffusers

    tiny = dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return diffusers.UNet2DModel(**{**tiny, **config})


def _diffusers_weights(edit):
    from lightning_ddpm.interop.diffusers_unet import unet_state_dict_from_diffusers

    unet = _diffusers_unet()
    state = dict(unet.state_dict())
    edit(state)
    return unet_state_dict_from_diffusers(state, unet.config)


def _cross_attention_folder(tmp):
    """A UNet folder whose config.json asks for cross-attention blocks (a text-conditioned U-Net)."""
    _diffusers_unet().save_pretrained(tmp / "unet")
    config = json.loads((tmp / "unet" / "config.json").read_text())
    config["down_block_types"] = ["CrossAttnDownBlock2D", "DownBlock2D"]
    (tmp / "unet" / "config.json").write_text(json.dumps(config))
    DiffusionModule.from_diffusers(tmp / "unet")


def _without_diffusers(tmp):
    import sys

    saved = sys.modules.get("diffusers")
    sys.modules["diffusers"] = None  # what an environment without the package gives on import
    try:
        DiffusionModule(
            backbone={
                "name": "unet",
                "init_args": {"ch": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "norm_groups": 4},
            },
            data_shape=[1, 8, 8],
            num_timesteps=20,
        ).to_diffusers(tmp / "out")
    finally:
        if saved is None:
            sys.modules.pop("diffusers")
        else:
            sys.modules["diffusers"] = saved


def _init_from_differs(tmp):
    source = DiffusionModule.from_diffusers(_diffusers_unet(), scheduler={"num_train_timesteps": 20})
    folder = source.to_diffusers(tmp / "pretrained")
    settings = {
        k: source.hparams[k] for k in ("backbone", "data_shape", "schedule", "num_timesteps", "schedule_kwargs")
    }
    DiffusionModule(**settings, parameterization="v", init_from=str(folder)).setup("fit")


def _fit_into_a_taken_folder(tmp):
    (tmp / "checkpoints").mkdir()
    (tmp / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run")  # refused before it is opened
    from lightning_ddpm.cli import run_cli

    run_cli(
        [
            "fit",
            "--model.backbone",
            json.dumps(MLP),
            "--data",
            "lightning_ddpm.data.Toy2DDataModule",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp}",
            "--trainer.max_steps=1",
        ]
    )


CASES = {
    "unknown-schedule": lambda tmp: _module(schedule="cosin"),
    "unknown-parameterization": lambda tmp: _module(parameterization="epsilon"),
    "unknown-variance": lambda tmp: _module(variance="learned"),
    "unknown-loss": lambda tmp: _module(loss="l1"),
    "unknown-sampler": lambda tmp: _module(sampler="plms"),
    "unknown-backbone": lambda tmp: _module(backbone="resnet"),
    "backbone-unregistered": lambda tmp: _module(backbone="my_net"),
    "backbone-unparsed": lambda tmp: _module(backbone="{name: unet, init_args: {ch: 32}"),
    "unknown-dataset": lambda tmp: ImageDataModule("svhn"),
    "unknown-distribution": lambda tmp: Toy2DDataModule("spiral"),
    "image-size": lambda tmp: UNet(image_size=30),
    "conv-in-kernel": lambda tmp: UNet(conv_in_kernel=4),
    "channel-mismatch": lambda tmp: _module(
        backbone={"name": "unet", "init_args": {"in_channels": 3, "ch": 32, "ch_mult": [1, 2], "attn_resolutions": []}},
        data_shape=[1, 8, 8],
    ),
    "output-channels": lambda tmp: _module(
        backbone={"name": "mlp", "init_args": {"out_channels": 1}}, data_shape=[1], variance="learned_range"
    ),
    "hybrid-fixed-variance": lambda tmp: _module(loss="hybrid", variance="fixed_small"),
    "zero-snr-eps": lambda tmp: _module(rescale_to_zero_terminal_snr=True, parameterization="eps"),
    "labels-unconditional": lambda tmp: _module(data_shape=[2]).sample(2, labels=[0, 1]),
    "labels-missing": lambda tmp: _module(data_shape=[2], num_classes=3)._shared_step(torch.randn(4, 2), "train", 0),
    "labels-range": lambda tmp: _module(data_shape=[2], num_classes=3).sample(2, labels=[0, 5]),
    "guidance-negative": lambda tmp: _module(data_shape=[2], num_classes=3, guidance_scale=-1),
    "cli-unknown-option": lambda tmp: _run_cli_in(
        ROOT, ["fit", "--config", "configs/toy2d.yaml", "--trainer.max_step", "10"]
    ),
    "cli-config-file": lambda tmp: _run_cli_in(ROOT, ["fit", "--config", "configs/toy2d.yml"]),
    "cli-config-shipped": lambda tmp: _run_cli_in(tmp, ["fit", "--config", "toydd"]),
    "configs-copy-exists": lambda tmp: _configs_in(tmp, ["copy", "toy2d"], ["copy", "toy2d"]),
    "configs-copy-unknown": lambda tmp: _configs_in(tmp, ["copy", "toy3d"]),
    "callback-index": lambda tmp: _run_cli_in(
        ROOT, ["fit", "--config", "configs/toy2d.yaml", "--trainer.callbacks[5].init_args.decay", "0.5"]
    ),
    "callback-name": lambda tmp: _run_cli_in(
        ROOT, ["fit", "--config", "configs/toy2d.yaml", "--trainer.callbacks[FID].init_args.num_samples", "5"]
    ),
    "callback-argument": lambda tmp: _run_cli_in(
        ROOT, ["fit", "--config", "configs/toy2d.yaml", "--trainer.callbacks[0].init_args.decy", "0.5"]
    ),
    "trainer-check": lambda tmp: _run_cli_in(
        tmp,
        [
            "fit",
            "--config",
            str(ROOT / "configs/toy2d.yaml"),
            "--trainer.max_steps",
            "-5",
            f"--trainer.default_root_dir={tmp}",
        ],
    ),
    "image-range": lambda tmp: _module(data_shape=[1, 4, 4], backbone=TINY_UNET_ERRORS)._shared_step(
        torch.linspace(0, 255, 32).reshape(2, 1, 4, 4), "train", 0
    ),
    "x-t-shape": lambda tmp: _module(data_shape=[1, 16, 16], backbone=TINY_UNET_ERRORS).sample(
        4, x_T=torch.randn(4, 1, 8, 8)
    ),
    "num-steps": lambda tmp: _module(num_timesteps=1000, sampler={"name": "ddim", "init_args": {"num_steps": 2000}}),
    "eta-negative": lambda tmp: DDIMSampler(eta=-0.5),
    "solver-order": lambda tmp: _module(sampler={"name": "unipc", "init_args": {"order": 4}}),
    "spacing-karras-integer": lambda tmp: _module(sampler={"name": "ddpm", "init_args": {"spacing": "karras"}}),
    "spacing-linspace-euler": lambda tmp: _module(sampler={"name": "euler", "init_args": {"spacing": "linspace"}}),
    "karras-zero-snr": lambda tmp: _module(
        parameterization="v",
        rescale_to_zero_terminal_snr=True,
        sampler={"name": "heun", "init_args": {"spacing": "karras"}},
    ),
    "sigma-max-spacing": lambda tmp: _module(sampler={"name": "heun", "init_args": {"sigma_max": 80}}),
    "mu-fractional": lambda tmp: _module(data_shape=[2], parameterization="mu").sample(
        2, sampler={"name": "euler", "init_args": {"num_steps": 3, "spacing": "karras"}}
    ),
    "edit-strength": lambda tmp: _module().edit(torch.zeros(2, 2), 1.5),
    "edit-shape": lambda tmp: _module().edit(torch.zeros(2, 3), 0.5),
    "edit-range": lambda tmp: _module(backbone=UNET, data_shape=[1, 8, 8]).edit(torch.full((1, 1, 8, 8), 255.0), 0.5),
    "inpaint-mask-shape": lambda tmp: _module(backbone=UNET, data_shape=[1, 8, 8]).inpaint(
        torch.zeros(2, 1, 8, 8), torch.ones(3, 8)
    ),
    "inpaint-mask-values": lambda tmp: _module(backbone=UNET, data_shape=[1, 8, 8]).inpaint(
        torch.zeros(2, 1, 8, 8), torch.tensor([0.0, 255.0]).repeat(8, 4)
    ),
    "repaint-jump": lambda tmp: _module(sampler={"name": "repaint", "init_args": {"num_steps": 5}}),
    "repaint-jump-count": lambda tmp: _module(sampler={"name": "repaint", "init_args": {"jump_n_sample": 0}}),
    "edit-requests-kind": lambda tmp: EditRequestsDataModule("digits"),
    "unknown-mask": lambda tmp: EditRequestsDataModule("digits", mask="middle"),
    "missing-masks": lambda tmp: _edit_requests_with_a_missing_mask(tmp),
    "missing-folder": lambda tmp: ImageDataModule("imagefolder", root=str(tmp / "no/such/folder")),
    "empty-folder": lambda tmp: (tmp / "empty").mkdir() or ImageFolderDataset(tmp / "empty"),
    "corrupt-image": lambda tmp: (
        _images(tmp / "c").joinpath("1.png").write_bytes(b"\x89PNG\r\n\x1a\nxx"),
        ImageFolderDataset(tmp / "c"),
    ),
    "mixed-sizes": lambda tmp: ImageFolderDataset(_images(tmp / "m", sizes=((8, 8), (9, 8)))),
    "truncated-checkpoint": _truncated,
    "incompatible-checkpoint": lambda tmp: _fit(tmp, _module(num_timesteps=50), 2, ckpt_path=_checkpoint(tmp)),
    "run-folder-taken": _fit_into_a_taken_folder,
    "bad-optimizer": lambda tmp: _module(optimizer={"lr": 0.001}),
    "linear-range": lambda tmp: make_schedule("linear", beta_start=0.02, beta_end=0.0001),
    "data-smaller-than-batch": lambda tmp: Toy2DDataModule(num_train=100, batch_size=256),
    "images-smaller-than-batch": lambda tmp: ImageDataModule(
        "imagefolder", root=str(_images(tmp / "few", sizes=((8, 8),) * 4))
    ).train_dataloader(),
    "checkpoint-settings-differ": lambda tmp: _cli(
        tmp, "--model.num_timesteps=50", "--ckpt_path", str(_checkpoint(tmp))
    ),
    "predict-untrained": lambda tmp: _cli(tmp),
    "corrupt-checkpoint": _corrupt,
    "imports-missing": lambda tmp: _cli(tmp, "--imports", "[no_such_module]"),
    "elbo-learned-variance": lambda tmp: _module(loss_weighting="elbo", variance="learned_range"),
    "backbone-name-taken": lambda tmp: register_backbone("mlp")(UNet),
    "diffusers-block-type": _cross_attention_folder,
    "diffusers-missing-weight": lambda tmp: _diffusers_weights(lambda sd: sd.pop("conv_in.bias")),
    "diffusers-shape-mismatch": lambda tmp: _diffusers_weights(
        lambda sd: sd.update({"conv_in.weight": torch.zeros(8, 3, 3, 3)})
    ),
    "diffusers-not-a-folder": lambda tmp: (tmp / "f").mkdir() or DiffusionModule.from_diffusers(tmp / "f"),
    "diffusers-scheduler-field": lambda tmp: DiffusionModule.from_diffusers(
        _diffusers_unet(), scheduler={"variance_type": "learned"}
    ),
    "diffusers-not-installed": _without_diffusers,
    "init-from-differs": _init_from_differs,
    "to-diffusers-unet-option": lambda tmp: unet_config_to_diffusers({"final_res_block": True}),
    "to-diffusers-backbone": lambda tmp: _module().to_diffusers(tmp / "out"),
    "fid-final-without-validation": lambda tmp: _final_fid_without_validation(tmp),
    "fsdp-tensor-parallel": lambda tmp: _sharded_module(data_parallel=1, tensor_parallel=2).configure_model(),
    "ema-distributed-checkpoint": lambda tmp: _ema_under_model_parallel(True, None),
    "ema-device-sharded": lambda tmp: _ema_under_model_parallel(False, "cpu"),
    "ema-fsdp1": lambda tmp: _ema_under_fsdp1(),
    "ema-sharded-without-backbone": lambda tmp: _ema_sharded_without_backbone(),
    "posthoc-sigma-rel": lambda tmp: PostHocEMA(sigma_rels=(0.05, 0.3)),
    "posthoc-profiles": lambda tmp: PostHocEMA(sigma_rels=(0.05,)),
    "posthoc-every": lambda tmp: PostHocEMA(snapshot_every_n_steps=0),
    "posthoc-dtype": lambda tmp: PostHocEMA(snapshot_dtype="int8"),
    "reconstruct-missing": lambda tmp: reconstruct(tmp / "no/such/folder", sigma_rel=0.07),
    "reconstruct-empty": lambda tmp: (tmp / "empty").mkdir() or reconstruct(tmp / "empty", sigma_rel=0.07),
    "reconstruct-step": lambda tmp: reconstruct(_snapshots(tmp, {"r1": [10, 20]}), sigma_rel=0.07, step=5),
    "reconstruct-one-profile": lambda tmp: reconstruct(_snapshots(tmp, {"r1": [10]}, (0.05,)), sigma_rel=0.07),
    "reconstruct-runs": lambda tmp: reconstruct(_snapshots(tmp, {"r1": [10], "r2": [10]}), sigma_rel=0.07),
    "reconstruct-models": lambda tmp: reconstruct(_snapshots(tmp, {"r1": [10]}, widths=(4, 5)), sigma_rel=0.07),
    "ema-command-model": lambda tmp: write_posthoc_checkpoint(
        _checkpoint(tmp), tmp / "out.ckpt", 0.07, snapshot_dir=_snapshots(tmp, {"r1": [1]})
    ),
    "ema-command-folder": lambda tmp: write_posthoc_checkpoint(_checkpoint(tmp), tmp / "out.ckpt", 0.07),
}


def test_the_table_and_the_cases_agree():
    assert set(ROWS) == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_documented_error(case, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError, RuntimeError, ImportError)) as info:
        CASES[case](tmp_path)
    assert ROWS[case] in str(info.value), f"{case}: got {info.value}"
    assert "\n" not in str(info.value).split(" (")[0]  # one line up to any quoted cause


def test_values_that_are_legal_but_almost_surely_a_mistake_warn():
    """[0, 1] images (the model expects [-1, 1]) and a guidance scale without labels (it changes nothing)."""
    module = _module(data_shape=[1, 4, 4], backbone=TINY_UNET_ERRORS)
    with pytest.warns(
        UserWarning, match=r"the image batch lies in \[0, 1\], as \[0, 1\] images do; the model expects \[-1, 1\]"
    ):
        module._shared_step(
            torch.rand(2, 1, 4, 4)
            .clamp(0, 1)
            .index_fill(0, torch.tensor([0]), 1.0)
            .index_fill(0, torch.tensor([1]), 0.0),
            "train",
            0,
        )
    with pytest.warns(UserWarning, match=r"the image batch lies in \[-3, 3\], outside \[-1, 1\]"):
        module._shared_step(torch.linspace(-3, 3, 32).reshape(2, 1, 4, 4), "train", 0)  # standardised images
    with pytest.warns(UserWarning, match=r"guidance_scale=3.0 has no effect without labels"):
        module.sample(2, guidance_scale=3.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module._shared_step(torch.rand(2, 1, 4, 4) * 2 - 1, "train", 0)  # [-1, 1]: nothing to say
        module._shared_step(torch.rand(2, 1, 4, 4) * 255, "train", 1)  # checked on an epoch's first batch only
        module.sample(2, guidance_scale=1.0)
    assert not [w for w in caught if "image batch" in str(w.message) or "guidance_scale" in str(w.message)]
