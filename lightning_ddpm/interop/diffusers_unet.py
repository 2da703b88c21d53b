"""Configs and weights between diffusers' ``UNet2DModel`` and our DDPM ``UNet``, both ways.

``UNet2DModel`` built from ``DownBlock2D`` / ``AttnDownBlock2D`` (and the mirrored up blocks), as in
the published DDPM checkpoints (``google/ddpm-cifar10-32``, ``-celebahq-256``, ``-church-256``,
``-bedroom-256``, ``-cat-256`` and their ``ddpm-ema-*`` versions), is the same network as our U-Net:
the same layers in the same order, only named differently, and attention's q/k/v held in three
matrices where ours are fused into one. Every config field is checked: one our U-Net cannot
represent exactly raises ``ValueError`` naming it, never a partial conversion. diffusers itself is
not imported here; the mapping needs only torch.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..backbones.unet import UNet

__all__ = [
    "unet_config_to_diffusers",
    "unet_init_args_from_diffusers",
    "unet_state_dict_from_diffusers",
    "unet_state_dict_to_diffusers",
]

# UNet2DModel.__init__ defaults (diffusers 0.42; a test checks them against the installed version):
# a field a config leaves out means this value.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# Fields with a fixed meaning in our U-Net: the values it can represent.
_SUPPORTED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "downsample_padding": (0, 1),
    "act_fn": ("silu", "swish"),
    "add_attention": (True,),
    "class_embed_type": (None,),
    "resnet_time_scale_shift": ("default", "scale_shift"),
}
# Block type -> whether it carries attention.
_DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}

# Our module prefixes that are the same in every configuration -> diffusers' names.
_FIXED_PREFIXES = {
    "embed.mlp.0": "time_embedding.linear_1",
    "embed.mlp.2": "time_embedding.linear_2",
    "embed.class_embedding": "class_embedding",
    "conv_in": "conv_in",
    "mid.0": "mid_block.resnets.0",
    "mid.1": "mid_block.attentions.0",
    "mid.2": "mid_block.resnets.1",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# Our layer class -> its name inside a diffusers block ({} is the block index within the level).
_LAYER_NAMES = {
    "ResBlock": "resnets.{}",
    "AttentionBlock": "attentions.{}",
    "Downsample": "downsamplers.0",
    "Upsample": "upsamplers.0",
}
# Our submodule names inside a ResBlock / AttentionBlock -> diffusers'; the rest are equal.
_LEAF_NAMES = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut", "norm": "group_norm", "proj": "to_out.0"}
_QKV = ("to_q", "to_k", "to_v")  # our fused qkv rows are [q; k; v], heads contiguous in each
# Attention names of weights saved by early diffusers versions (early Hub uploads such as the DDPM ones
# may still hold them); diffusers renames them on load, and so do we.
_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _unsupported(field: str, value: Any, supported: Any) -> ValueError:
    return ValueError(f"unet config {field}: {value!r} is not supported; supported: {supported}")


def _diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Fill in UNet2DModel's defaults; like diffusers, ignore (with a warning) fields it does not know."""
    unknown = sorted(k for k in config if k not in DIFFUSERS_DEFAULTS and not k.startswith("_"))
    if unknown:
        warnings.warn(f"unet config fields {unknown} are not UNet2DModel arguments and are ignored", stacklevel=3)
    return {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in DIFFUSERS_DEFAULTS}}


def _divides(value: Any, widths: list[int]) -> bool:
    return isinstance(value, int) and value > 0 and all(w % value == 0 for w in widths)


def _block_attention(cfg: Mapping[str, Any]) -> list[bool]:
    """Check the block types; -> per level (highest resolution first) whether it has attention."""
    levels = len(cfg["block_out_channels"])
    for key, table in (("down_block_types", _DOWN_BLOCKS), ("up_block_types", _UP_BLOCKS)):
        if len(cfg[key]) != levels:
            raise ValueError(f"unet config {key} has {len(cfg[key])} entries; block_out_channels has {levels}")
        for i, kind in enumerate(cfg[key]):
            if kind not in table:
                raise _unsupported(f"{key}[{i}]", kind, ", ".join(table))
    attention = [_DOWN_BLOCKS[kind] for kind in cfg["down_block_types"]]
    # Our U-Net puts attention at the same resolutions on the way down and up; up block i is level n-1-i.
    for i, kind in enumerate(cfg["up_block_types"]):
        if _UP_BLOCKS[kind] != attention[levels - 1 - i]:
            raise ValueError(
                f"unet config up_block_types[{i}]: {kind!r} does not mirror down_block_types[{levels - 1 - i}] "
                f"{cfg['down_block_types'][levels - 1 - i]!r}; supported: attention at the same levels down and up"
            )
    return attention


def unet_init_args_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our ``UNet`` keyword arguments for a ``UNet2DModel`` config (its ``config.json`` as a dict).

    Raises:
        ValueError: a field our U-Net cannot represent exactly, naming the field, its value and
            what is supported.
    """
    cfg = _diffusers_config(config)
    for field, supported in _SUPPORTED.items():
        if cfg[field] not in supported:
            raise _unsupported(field, cfg[field], ", ".join(map(repr, supported)))
    attention = _block_attention(cfg)
    channels = [int(c) for c in cfg["block_out_channels"]]
    ch, groups, head_dim = channels[0], cfg["norm_num_groups"], cfg["attention_head_dim"]
    # The mid block's attention has a GroupNorm only when asked for or with the default time embedding.
    mid_groups = cfg["attn_norm_num_groups"] or (groups if cfg["resnet_time_scale_shift"] == "default" else None)
    widths = [c for c, a in zip(channels, attention) if a] + [channels[-1]]  # attention layers, mid included
    size = cfg["sample_size"]
    checks: list[tuple[str, bool, str]] = [  # (field, representable, what is supported)
        ("block_out_channels", all(c % ch == 0 for c in channels), f"multiples of the first entry {ch}"),
        ("time_embedding_dim", cfg["time_embedding_dim"] in (None, 4 * ch), f"None or {4 * ch} (4 * first width)"),
        ("norm_num_groups", isinstance(groups, int), "an integer"),
        ("attn_norm_num_groups", mid_groups == groups, f"{groups} (norm_num_groups), or None without scale_shift"),
        (
            "attention_head_dim",
            head_dim is None or _divides(head_dim, widths),
            f"None or a divisor of the attention widths {widths}",
        ),
        ("sample_size", size is not None, "an image size (int or [height, width])"),
    ]
    for field, representable, what in checks:
        if not representable:
            raise _unsupported(field, cfg[field], what)
    height = size if isinstance(size, int) else int(size[0])
    num_class_embeds = cfg["num_class_embeds"]
    return {
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "image_size": size if isinstance(size, int) else tuple(size),
        "ch": ch,
        "ch_mult": tuple(c // ch for c in channels),
        "num_res_blocks": cfg["layers_per_block"],
        "attn_resolutions": tuple(height // 2**i for i, a in enumerate(attention) if a),
        "dropout": float(cfg["dropout"]),
        # attention_head_dim None means one head of the full width, ours num_heads=1.
        "num_heads": 1,
        "num_head_channels": head_dim,
        "scale_shift_norm": cfg["resnet_time_scale_shift"] == "scale_shift",
        # diffusers' table has no null label: its last label becomes our null label (same weights, same outputs).
        "num_classes": None if num_class_embeds is None else num_class_embeds - 1,
        "norm_groups": groups,
        "norm_eps": float(cfg["norm_eps"]),
        "downsample_padding": "bottom_right" if cfg["downsample_padding"] == 0 else "symmetric",
        "time_embed_cos_first": bool(cfg["flip_sin_to_cos"]),
        "time_embed_freq_shift": float(cfg["freq_shift"]),
    }


def _unet_args(init_args: Mapping[str, Any]) -> dict[str, Any]:
    """Our UNet's arguments with its defaults filled in; unknown names are an error."""
    params = inspect.signature(UNet.__init__).parameters
    unknown = sorted(set(init_args) - set(params))
    if unknown:
        raise ValueError(f"unet init_args {unknown} are not UNet arguments")
    return {**{k: p.default for k, p in params.items() if k != "self"}, **init_args}


def unet_config_to_diffusers(init_args: Mapping[str, Any]) -> dict[str, Any]:
    """The ``UNet2DModel`` config (``UNet2DModel(**config)``) equivalent to our ``UNet(**init_args)``.

    Raises:
        ValueError: an option diffusers' ``UNet2DModel`` cannot represent, naming it.
    """
    args = _unet_args(init_args)
    ch, ch_mult, image_size = args["ch"], tuple(args["ch_mult"]), args["image_size"]
    if ch_mult[0] != 1:
        # UNet2DModel's conv_in already has the first level's width.
        raise ValueError(f"unet init_args ch_mult[0]={ch_mult[0]} has no UNet2DModel equivalent; supported: 1")
    for field, default in (("conv_in_kernel", 3), ("final_res_block", False)):
        if args[field] != default:
            value = args[field]
            raise ValueError(f"unet init_args {field}={value!r} has no UNet2DModel equivalent; supported: {default}")
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    attention = [height // 2**i in args["attn_resolutions"] for i in range(len(ch_mult))]
    widths = [ch * m for m, a in zip(ch_mult, attention) if a] + [ch * ch_mult[-1]]
    heads, head_channels = args["num_heads"], args["num_head_channels"]
    # UNet2DModel has one head width for every attention layer (None: one head of the full width).
    if head_channels:
        head_dim = head_channels
    elif heads == 1:
        head_dim = None
    elif len(set(widths)) == 1 and widths[0] % heads == 0:
        head_dim = widths[0] // heads
    else:
        head_dim = 0
    if head_dim is not None and (head_dim <= 0 or any(w % head_dim for w in widths)):
        raise ValueError(
            f"unet init_args num_heads={heads}, num_head_channels={head_channels} give attention widths {widths} "
            "different head widths, which UNet2DModel cannot represent; use num_head_channels dividing all of them"
        )
    num_classes = args["num_classes"]
    return {
        "sample_size": height if height == width else [height, width],
        "in_channels": args["in_channels"],
        "out_channels": args["out_channels"] or args["in_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": bool(args["time_embed_cos_first"]),
        "freq_shift": _plain_number(args["time_embed_freq_shift"]),
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": [ch * m for m in ch_mult],
        "layers_per_block": args["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 0 if args["downsample_padding"] == "bottom_right" else 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": args["dropout"],
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": args["norm_groups"],
        # Named explicitly with scale_shift, where the mid attention would otherwise lose its GroupNorm.
        "attn_norm_num_groups": args["norm_groups"] if args["scale_shift_norm"] else None,
        "norm_eps": args["norm_eps"],
        "resnet_time_scale_shift": "scale_shift" if args["scale_shift_norm"] else "default",
        "add_attention": True,
        "class_embed_type": None,
        # Our class table's last row is the null label; in diffusers it is label num_classes.
        "num_class_embeds": None if num_classes is None else num_classes + 1,
    }


def _plain_number(value: float) -> float | int:
    """1.0 -> 1: diffusers' configs hold integers where they can."""
    return int(value) if float(value).is_integer() else value


def _key_map(init_args: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], torch.Size]]:
    """Our state-dict key -> (the diffusers key(s) holding it, our shape); three keys for a fused qkv."""
    args = _unet_args(init_args)
    with torch.device("meta"):  # structure and shapes only, no memory
        net = UNet(**args)
    prefixes = dict(_FIXED_PREFIXES)
    per_level = args["num_res_blocks"] + 1  # down: blocks + downsampler; up: one more block
    for ours, blocks, theirs in (("down", net.down, "down_blocks"), ("up", net.up, "up_blocks")):
        for k, layers in enumerate(blocks):
            level, block = divmod(k, per_level)
            for i, layer in enumerate(layers):  # type: ignore[arg-type, var-annotated]  # an nn.ModuleList
                name = _LAYER_NAMES[type(layer).__name__].format(block)
                prefixes[f"{ours}.{k}.{i}"] = f"{theirs}.{level}.{name}"
    mapping = {}
    for key, value in net.state_dict().items():
        parts = key.split(".")
        cut = next(n for n in (3, 2, 1) if ".".join(parts[:n]) in prefixes)
        prefix, leaf = prefixes[".".join(parts[:cut])], parts[cut:]
        if leaf[0] == "qkv":
            mapping[key] = (tuple(f"{prefix}.{q}.{leaf[-1]}" for q in _QKV), value.shape)
        else:
            mapping[key] = ((".".join([prefix, _LEAF_NAMES.get(leaf[0], leaf[0]), *leaf[1:]]),), value.shape)
    return mapping


def _check_keys(side: str, given: Mapping[str, Tensor], expected: set[str]) -> None:
    missing, unexpected = sorted(expected - set(given)), sorted(set(given) - expected)
    for problem, keys in (("is missing", missing), ("has an unexpected key", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"{side} state dict {problem} {keys[0]!r}{more}")


def _check_shape(side: str, key: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{side} weight {key!r} has shape {tuple(tensor.shape)}; the config needs {tuple(shape)}")


def _rename_legacy(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Old attention names (query/key/value/proj_attn) -> today's, as diffusers does on load."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        match = _LEGACY_ATTENTION.match(key)
        new = f"{match[1]}.{_LEGACY_NAMES[match[2]]}.{match[3]}" if match else key
        if new in out:
            raise ValueError(f"diffusers unet state dict holds {new!r} twice (old and new attention names)")
        out[new] = value
    return out


def unet_state_dict_from_diffusers(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A ``UNet2DModel`` state dict -> our ``UNet.state_dict()`` for ``unet_init_args_from_diffusers(config)``.

    Accepts the attention names of old checkpoints (``query``/``key``/``value``/``proj_attn``) too.

    Raises:
        ValueError: an unsupported config field, a missing or unexpected key, or a shape mismatch,
            naming the key.
    """
    mapping = _key_map(unet_init_args_from_diffusers(config))
    given = _rename_legacy(state_dict)
    _check_keys("diffusers unet", given, {k for keys, _ in mapping.values() for k in keys})
    out = {}
    for ours, (keys, shape) in mapping.items():
        part_shape = (shape[0] // len(keys), *shape[1:])
        for key in keys:
            _check_shape("diffusers unet", key, given[key], part_shape)
        out[ours] = torch.cat([given[k] for k in keys]) if len(keys) > 1 else given[keys[0]]
    return out


def unet_state_dict_to_diffusers(state_dict: Mapping[str, Tensor], init_args: Mapping[str, Any]) -> dict[str, Tensor]:
    """Our ``UNet(**init_args).state_dict()`` -> the ``UNet2DModel`` state dict for ``unet_config_to_diffusers``.

    Every tensor is contiguous and split q/k/v are copies: safetensors refuses channels-last
    weights and views of one storage.

    Raises:
        ValueError: an option ``UNet2DModel`` cannot represent, or a missing or unexpected key or a
            shape mismatch, naming the key.
    """
    unet_config_to_diffusers(init_args)  # refuse what diffusers cannot represent
    mapping = _key_map(init_args)
    _check_keys("unet", state_dict, set(mapping))
    out = {}
    for ours, (keys, shape) in mapping.items():
        _check_shape("unet", ours, state_dict[ours], shape)
        tensor = state_dict[ours]
        if len(keys) == 1:
            out[keys[0]] = tensor.contiguous()
        else:
            out.update({k: p.clone(memory_format=torch.contiguous_format) for k, p in zip(keys, tensor.chunk(3))})
    return out
