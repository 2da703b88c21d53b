"""Tests of what the README, docs/ and benchmarks/ promise."""
