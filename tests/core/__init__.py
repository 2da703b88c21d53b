"""Tests of the torch-only core (lightning_ddpm/core/)."""
