"""Backbones: the registry and the built-in networks (importing registers ``unet`` and ``mlp``)."""

from .contract import Backbone
from .mlp import MLP
from .registry import (
    BACKBONES,
    ENTRY_POINT_GROUP,
    BackboneSpec,
    available_backbones,
    build_backbone,
    check_backbone,
    register_backbone,
    resolve_backbone,
)
from .unet import UNet

__all__ = [
    "BACKBONES",
    "Backbone",
    "ENTRY_POINT_GROUP",
    "BackboneSpec",
    "MLP",
    "UNet",
    "available_backbones",
    "build_backbone",
    "check_backbone",
    "register_backbone",
    "resolve_backbone",
]
