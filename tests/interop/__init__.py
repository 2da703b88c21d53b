"""Tests of lightning_ddpm/interop/."""
