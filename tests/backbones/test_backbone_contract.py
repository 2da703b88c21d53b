"""Every registered backbone, and the README's custom one, keeps the contract of
``lightning_ddpm.backbones.contract.Backbone``: integer and fractional timesteps, no label, class labels and
the null label, the output shape, and sampling with Karras sigmas (fractional t) end to end."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from lightning_ddpm import DiffusionModule
from lightning_ddpm.backbones import BACKBONES, build_backbone, registry
from lightning_ddpm.backbones.contract import Backbone

ROOT = Path(__file__).resolve().parents[2]
# small settings per built-in backbone; a backbone registered elsewhere is built with its defaults
SMALL = {
    "unet": {
        "ch": 16,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [4],
        "norm_groups": 4,
        "dropout": 0.0,
    },
    "mlp": {"hidden_dim": 16, "num_blocks": 1},
    "tiny_conv": {"width": 8},
}


# every backbone registered when the tests are collected (plugins included), and the README's
ALL = sorted({*BACKBONES, "tiny_conv"})


@pytest.fixture(scope="module")
def names():
    """The registered names, with examples/custom_backbone.py's ``tiny_conv`` added (then removed)."""
    saved = registry.BACKBONES
    registry.BACKBONES = saved.copy()
    runpy.run_path(str(ROOT / "examples" / "custom_backbone.py"), run_name="examples.custom_backbone")
    yield sorted(registry.BACKBONES)
    registry.BACKBONES = saved


def _data_shape(name: str) -> list[int]:
    return [2] if name == "mlp" else [3, 8, 8]


def test_the_contract_covers_the_built_in_and_the_readme_backbones(names):
    assert {"unet", "mlp", "tiny_conv"} <= set(names) and set(BACKBONES) <= set(names)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("conditional", [False, True])
def test_a_backbone_takes_integer_and_fractional_timesteps_and_the_null_label(names, name, conditional):
    data_shape = _data_shape(name)
    defaults = {"in_channels": data_shape[0], "num_classes": 3 if conditional else None}
    if len(data_shape) == 3:
        defaults["image_size"] = data_shape[1:]
    net = build_backbone({"name": name, "init_args": SMALL.get(name, {})}, defaults=defaults).eval()
    assert isinstance(net, Backbone)
    x = torch.randn(4, *data_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3]) if conditional else None  # 3: the null label
    with torch.no_grad():
        for t in (torch.tensor([0, 1, 500, 999]), torch.tensor([0.25, 1.5, 500.5, 998.75])):
            out = net(x, t, labels) if conditional or name != "tiny_conv" else net(x, t)
            assert out.shape == x.shape and out.isfinite().all(), (name, t.dtype)
        if conditional and hasattr(net, "num_classes"):
            assert torch.equal(
                net(x, torch.tensor([5, 5, 5, 5]), torch.full((4,), 3)), net(x, torch.tensor([5, 5, 5, 5]))
            )  # cond=None is the null label


@pytest.mark.parametrize("name", ALL)
def test_every_backbone_samples_with_karras_sigmas(names, name):
    """Karras sigmas evaluate the network at fractional t: the README's backbone with an nn.Embedding of t
    failed here before (IndexError on a float tensor)."""
    module = DiffusionModule(
        backbone={"name": name, "init_args": SMALL.get(name, {})},
        data_shape=_data_shape(name),
        num_timesteps=50,
        schedule="linear",
    )
    sampler = {"name": "dpmpp_2m", "init_args": {"num_steps": 4, "spacing": "karras"}}
    samples = module.sample(3, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, *_data_shape(name)) and samples.isfinite().all()
