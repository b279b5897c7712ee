"""The user's noise and room-response recordings as mel-domain sources, made once per run.

``--noise-dir`` and ``--rir-dir`` name folders of audio (MUSAN, RIRS_NOISES or any). Each file is
decoded, resampled to the shards' rate and turned into log-mels with the shards' feature settings
(no VAD: noise is not speech; log-mels clamped at ``log_floor`` whatever the ``compression``: the
augmenter takes its sources' power from their log for log-mel and mel-power shards alike); noise is
kept as one float16 log-mel array (at most ``MAX_NOISE_FRAMES`` in all, shared evenly among the
files, so that a big folder's first sub-folders do not take it all), each room response as its
per-band decay and gain (:func:`dvector.augment.reverb.fit_decay`). The result is cached as ``.npy`` files in the
run folder, keyed by the file list and the settings, and loaded memory-mapped by each worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dvector.augment.reverb import direct_spread, fit_decay
from dvector.config import FeatureConfig
from dvector.errors import DvectorError
from dvector.files import atomic_write, display_path
from dvector.signal.audio import DecodeError, decode, resample, to_mono
from dvector.signal.features import log_mel, min_samples

__all__ = ["SourcePaths", "prepare_sources", "load_noise", "load_rooms", "AUDIO_SUFFIXES"]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".sph")
MAX_FILE_FRAMES = 60 * 100  # a minute of noise per file at a 10 ms hop
MAX_NOISE_FRAMES = 500_000  # ~83 minutes in all (80 MB at 40 bands, float16)
MIN_FILE_FRAMES = 500  # each file gives at least 5 s (while the total lasts), however many there are
SILENT_PEAK = 1e-6  # a room response whose samples all stay under this (-120 dBFS) is silence, not a room
# the version of the rooms' fit, part of the cache key (2: the direct sound spread over its frames; 3: silent
# responses skipped)
ROOM_FIT = 3


@dataclass(frozen=True)
class SourcePaths:
    """Where a run's prepared sources are ("" where there are none); picklable, for the workers."""

    noise: str = ""  # (frames, n_mels) float16 log-mels
    rooms: str = ""  # (rooms, 2, n_mels) float32: decay and gain per band


def _audio_files(folder: str) -> list[Path]:
    top = Path(folder)
    if not top.is_dir():
        raise DvectorError(f"{display_path(top)}: not a folder of audio")
    files = sorted(p for p in top.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise DvectorError(f"{display_path(top)}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return files


def _log_mel_or_none(path: Path, features: FeatureConfig, max_frames: int, room: bool = False) -> np.ndarray | None:
    """Log-mels of one file (at most ``max_frames``; ``features`` with log compression), or None (with
    one warning line) when unreadable; with ``room``, also when silent (no room's response: its
    flat floor would read as an endless tail)."""
    try:
        wav, rate = decode(path)
    except (DecodeError, OSError) as e:
        warnings.warn(f"{display_path(path)}: skipped: {e}", RuntimeWarning, stacklevel=3)
        return None
    keep = int(max_frames * features.hop_length * rate / features.sample_rate) + 1  # cut before resampling
    wav = resample(to_mono(wav[:keep]), rate, features.sample_rate)[: max_frames * features.hop_length]
    if wav.shape[0] < min_samples(features) or not np.isfinite(wav).all():
        warnings.warn(f"{display_path(path)}: skipped: too short or not finite", RuntimeWarning, stacklevel=3)
        return None
    if room and not np.max(np.abs(wav)) > SILENT_PEAK:
        warnings.warn(f"{display_path(path)}: skipped: silent (every sample under {SILENT_PEAK:g}), not a room "
                      "response", RuntimeWarning, stacklevel=3)
        return None
    return log_mel(wav, features)


def _key(kind: str, files: list[Path], features: FeatureConfig) -> str:
    stat = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    text = json.dumps([kind, stat, features.to_dict(), MAX_FILE_FRAMES, MAX_NOISE_FRAMES, MIN_FILE_FRAMES, ROOM_FIT])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def prepare_sources(noise_dir: str, rir_dir: str, features: FeatureConfig, cache_dir: Path) -> SourcePaths:
    """Turn the folders into cached mel-domain sources (once; a cache whose key matches is reused).
    Power features (``compression="none"``) get the log-mels of their settings, the sources' one domain:
    keyed by those settings, so they share a log run's cache and never meet a cache of power values."""
    features = replace(features, compression="log")
    noise = rooms = ""
    if noise_dir:
        files = _audio_files(noise_dir)
        path = cache_dir / f"noise-{_key('noise', files, features)}.npy"
        if not path.exists():
            mels, total = [], 0
            share = min(MAX_FILE_FRAMES, max(MIN_FILE_FRAMES, MAX_NOISE_FRAMES // len(files)))  # every file counts
            for f in files:
                if total >= MAX_NOISE_FRAMES:
                    break
                mel = _log_mel_or_none(f, features, min(share, MAX_NOISE_FRAMES - total))
                if mel is not None:
                    mels.append(mel.astype(np.float16))
                    total += mel.shape[0]
            if not mels:
                raise DvectorError(f"{display_path(Path(noise_dir))}: no readable noise recording")
            cache_dir.mkdir(parents=True, exist_ok=True)
            _save(path, np.concatenate(mels))
        noise = os.fspath(path)
    if rir_dir:
        files = _audio_files(rir_dir)
        path = cache_dir / f"rooms-{_key('rooms', files, features)}.npy"
        if not path.exists():
            fits = []
            for f in files:
                mel = _log_mel_or_none(f, features, 400, room=True)  # 4 s of response is plenty
                if mel is not None:
                    spread = direct_spread(features.win_length, features.hop_length)
                    fits.append(np.stack(fit_decay(np.exp(mel.astype(np.float64)), spread=spread)))
            if not fits:
                raise DvectorError(f"{display_path(Path(rir_dir))}: no readable room response")
            cache_dir.mkdir(parents=True, exist_ok=True)
            _save(path, np.asarray(fits, np.float32))
        rooms = os.fspath(path)
    return SourcePaths(noise, rooms)


def load_noise(paths: SourcePaths) -> np.ndarray | None:
    """The prepared noise log-mels, memory-mapped (None where there are none)."""
    return np.load(paths.noise, mmap_mode="r") if paths.noise else None


def load_rooms(paths: SourcePaths) -> np.ndarray | None:
    """The prepared rooms' (decay, gain) per band (None where there are none)."""
    return np.load(paths.rooms) if paths.rooms else None
