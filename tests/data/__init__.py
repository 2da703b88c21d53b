"""Tests of lightning_ddpm/data/."""
