"""Tests of lightning_ddpm/callbacks/."""
