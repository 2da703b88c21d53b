"""Diffusion-specific callbacks: EMA, post-hoc EMA, sample pictures, FID/IS/KID, bits/dim, prediction writing."""

from .ema import EMA, ema_weights
from .fid import FIDCallback
from .likelihood import BitsPerDimCallback
from .posthoc_ema import PostHocEMA
from .predictions import SampleWriter
from .samples import SampleLogger

__all__ = ["EMA", "ema_weights", "FIDCallback", "PostHocEMA", "BitsPerDimCallback", "SampleWriter", "SampleLogger"]
