"""Seeds from keys: a draw keyed by (what, seed, step, ...) is the same in every process and after a resume."""

from __future__ import annotations

import hashlib

__all__ = ["seed_of"]


def seed_of(key: tuple) -> int:
    """A 63-bit seed from a tuple, the same in every process (unlike hash() of strings)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1
