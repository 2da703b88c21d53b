"""Tests of lightning_ddpm/cli/."""
