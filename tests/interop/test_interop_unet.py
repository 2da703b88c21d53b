"""Our UNet <-> diffusers' UNet2DModel: configs, weights both ways, and the errors.

diffusers is the oracle: a randomly initialised UNet2DModel (nothing can be downloaded here),
configured as the published DDPM checkpoints are, must give our converted U-Net's outputs.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from lightning_ddpm.backbones.unet import UNet
from lightning_ddpm.interop.diffusers_unet import (
    DIFFUSERS_DEFAULTS,
    unet_config_to_diffusers,
    unet_init_args_from_diffusers,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)

diffusers = pytest.importorskip("diffusers")

# google/ddpm-cifar10-32's config.json (the fields it sets; the rest are UNet2DModel's defaults).
CIFAR10 = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
}
# google/ddpm-{church,bedroom,cat,celebahq}-256 (and ddpm-ema-*): six levels, attention at 16x16. Built at
# 32x32 (attention then sits at 2x2) to keep the test fast; the weights do not depend on sample_size.
LSUN256 = {
    **CIFAR10,
    "sample_size": 32,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}
# diffusers' own defaults (as its training examples leave them) plus every option we map: flipped and
# unshifted embedding, symmetric downsampling padding, head width 8, scale-shift, classes, non-square.
OPTIONS = {
    "sample_size": [16, 8],
    "in_channels": 1,
    "out_channels": 2,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
    "norm_num_groups": 8,
    "resnet_time_scale_shift": "scale_shift",
    "attn_norm_num_groups": 8,
    "num_class_embeds": 4,
    "dropout": 0.1,
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Both libraries zero-initialise some layers, which would hide a wrong mapping of those."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _inputs(config: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, config["in_channels"], h, w, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    labels = torch.randint(0, config["num_class_embeds"], (2,), generator=g) if config.get("num_class_embeds") else None
    return x, t, labels


@torch.no_grad()
def _assert_same_outputs(theirs, ours: UNet, config: dict, dtype: torch.dtype = torch.float32) -> None:
    x, t, labels = _inputs(config)
    expected, got = theirs(x.to(dtype), t, class_labels=labels).sample, ours(x.to(dtype), t, labels)
    # relative to the output's scale, the layers sum in different orders; measured: 6e-6 in float32
    # (35 M parameters, 60 layers deep), 1e-14 in float64
    tolerance = 5e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance * float(expected.abs().max()))


@pytest.mark.parametrize("config", [CIFAR10, LSUN256, OPTIONS], ids=["cifar10", "lsun256", "options"])
def test_diffusers_to_ours_and_back(config):
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**config).eval()
    _perturb(theirs, 1)
    args = unet_init_args_from_diffusers(theirs.config)
    assert args["dropout"] == config.get("dropout", 0.0)  # published configs have none: diffusers' default 0.0
    ours = UNet(**args).eval()
    ours.load_state_dict(unet_state_dict_from_diffusers(theirs.state_dict(), theirs.config))
    if config is LSUN256:  # the README's figure for the 256x256 configuration (built at 32 px)
        assert sum(p.numel() for p in ours.parameters()) == 113_673_219
    _assert_same_outputs(theirs, ours, config)
    # and back: the very same tensors, and the config diffusers was built from
    back = unet_state_dict_to_diffusers(ours.state_dict(), args)
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())
    exported = unet_config_to_diffusers(args)
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.config.items() if k in exported} == exported
    # in float64 the two networks agree to rounding: the same function, not merely a close one
    _assert_same_outputs(theirs.double(), ours.double(), config, torch.float64)


@pytest.mark.parametrize("config", [CIFAR10, LSUN256, OPTIONS], ids=["cifar10", "lsun256", "options"])
def test_ours_to_diffusers_and_back(config):
    torch.manual_seed(0)
    args = unet_init_args_from_diffusers(config)
    ours = UNet(**args).eval()
    _perturb(ours, 2)
    theirs = diffusers.UNet2DModel(**unet_config_to_diffusers(args)).eval()
    theirs.load_state_dict(unet_state_dict_to_diffusers(ours.state_dict(), args))  # strict
    _assert_same_outputs(theirs, ours, config)
    again = unet_state_dict_from_diffusers(unet_state_dict_to_diffusers(ours.state_dict(), args), theirs.config)
    assert again.keys() == ours.state_dict().keys()
    assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())
    assert unet_init_args_from_diffusers(unet_config_to_diffusers(args)) == args


def test_cifar10_parameter_counts_match_the_paper():
    theirs = diffusers.UNet2DModel(**CIFAR10)
    ours = UNet(**unet_init_args_from_diffusers(CIFAR10))
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters()) == 35_746_307
    # our defaults are the same network up to conventions (eps, padding, dropout): same names and shapes
    ref = {k: v.shape for k, v in UNet().state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref


def test_defaults_are_the_installed_unet2dmodels():
    params = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    assert DIFFUSERS_DEFAULTS == {k: p.default for k, p in params.items() if k != "self"}


def test_old_attention_names_and_exported_tensors():
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**OPTIONS)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in theirs.state_dict().items():
        for new, name in old.items():
            key = key.replace(f".{new}.", f".{name}.") if ".attentions." in key else key
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    a = unet_state_dict_from_diffusers(legacy, OPTIONS)
    b = unet_state_dict_from_diffusers(theirs.state_dict(), OPTIONS)
    assert all(torch.equal(a[k], b[k]) for k in b)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    # a channels-last model (our fast path) exports tensors safetensors accepts: contiguous, no shared storage
    args = unet_init_args_from_diffusers(OPTIONS)
    ours = UNet(**args).to(memory_format=torch.channels_last)
    safetensors_torch.save(unet_state_dict_to_diffusers(ours.state_dict(), args))


TINY = {**OPTIONS, "num_class_embeds": None, "resnet_time_scale_shift": "default", "attn_norm_num_groups": None}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]},
            r"^unet config down_block_types\[0\]: 'CrossAttnDownBlock2D' is not supported; "
            r"supported: DownBlock2D, AttnDownBlock2D$",
        ),
        (
            {"up_block_types": ["UpBlock2D", "AttnSkipUpBlock2D"]},
            r"up_block_types\[1\]: 'AttnSkipUpBlock2D' is not supported; supported: UpBlock2D, AttnUpBlock2D",
        ),
        (
            {"up_block_types": ["UpBlock2D", "UpBlock2D"]},
            r"up_block_types\[1\]: 'UpBlock2D' does not mirror down_block_types\[0\] 'AttnDownBlock2D'",
        ),
        ({"down_block_types": ["DownBlock2D"]}, "down_block_types has 1 entries; block_out_channels has 2"),
        ({"act_fn": "gelu"}, "act_fn: 'gelu' is not supported; supported: 'silu', 'swish'"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type: 'fourier' is not supported"),
        ({"class_embed_type": "timestep"}, "class_embed_type: 'timestep' is not supported"),
        ({"resnet_time_scale_shift": "ada_group"}, "resnet_time_scale_shift: 'ada_group' is not supported"),
        ({"upsample_type": "resnet"}, "upsample_type: 'resnet' is not supported"),
        ({"downsample_type": "resnet"}, "downsample_type: 'resnet' is not supported"),
        ({"downsample_padding": 2}, "downsample_padding: 2 is not supported; supported: 0, 1"),
        ({"center_input_sample": True}, "center_input_sample: True is not supported"),
        ({"mid_block_scale_factor": 2}, "mid_block_scale_factor: 2 is not supported"),
        ({"mid_block_type": None}, "mid_block_type: None is not supported"),
        ({"add_attention": False}, "add_attention: False is not supported"),
        ({"attention_head_dim": 24}, r"attention_head_dim: 24 is not supported; .*\[32, 64\]"),
        ({"block_out_channels": [32, 48]}, "block_out_channels: .32, 48. is not supported; supported: multiples"),
        ({"time_embedding_dim": 64}, "time_embedding_dim: 64 is not supported; supported: None or 128"),
        ({"resnet_time_scale_shift": "scale_shift"}, "attn_norm_num_groups: None is not supported"),
        ({"sample_size": None}, "sample_size: None is not supported"),
    ],
)
def test_unrepresentable_configs_name_the_field(change, message):
    with pytest.raises(ValueError, match=message) as err:
        unet_init_args_from_diffusers({**TINY, **change})
    assert "\n" not in str(err.value)


def test_unknown_config_fields_are_ignored_with_a_warning_like_diffusers():
    with pytest.warns(UserWarning, match=r"\['resnet_flavour'\] are not UNet2DModel arguments"):
        args = unet_init_args_from_diffusers({**TINY, "resnet_flavour": 1, "_class_name": "UNet2DModel"})
    assert args == unet_init_args_from_diffusers(TINY)


def _with(state: dict, key: str, value=None) -> dict:
    state = dict(state)
    if value is None:
        del state[key]
    else:
        state[key] = value
    return state


def test_bad_weights_name_the_key():
    torch.manual_seed(0)
    sd = diffusers.UNet2DModel(**TINY).state_dict()
    args = unet_init_args_from_diffusers(TINY)
    ours = UNet(**args).state_dict()
    cases = [
        (
            lambda: unet_state_dict_from_diffusers(_with(sd, "conv_in.bias"), TINY),
            r"^diffusers unet state dict is missing 'conv_in.bias'$",
        ),
        (
            lambda: unet_state_dict_from_diffusers(_with(sd, "mid_block.attentions.0.to_k.weight"), TINY),
            "missing 'mid_block.attentions.0.to_k.weight'",
        ),
        (
            lambda: unet_state_dict_from_diffusers(_with(sd, "extra.weight", torch.zeros(1)), TINY),
            r"^diffusers unet state dict has an unexpected key 'extra.weight'$",
        ),
        (
            lambda: unet_state_dict_from_diffusers(_with(sd, "conv_in.weight", torch.zeros(32, 3, 3, 3)), TINY),
            r"^diffusers unet weight 'conv_in.weight' has shape \(32, 3, 3, 3\); the config needs \(32, 1, 3, 3\)$",
        ),
        (
            lambda: unet_state_dict_from_diffusers(sd, {**TINY, "layers_per_block": 2}),
            r"missing 'down_blocks\.0\.\S+' \(and 63 more\)",
        ),
        (lambda: unet_state_dict_from_diffusers(sd, {**TINY, "act_fn": "mish"}), "act_fn: 'mish' is not supported"),
        (
            lambda: unet_state_dict_to_diffusers(_with(ours, "down.0.1.qkv.bias"), args),
            r"^unet state dict is missing 'down.0.1.qkv.bias'$",
        ),
        (
            lambda: unet_state_dict_to_diffusers(_with(ours, "down.0.1.qkv.bias", torch.zeros(3)), args),
            r"^unet weight 'down.0.1.qkv.bias' has shape \(3,\); the config needs \(96,\)$",
        ),
        (
            lambda: unet_state_dict_to_diffusers(_with(ours, "ema.weight", torch.zeros(3)), args),
            "unexpected key 'ema.weight'",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "init_args, message",
    [
        ({"ch_mult": (2, 2)}, r"ch_mult\[0\]=2 has no UNet2DModel equivalent; supported: 1"),
        ({"num_heads": 2}, r"num_heads=2, num_head_channels=None give attention widths \[32, 64\] different head"),
        ({"num_head_channels": 24}, "num_head_channels=24"),
        ({"bogus": 1}, r"unet init_args \['bogus'\] are not UNet arguments"),
    ],
)
def test_our_options_without_a_diffusers_equivalent(init_args, message):
    args = {"ch": 32, "ch_mult": (1, 2), "image_size": 8, "attn_resolutions": (8,), "norm_groups": 8, **init_args}
    with pytest.raises(ValueError, match=message):
        unet_config_to_diffusers(args)


def test_equal_widths_with_several_heads_export_as_a_head_width():
    args = {"ch": 32, "ch_mult": (1, 1), "image_size": 8, "attn_resolutions": (4,), "num_heads": 4, "norm_groups": 8}
    assert unet_config_to_diffusers(args)["attention_head_dim"] == 8
