"""Log-mel features and the level normalisation before them: the one definition used by build-shards,
embedding and (as torch twins) export.

Defaults follow the original project (torchaudio's MelSpectrogram): centred frames with reflect
padding, periodic Hann window, power spectrum, HTK mel filters without normalisation, natural log
clamped at ``log_floor``. ``FeatureConfig``'s front-end options give librosa's ``melspectrogram``
instead (``FeatureConfig.preset("resemblyzer")``): zero padding, Slaney mel scale and area
normalisation, no log; and ``raise_level``, Resemblyzer's ``normalize_volume(wav, dBFS,
increase_only=True)``. No I/O here.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.fft

from dvector.config import FeatureConfig


SLANEY_HZ_PER_MEL = 200.0 / 3  # the Slaney scale (librosa's default, htk=False): linear below 1 kHz...
SLANEY_LOG_HZ = 1000.0
SLANEY_LOG_STEP = np.log(6.4) / 27.0  # ...and logarithmic above, 27 mels per factor 6.4


def hz_to_mel(hz: np.ndarray | float, scale: str = "htk") -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    log_part = SLANEY_LOG_HZ / SLANEY_HZ_PER_MEL + np.log(np.maximum(hz, 1e-10) / SLANEY_LOG_HZ) / SLANEY_LOG_STEP
    return np.where(hz >= SLANEY_LOG_HZ, log_part, hz / SLANEY_HZ_PER_MEL)


def mel_to_hz(mel: np.ndarray | float, scale: str = "htk") -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    log_mel_start = SLANEY_LOG_HZ / SLANEY_HZ_PER_MEL
    log_part = SLANEY_LOG_HZ * np.exp(SLANEY_LOG_STEP * (mel - log_mel_start))
    return np.where(mel >= log_mel_start, log_part, mel * SLANEY_HZ_PER_MEL)


@lru_cache(maxsize=16)
def mel_filterbank(cfg: FeatureConfig) -> np.ndarray:
    """Triangular mel filters, ``(n_fft // 2 + 1, n_mels)`` float32: on ``cfg.mel_scale`` (HTK or Slaney),
    unnormalised or (``mel_norm="slaney"``) each times 2 / its width in Hz, as ``librosa.filters.mel``."""
    n_freqs = cfg.fft_size // 2 + 1
    all_freqs = np.linspace(0.0, cfg.sample_rate / 2, n_freqs)
    mel_points = np.linspace(hz_to_mel(cfg.f_min, cfg.mel_scale), hz_to_mel(cfg.fmax_hz, cfg.mel_scale), cfg.n_mels + 2)
    hz_points = mel_to_hz(mel_points, cfg.mel_scale)
    widths = np.diff(hz_points)  # (n_mels + 1,)
    slopes = hz_points[None, :] - all_freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(down, up))  # (n_freqs, n_mels)
    if cfg.mel_norm == "slaney":
        bank *= 2.0 / (hz_points[2:] - hz_points[:-2])  # unit area per filter
    bank = bank.astype(np.float32)
    bank.setflags(write=False)
    return bank


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


def raise_level(wav: np.ndarray, target_dbfs: float) -> np.ndarray:
    """``wav`` scaled up so that its RMS level over the whole array is ``target_dbfs`` (dBFS, full scale
    1.0) when it is lower, else as it is; also as it is for silence and ``target_dbfs == 0`` (off).
    Resemblyzer's ``normalize_volume(wav, target_dbfs, increase_only=True)``; float32 stays float32."""
    if target_dbfs == 0 or wav.size == 0:
        return wav
    gain = level_gain(float(np.mean(np.square(wav, dtype=np.float64))), target_dbfs)
    return wav * wav.dtype.type(gain) if gain > 1.0 else wav


def level_gain(mean_square: float, target_dbfs: float) -> float:
    """The gain ``raise_level`` applies to audio of this mean square: up to ``target_dbfs``, never
    down; 1 when off (0), for silence, or for a non-finite level."""
    if target_dbfs == 0 or not mean_square > 0 or not np.isfinite(mean_square):
        return 1.0
    return max(1.0, 10.0 ** (target_dbfs / 20.0) / float(np.sqrt(mean_square)))


MEL_CHUNK_FRAMES = 8192  # frames transformed at once: bounds the frame, spectrum and power temporaries


def log_mel(wav: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """``(frames, n_mels)`` float32 log-mel energies of mono float audio at ``cfg.sample_rate`` (the mel
    power itself with ``compression="none"``). The level is as given: ``raise_level`` comes before VAD.
    Frames are transformed ``MEL_CHUNK_FRAMES`` at a time, so the temporaries stay a few tens of MB
    however long the audio (an utterance shorter than that is one chunk)."""
    if wav.ndim != 1:
        raise ValueError(f"log_mel takes mono audio (samples,), got shape {wav.shape}")
    if wav.shape[0] < min_samples(cfg):
        raise ValueError(f"audio of {wav.shape[0]} samples is shorter than one frame ({min_samples(cfg)} samples)")
    padded = np.pad(np.asarray(wav, dtype=np.float32), cfg.fft_size // 2, mode=cfg.pad_mode)
    count = n_frames(wav.shape[0], cfg)
    out = np.empty((count, cfg.n_mels), dtype=np.float32)
    for first in range(0, count, MEL_CHUNK_FRAMES):
        stop = min(count, first + MEL_CHUNK_FRAMES)
        mel_of_frames(padded, first, stop - first, cfg, out[first:stop])
    return out


def mel_of_frames(padded: np.ndarray, first: int, count: int, cfg: FeatureConfig, out: np.ndarray) -> np.ndarray:
    """Frames ``first .. first + count`` of centred, padded float32 audio (frame ``i`` is
    ``padded[i * hop : i * hop + n_fft]``) as log-mel energies (or mel power), written into ``out``
    ``(count, n_mels)`` (cast to its dtype) and returned."""
    n_fft, hop = cfg.fft_size, cfg.hop_length
    base = padded[first * hop: first * hop + (count - 1) * hop + n_fft]
    assert base.shape[0] == (count - 1) * hop + n_fft, "frames run past the padded audio"
    frames = np.lib.stride_tricks.as_strided(
        base, shape=(count, n_fft), strides=(base.strides[0] * hop, base.strides[0]), writeable=False
    )  # (count, n_fft), a view
    spectrum = scipy.fft.rfft(frames * analysis_window(cfg), axis=1)  # (count, n_fft//2+1) complex64
    power = np.square(spectrum.real)  # |X|^2, (count, n_fft//2+1) float32
    power += np.square(spectrum.imag)
    mel = power @ mel_filterbank(cfg)  # (count, n_mels)
    if cfg.compression != "none":
        np.maximum(mel, cfg.log_floor, out=mel)
        np.log(mel, out=mel)
    out[...] = mel
    return out
