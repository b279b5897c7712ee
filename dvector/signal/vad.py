"""Energy-based voice activity detection in numba kernels; no I/O.

Per frame of ``frame_ms`` the energy in dBFS is compared with an adaptive noise floor: the floor
starts at a low percentile of the file's frame energies, drops at once to any quieter frame and
rises at most ``floor_rise_db_per_s`` (so it follows slowly changing background noise but not
speech). A frame is speech when it is ``threshold_db`` above the floor (less in noisy
recordings: see ``speech_threshold_db``) and louder than ``min_level_db``. Speech bursts shorter than ``min_speech_ms`` are discarded, the rest are
extended by ``preroll_ms`` before and ``hangover_ms`` after; leading and trailing silence is cut
and internal pauses longer than ``max_pause_ms`` are shortened to that length.

Each kernel has a plain numpy twin in the tests.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dvector.config import VadConfig

FLOOR_PERCENTILE = 10.0
LOUD_PERCENTILE = 95.0


def undecided(floor_db: float, loud_db: float, cfg: VadConfig) -> bool:
    """True for an audible recording whose energy hardly varies (95th minus 10th percentile of the
    frame energies below ``2 * min_threshold_db``): speech in steady loud noise, or noise alone. An
    energy VAD cannot find pauses there, so the recording is kept whole rather than dropped."""
    return loud_db - floor_db < 2 * cfg.min_threshold_db and loud_db > cfg.min_level_db


def speech_threshold_db(floor_db: float, loud_db: float, cfg: VadConfig) -> float:
    """How far above the noise floor speech must be: ``threshold_db``, lowered on noisy recordings.

    In a recording whose frame energies span less than twice ``threshold_db`` (95th minus 10th
    percentile), a fixed threshold would call everything silence; there the threshold is half
    that span, but at least ``min_threshold_db``.
    """
    return min(cfg.threshold_db, max(cfg.min_threshold_db, 0.5 * (loud_db - floor_db)))
_EPS = 1e-10


@njit(cache=True)
def frame_energy_db(wav, frame_len, remove_dc=False):
    """Mean-square energy in dB of consecutive frames; the last, partial frame counts too. With
    ``remove_dc`` each frame's own mean is subtracted first (its variance): a DC offset, which some
    recorders add (audiomnist's is about -21 dBFS, louder than its speech), is not energy."""
    n = wav.shape[0]
    n_frames = (n + frame_len - 1) // frame_len
    out = np.empty(n_frames, dtype=np.float32)
    for f in range(n_frames):
        start = f * frame_len
        stop = min(start + frame_len, n)
        mean = 0.0
        if remove_dc:
            for i in range(start, stop):
                mean += wav[i]
            mean /= stop - start
        acc = 0.0
        for i in range(start, stop):
            acc += (wav[i] - mean) * (wav[i] - mean)
        out[f] = 10.0 * np.log10(acc / (stop - start) + _EPS)
    return out


@njit(cache=True)
def track_noise_floor(energy_db, initial_db, rise_per_frame_db):
    """Floor that follows any drop at once and rises at most ``rise_per_frame_db`` per frame."""
    out = np.empty_like(energy_db)
    floor = initial_db
    for f in range(energy_db.shape[0]):
        floor = min(energy_db[f], floor + rise_per_frame_db)
        out[f] = floor
    return out


@njit(cache=True)
def remove_short_runs(mask, min_len):
    """Clear runs of True shorter than ``min_len`` frames."""
    out = mask.copy()
    n = mask.shape[0]
    f = 0
    while f < n:
        if mask[f]:
            start = f
            while f < n and mask[f]:
                f += 1
            if f - start < min_len:
                out[start:f] = False
        else:
            f += 1
    return out


@njit(cache=True)
def dilate(mask, before, after):
    """Extend every run of True by ``before`` frames earlier and ``after`` frames later."""
    n = mask.shape[0]
    out = np.zeros(n, dtype=np.bool_)
    for f in range(n):
        if mask[f]:
            lo = max(0, f - before)
            hi = min(n, f + after + 1)
            out[lo:hi] = True
    return out


@njit(cache=True)
def keep_mask(speech, max_pause):
    """Frames to keep: speech, and at most ``max_pause`` frames of each pause between speech."""
    n = speech.shape[0]
    out = np.zeros(n, dtype=np.bool_)
    first = -1
    last = -1
    for f in range(n):
        if speech[f]:
            if first < 0:
                first = f
            last = f
    if first < 0:
        return out
    f = first
    while f <= last:
        if speech[f]:
            out[f] = True
            f += 1
        else:
            start = f
            while not speech[f]:
                f += 1
            out[start:min(f, start + max_pause)] = True
    return out


@njit(cache=True)
def gather_frames(wav, keep, frame_len):
    """The samples of the kept frames, concatenated."""
    n = wav.shape[0]
    total = 0
    for f in range(keep.shape[0]):
        if keep[f]:
            total += min(frame_len, n - f * frame_len)
    out = np.empty(total, dtype=wav.dtype)
    pos = 0
    for f in range(keep.shape[0]):
        if keep[f]:
            start = f * frame_len
            stop = min(start + frame_len, n)
            out[pos:pos + stop - start] = wav[start:stop]
            pos += stop - start
    return out


def _frames(ms: float, frame_ms: float) -> int:
    return int(round(ms / frame_ms))


def speech_frames(wav: np.ndarray, sample_rate: int, cfg: VadConfig) -> tuple[np.ndarray, int]:
    """The per-frame keep mask of ``wav`` and the frame length in samples."""
    if wav.ndim != 1:
        raise ValueError(f"VAD takes mono audio (samples,), got shape {wav.shape}")
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    frame_len = frame_length(sample_rate, cfg)
    if wav.shape[0] == 0:
        return np.zeros(0, dtype=np.bool_), frame_len
    return keep_from_energy(frame_energy_db(wav, frame_len, cfg.remove_dc), cfg), frame_len


def frame_length(sample_rate: int, cfg: VadConfig) -> int:
    """Samples per VAD frame."""
    return max(1, int(round(sample_rate * cfg.frame_ms / 1000)))


def keep_from_energy(energy: np.ndarray, cfg: VadConfig) -> np.ndarray:
    """The per-frame keep mask of a recording whose frame energies (dB, ``frame_energy_db``) are ``energy``:
    the whole-file decisions of the VAD, on an array of one value per frame."""
    initial = float(np.percentile(energy, FLOOR_PERCENTILE))
    loud = float(np.percentile(energy, LOUD_PERCENTILE))
    if undecided(initial, loud, cfg):
        return np.ones(energy.shape[0], dtype=np.bool_)
    threshold = speech_threshold_db(initial, loud, cfg)
    rise = cfg.floor_rise_db_per_s * cfg.frame_ms / 1000.0
    floor = track_noise_floor(energy, np.float32(initial), np.float32(rise))
    speech = (energy > floor + threshold) & (energy > cfg.min_level_db)
    speech = remove_short_runs(speech, max(1, _frames(cfg.min_speech_ms, cfg.frame_ms)))
    speech = dilate(speech, _frames(cfg.preroll_ms, cfg.frame_ms), _frames(cfg.hangover_ms, cfg.frame_ms))
    return keep_mask(speech, _frames(cfg.max_pause_ms, cfg.frame_ms))


def warm_up() -> None:
    """Load (or compile) every kernel now, with the argument types the build uses.

    Build workers call this first, so that loading the kernels (about half a second per process)
    is not counted as VAD time of the first file, and a parent that warms up before forking its
    workers hands them the loaded kernels.
    """
    trim_silence(np.zeros(1024, dtype=np.float32), 16000, VadConfig())


def trim_silence(wav: np.ndarray, sample_rate: int, cfg: VadConfig) -> tuple[np.ndarray, float]:
    """``wav`` with silence trimmed and long pauses shortened, and the fraction of samples kept.

    With ``cfg.enabled`` false the audio is returned whole.
    """
    if not cfg.enabled or wav.shape[0] == 0:
        return wav, 1.0
    keep, frame_len = speech_frames(wav, sample_rate, cfg)
    out = gather_frames(np.ascontiguousarray(wav, dtype=np.float32), keep, frame_len)
    return out, out.shape[0] / wav.shape[0]
