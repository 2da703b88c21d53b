"""Interoperability with other diffusion libraries (diffusers)."""
