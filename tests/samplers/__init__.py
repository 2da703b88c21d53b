"""Tests of lightning_ddpm/samplers/."""
