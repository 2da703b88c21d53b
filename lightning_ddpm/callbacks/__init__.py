"""Diffusion-specific callbacks: EMA, sample pictures, FID/IS/KID, bits/dim, prediction writing."""

from .ema import EMA, ema_weights
from .fid import FIDCallback
from .likelihood import BitsPerDimCallback
from .predictions import SampleWriter
from .samples import SampleLogger

__all__ = ["EMA", "ema_weights", "FIDCallback", "BitsPerDimCallback", "SampleWriter", "SampleLogger"]
