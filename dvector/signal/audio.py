"""Decode, downmix and resample audio: soundfile (libsndfile) for most formats, PyAV (FFmpeg) for m4a
and the like; soxr for resampling. Finding the files is :mod:`dvector.corpus`'s."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


# What soundfile (libsndfile) cannot read but PyAV (FFmpeg) can: VoxCeleb2 ships m4a.
FFMPEG_ONLY_EXTENSIONS = frozenset({"m4a", "aac", "mp4", "wma", "opus", "webm"})


class DecodeError(Exception):
    """One file could not be turned into audio; the message is the reason."""


def _decode_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    try:
        import av  # type: ignore[import-not-found]
    except ImportError as exc:
        raise DecodeError(
            f"{path.suffix} needs FFmpeg decoders: pip install 'dvector[m4a]' (PyAV), "
            "or convert first, e.g. ffmpeg -i in.m4a -ar 16000 out.flac"
        ) from exc
    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise DecodeError("no audio stream")
            resampler = av.AudioResampler(format="fltp")
            chunks = []
            rate = stream.rate
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())  # (channels, samples)
        if not chunks:
            raise DecodeError("no audio samples")
        data = np.concatenate(chunks, axis=1).T
        return np.ascontiguousarray(data, dtype=np.float32), int(rate)
    except DecodeError:
        raise
    except Exception as exc:  # FFmpeg raises many types
        raise DecodeError(f"cannot decode: {exc}") from exc


def decode(path: Path) -> tuple[np.ndarray, int]:
    """Read a file as float32 ``(samples, channels)`` and its sample rate; DecodeError if it cannot."""
    ext = path.suffix.lower().lstrip(".")
    if ext in FFMPEG_ONLY_EXTENSIONS:
        return _decode_ffmpeg(path)
    try:
        if os.stat(path).st_size == 0:
            raise DecodeError("empty file (0 bytes)")
        # bytes, so that names that are not valid UTF-8 open too (soundfile encodes str paths strictly)
        data, rate = sf.read(os.fsencode(path), dtype="float32", always_2d=True)
    except DecodeError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as exc:
        # the reason goes into index.json: name the file, not where the corpus happens to be mounted
        name = os.fsencode(path.name).decode("utf-8", "backslashreplace")  # printable, even if not UTF-8
        reason = str(exc).replace(repr(os.fsencode(path)), f"'{name}'")
        raise DecodeError(f"cannot decode: {reason}") from exc
    return data, int(rate)


def to_mono(data: np.ndarray) -> np.ndarray:
    """Average the channels of ``(samples, channels)`` audio into float32 ``(samples,)``."""
    if data.ndim == 1:
        return data.astype(np.float32, copy=False)
    if data.shape[1] == 1:
        return np.ascontiguousarray(data[:, 0])
    return data.mean(axis=1, dtype=np.float32)


def resample(wav: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Resample with soxr (high quality); a no-op at the target rate."""
    if rate == target_rate:
        return wav
    return soxr.resample(wav, rate, target_rate, quality="HQ").astype(np.float32, copy=False)

