"""The Lightning side: DiffusionModule and the pieces of its training step (non-finite guard,
checkpoint checks, epoch metrics, pictures)."""
