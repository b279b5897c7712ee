"""Mel-domain shapes of noise, reverberation and channels, computed from the feature settings; no I/O.

- Coloured noise: a power spectral density ``f**-alpha`` (white 0, pink 1, brown 2) integrated by
  each mel filter gives the band's mean power; a band's power fluctuates from frame to frame like a
  sum of ``K`` exponential periodogram bins (a gamma of shape ``K``, the filter's effective number
  of bins). That is Gaussian noise's log-mel in distribution, not sample by sample.
- Reverberation: a room's energy decays exponentially, 60 dB in RT60 seconds; in frames of ``hop``
  seconds that is a factor ``exp(-ln(1e6) hop / RT60)`` per frame. The tail after the direct sound
  carries ``1 / DRR`` of its energy (direct-to-reverberant ratio).
- Channel: a smooth random gain curve across the mel bands (a few cosines), in log power.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from dvector.config import FeatureConfig
from dvector.signal.features import mel_filterbank

__all__ = ["COLOUR_EXPONENTS", "colour_power", "band_bins", "fluctuation_bank", "decay_per_frame",
           "tail_gain", "channel_curves", "db_to_log_power"]

COLOUR_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}
LN_1E6 = math.log(1e6)


def db_to_log_power(db: np.ndarray | float) -> np.ndarray | float:
    """Decibels (of power) as a difference of natural-log power, the unit of the log-mels."""
    return np.asarray(db) * (math.log(10.0) / 10.0)


@lru_cache(maxsize=8)
def colour_power(features: FeatureConfig) -> np.ndarray:
    """(colours, n_mels) float32: each colour's mean power per mel band, in COLOUR_EXPONENTS' order,
    each row scaled to a mean of 1 over the bands (the SNR scaling sets the level)."""
    bank = mel_filterbank(features).astype(np.float64)  # (bins, n_mels)
    freqs = np.linspace(0.0, features.sample_rate / 2, bank.shape[0])
    freqs[0] = freqs[1]  # the DC bin: as its neighbour (no infinite density)
    rows = []
    for alpha in COLOUR_EXPONENTS.values():
        band = (freqs ** -alpha) @ bank
        rows.append(band / band.mean())
    out = np.asarray(rows, np.float32)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=8)
def band_bins(features: FeatureConfig) -> np.ndarray:
    """(n_mels,) the effective number of periodogram bins each mel filter sums, ``(sum w)^2 / sum w^2``."""
    bank = mel_filterbank(features).astype(np.float64)
    return np.maximum(bank.sum(0) ** 2 / np.maximum((bank ** 2).sum(0), 1e-12), 1.0)


def fluctuation_bank(features: FeatureConfig, seed: int, count: int = 16, frames: int = 512) -> np.ndarray:
    """(count, frames, n_mels) float32 of mean 1: frame-to-frame power fluctuations of noise per band,
    drawn once from ``seed`` (rows crop it at drawn offsets)."""
    rng = np.random.default_rng([seed, 0xF1C7])
    k = band_bins(features)
    return (rng.gamma(k, 1.0 / k, size=(count, frames, k.shape[0]))).astype(np.float32)


def decay_per_frame(rt60: np.ndarray, hop_seconds: float) -> np.ndarray:
    """The per-frame power decay factor of a response whose energy falls 60 dB in ``rt60`` seconds."""
    return np.exp(-LN_1E6 * hop_seconds / np.maximum(rt60, 1e-3))


def tail_gain(decay: np.ndarray, drr_db: np.ndarray) -> np.ndarray:
    """The first tail frame's share ``g`` of a geometric tail ``g, g a, g a^2, ...`` holding ``10^(-DRR/10)``
    of the direct energy: ``g = (1 - a) 10^(-DRR/10)``."""
    return (1.0 - decay) * 10.0 ** (-np.asarray(drr_db) / 10.0)


def channel_curves(u: np.ndarray, peak_db: np.ndarray, n_mels: int) -> np.ndarray:
    """(rows, n_mels) smooth gain curves in natural-log power, each peaking at +-``peak_db`` dB.

    ``u``: (rows, 2 * C) uniforms: the amplitude and phase of cosines of 1..C half-periods across
    the bands (weighted 1/c, so the curve is smooth); the sum is scaled to its row's peak.
    """
    x = np.linspace(0.0, math.pi, n_mels)[None, :]
    curve = np.zeros((u.shape[0], n_mels))
    for c in range(u.shape[1] // 2):
        amp, phase = u[:, 2 * c] * 2.0 - 1.0, u[:, 2 * c + 1] * 2.0 * math.pi
        curve += amp[:, None] * np.cos((c + 1) * x + phase[:, None]) / (c + 1)
    peak = np.abs(curve).max(1, keepdims=True)
    return db_to_log_power(curve / np.maximum(peak, 1e-12) * np.asarray(peak_db)[:, None])
