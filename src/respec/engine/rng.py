"""Counter-based random numbers: a uniform is a pure function of (key, counter, stream).

Each sample owns a key derived from its request's seed and its index among the request's ``n``;
the counter is the position of the token being drawn. Draws therefore do not depend on which other
rows share the batch, on the batch order, or on any global RNG, and a whole batch is drawn in a few
vectorised numpy operations on the host (the host knows every row's key and position already).
"""

from __future__ import annotations

import os

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser: a bijective, well-mixing map on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def sample_key(seed: int, sample_index: int) -> int:
    """The key of sample ``sample_index`` of a request seeded with ``seed``."""
    mixed = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return int(splitmix64(mixed ^ np.uint64(sample_index))[0])


def random_seed() -> int:
    """A fresh seed for unseeded requests, never touching torch's, numpy's or Python's global RNG."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def uniforms(keys: np.ndarray, counters: np.ndarray, stream: int = 0) -> np.ndarray:
    """One float64 in the open interval (0, 1) per (key, counter): ``keys`` uint64, ``counters`` int."""
    with np.errstate(over="ignore"):
        # Positions stay far below 2**40, so (stream, counter) pairs never collide.
        counter = counters.astype(np.uint64) + (np.uint64(stream) << np.uint64(40))
        mixed = splitmix64(keys ^ splitmix64(counter))
    # Top 52 bits, shifted half a step: (m + 0.5) / 2**52 is exact in float64, so 0 and 1 are never
    # drawn (with 53 bits, (2**53 - 1) + 0.5 rounds up to 2**53 and yields exactly 1.0).
    return ((mixed >> np.uint64(12)).astype(np.float64) + 0.5) * (1.0 / (1 << 52))
