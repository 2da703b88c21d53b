"""Tests of lightning_ddpm/backbones/."""
