"""Tests of runs across the layers: resume, multi-process (DDP, FSDP2) and CUDA."""
