"""Tests of lightning_ddpm/training/ (DiffusionModule and its step components)."""
