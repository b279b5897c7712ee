"""Log-mel features: the one definition used by build-shards, embedding and (as a torch twin) export.

Defaults follow the original project (torchaudio's MelSpectrogram): centred frames with reflect
padding, periodic Hann window, power spectrum, HTK mel filters without normalisation, natural log
clamped at ``log_floor``. No I/O here.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.fft

from dvector.config import FeatureConfig


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=16)
def mel_filterbank(cfg: FeatureConfig) -> np.ndarray:
    """Triangular HTK-mel filters, ``(n_fft // 2 + 1, n_mels)`` float32, unnormalised."""
    n_freqs = cfg.fft_size // 2 + 1
    all_freqs = np.linspace(0.0, cfg.sample_rate / 2, n_freqs)
    mel_points = np.linspace(hz_to_mel(cfg.f_min), hz_to_mel(cfg.fmax_hz), cfg.n_mels + 2)
    hz_points = mel_to_hz(mel_points)
    widths = np.diff(hz_points)  # (n_mels + 1,)
    slopes = hz_points[None, :] - all_freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(down, up))
    bank.setflags(write=False)
    return bank.astype(np.float32)


@lru_cache(maxsize=16)
def analysis_window(cfg: FeatureConfig) -> np.ndarray:
    """Periodic Hann window of the window length, zero-padded centrally to ``n_fft``."""
    win = cfg.win_length
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(win) / win)).astype(np.float32)
    left = (cfg.fft_size - win) // 2
    window = np.pad(window, (left, cfg.fft_size - win - left))
    window.setflags(write=False)
    return window


def n_frames(n_samples: int, cfg: FeatureConfig) -> int:
    """How many frames ``log_mel`` gives for ``n_samples`` samples (centred framing)."""
    return 1 + n_samples // cfg.hop_length


def min_samples(cfg: FeatureConfig) -> int:
    """The shortest input ``log_mel`` accepts: one window (reflect padding needs half an FFT)."""
    return max(cfg.win_length, cfg.fft_size // 2 + 1)


def log_mel(wav: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """``(frames, n_mels)`` float32 log-mel energies of mono float audio at ``cfg.sample_rate``."""
    if wav.ndim != 1:
        raise ValueError(f"log_mel takes mono audio (samples,), got shape {wav.shape}")
    if wav.shape[0] < min_samples(cfg):
        raise ValueError(f"audio of {wav.shape[0]} samples is shorter than one frame ({min_samples(cfg)} samples)")
    n_fft, hop = cfg.fft_size, cfg.hop_length
    padded = np.pad(np.asarray(wav, dtype=np.float32), n_fft // 2, mode="reflect")
    count = n_frames(wav.shape[0], cfg)
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(count, n_fft), strides=(padded.strides[0] * hop, padded.strides[0]), writeable=False
    )  # (frames, n_fft), a view
    spectrum = scipy.fft.rfft(frames * analysis_window(cfg), axis=1)  # (frames, n_fft//2+1) complex64
    power = np.square(spectrum.real)  # |X|^2, (frames, n_fft//2+1) float32
    power += np.square(spectrum.imag)
    mel = power @ mel_filterbank(cfg)  # (frames, n_mels)
    np.maximum(mel, cfg.log_floor, out=mel)
    return np.log(mel, out=mel)
