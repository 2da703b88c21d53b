"""The torch-only core: schedules, parameterizations, variances, losses, the forward and reverse
process, the denoiser, guidance, likelihood and timestep sampling (no Lightning here)."""
