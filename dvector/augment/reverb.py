"""Reverberation in the mel-power domain: a per-band exponentially decaying tail added along time.

An approximation of a room (the mel-power of reverberant speech is close to the clean mel-power
convolved along time with the room response's mel-power envelope, and a room's envelope decays
exponentially): per band ``b``, ``tail[t] = a_b tail[t-1] + g_b P[t-1]`` and ``P'[t] = P[t] + tail[t]``,
a one-pole filter (:func:`dvector.augment.kernels.mix_rows`). Measured room responses (``--rir-dir``) are reduced to
the same two numbers per band (:func:`fit_decay`).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["fit_decay", "direct_spread"]


def fit_decay(envelope: np.ndarray, max_decay: float = 0.995, spread: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (decay, gain) of a room response's mel-power envelope ``(frames, bands)``.

    The direct sound is the frame of most energy and the ``spread`` frames either side of it (frames
    whose analysis windows also hold the direct sound: an impulse half-way between two frame centres
    is split between them); its energy ``D`` is their sum. The tail is what follows: the ratio of its
    energy after its first frame to all of it gives ``decay`` (for a geometric tail that ratio is
    ``a``), and ``gain`` is the model's first tail frame relative to ``D``: a tail ``g D a^(k-1)`` at
    ``k`` frames after the direct one sums to ``g D a^spread / (1 - a)`` from ``k = spread + 1`` on.
    """
    env = np.asarray(envelope, np.float64)
    direct = int(np.argmax(env.sum(1)))
    tail = env[direct + spread + 1:]
    if tail.shape[0] < 2:
        zeros = np.zeros(env.shape[1])
        return zeros, zeros
    floor = 1e-12
    energy = env[max(direct - spread, 0):direct + spread + 1].sum(0)
    decay = np.clip(tail[1:].sum(0) / np.maximum(tail.sum(0), floor), 0.0, max_decay)
    reach = decay ** spread  # a tail that dies within the spread (RT60 of ~20 ms) is no reverberation
    gain = np.where(reach > 1e-3, (1.0 - decay) * tail.sum(0) / np.maximum(energy * reach, floor), 0.0)
    return decay, np.clip(gain, 0.0, 10.0)


def direct_spread(win_length: int, hop_length: int) -> int:
    """Frames either side of an impulse's strongest frame that its analysis windows also reach."""
    return max(math.ceil((win_length / 2 + hop_length / 2) / hop_length) - 1, 0)
