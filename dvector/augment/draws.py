"""Counter-based random numbers: each row's draws are a pure function of (seed, pass, key, offset).

A numpy Generator per row costs ~20 us (12 ms for a 640-row batch); a hash of a counter costs a
few numpy operations for the whole batch. ``splitmix64`` is the finaliser of Java's SplittableRandom
(Steele et al. 2014): consecutive counters give independent-looking 64-bit values.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

__all__ = ["row_seeds", "uniforms", "splitmix64"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 ``x`` (elementwise, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def row_seeds(seed: int, passes: Sequence[int], keys: Sequence[str], offsets: Sequence[int]) -> np.ndarray:
    """One uint64 per row from (seed, pass, sample key, crop offset)."""
    key_hash = np.fromiter((zlib.crc32(k.encode("utf-8", "surrogateescape")) for k in keys), np.uint64, len(keys))
    with np.errstate(over="ignore"):
        x = splitmix64(np.full(len(keys), seed & 0xFFFFFFFFFFFFFFFF, np.uint64))
        x = splitmix64(x ^ np.asarray(passes, np.uint64))
        x = splitmix64(x ^ key_hash)
        return splitmix64(x ^ np.asarray(offsets, np.int64).astype(np.uint64))


def uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """(rows, count) float64 in [0, 1): draw ``j`` of row ``r`` depends only on ``seeds[r]`` and ``j``."""
    with np.errstate(over="ignore"):
        counters = seeds[:, None] + (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)[None, :]
    return (splitmix64(counters) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
