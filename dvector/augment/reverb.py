"""Reverberation in the mel-power domain: a per-band exponentially decaying tail added along time.

An approximation of a room (the mel-power of reverberant speech is close to the clean mel-power
convolved along time with the room response's mel-power envelope, and a room's envelope decays
exponentially): per band ``b``, ``tail[t] = a_b tail[t-1] + g_b P[t-1]`` and ``P'[t] = P[t] + tail[t]``,
a one-pole filter (:func:`dvector.augment.kernels.mix_rows`). Measured room responses (``--rir-dir``) are reduced to
the same two numbers per band (:func:`fit_decay`).
"""

from __future__ import annotations

import numpy as np
__all__ = ["fit_decay"]


def fit_decay(envelope: np.ndarray, max_decay: float = 0.995) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (decay, gain) of a room response's mel-power envelope ``(frames, bands)``.

    The direct sound is the frame of most energy; the tail's first frame gives ``gain`` (relative to
    the direct frame) and the ratio of the tail's energy after its first frame to all of it gives
    ``decay`` (for a geometric tail ``g, g a, g a^2...`` that ratio is ``a``).
    """
    env = np.asarray(envelope, np.float64)
    direct = int(np.argmax(env.sum(1)))
    tail = env[direct + 1:]
    if tail.shape[0] < 2:
        zeros = np.zeros(env.shape[1])
        return zeros, zeros
    floor = 1e-12
    gain = tail[0] / np.maximum(env[direct], floor)
    decay = tail[1:].sum(0) / np.maximum(tail.sum(0), floor)
    return np.clip(decay, 0.0, max_decay), np.clip(gain, 0.0, 10.0)
