"""Diffusion-specific callbacks."""

from .predictions import SampleWriter
from .samples import SampleLogger

__all__ = ["SampleWriter", "SampleLogger"]
