"""Decode, downmix and resample audio: soundfile (libsndfile) for most formats, PyAV (FFmpeg) for m4a
and the like; soxr for resampling. Finding the files is :mod:`dvector.corpus`'s."""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr


# What soundfile (libsndfile) cannot read but PyAV (FFmpeg) can: VoxCeleb2 ships m4a.
FFMPEG_ONLY_EXTENSIONS = frozenset({"m4a", "aac", "mp4", "wma", "opus", "webm"})


class DecodeError(Exception):
    """One file could not be turned into audio; the message is the reason."""


# Bounds checked before decoding (from the header), so that a small file with a lying header cannot
# take gigabytes: an 8 KB WAV claiming 1 Hz decodes to 4000 "seconds" that resampling multiplies.
MIN_RATE = 1000  # Hz; below this a header is damaged or the file is not audio to use
MAX_RATE = 768_000  # Hz; the highest rate audio interfaces record at
MAX_DURATION_S = 4 * 3600.0  # longer files are refused: split them first
MAX_DECODED_VALUES = 1 << 29  # frames x channels (2 GiB as float32) held at once by one decode


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def check_bounds(rate: int, frames: int, channels: int = 1) -> None:
    """DecodeError unless audio of ``frames`` frames of ``channels`` at ``rate`` Hz is within the
    bounds above; called with the header's numbers before anything is decoded or resampled."""
    check_duration(rate, frames)
    if frames * max(channels, 1) > MAX_DECODED_VALUES:
        raise DecodeError(f"too large: {frames} frames x {channels} channels, more than {MAX_DECODED_VALUES} "
                          "samples; split it or downmix it first")


def check_duration(rate: int, frames: int) -> None:
    """DecodeError unless ``rate`` is a sample rate and ``frames`` at it last at most MAX_DURATION_S: the
    bounds of a file read in blocks (:func:`decode_blocks`), which never holds it whole."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise DecodeError(f"sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz (a damaged header?)")
    if frames > MAX_DURATION_S * rate:
        raise DecodeError(f"too long: {_duration(frames / rate)} at {rate} Hz, more than the "
                          f"{_duration(MAX_DURATION_S)} a file may hold; split it first")


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
            rate = int(stream.rate or 0)
            channels = int(getattr(stream, "channels", 0) or 1)
            duration_s = container.duration / 1e6 if container.duration else 0.0  # microseconds
            check_bounds(rate, int(duration_s * rate), channels)
            held = 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())  # (channels, samples)
                    held += chunks[-1].shape[1]
                    check_bounds(rate, held, chunks[-1].shape[0])  # the header may not say, or lie
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
        with sf.SoundFile(os.fsencode(path)) as f:
            check_bounds(f.samplerate, f.frames, f.channels)  # before reading: the read allocates f.frames
            data, rate = f.read(dtype="float32", always_2d=True), f.samplerate
    except DecodeError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as exc:
        raise _decode_error(path, exc) from exc
    return data, int(rate)


def _decode_error(path: Path, exc: Exception) -> DecodeError:
    # the reason goes into index.json: name the file, not where the corpus happens to be mounted
    name = os.fsencode(path.name).decode("utf-8", "backslashreplace")  # printable, even if not UTF-8
    reason = str(exc).replace(repr(os.fsencode(path)), f"'{name}'")
    return DecodeError(f"cannot decode: {reason}")


BLOCK_FRAMES = 1 << 18  # frames per block of a file read in blocks (5.5 s at 48 kHz)


def audio_info(path: Path) -> tuple[int, int] | None:
    """(sample rate, frames) from the file's header without decoding it; None where the header cannot
    be read or does not say (:func:`decode` then says why, or finds out)."""
    try:
        if path.suffix.lower().lstrip(".") in FFMPEG_ONLY_EXTENSIONS:
            import av  # type: ignore[import-not-found]

            with av.open(str(path)) as container:
                stream = next((s for s in container.streams if s.type == "audio"), None)
                if stream is None or not container.duration or not stream.rate:
                    return None
                return int(stream.rate), int(container.duration / 1e6 * stream.rate)
        with sf.SoundFile(os.fsencode(path)) as f:
            return int(f.samplerate), int(f.frames)
    except Exception:  # unreadable, or no FFmpeg: decode() reports it
        return None


def decode_blocks(path: Path, block_frames: int | None = None) -> Iterator[np.ndarray]:
    """The audio of ``path`` as float32 ``(frames, channels)`` blocks read one at a time (the same
    samples as :func:`decode`, in memory one block at a time: ``block_frames``, by default
    :data:`BLOCK_FRAMES`); DecodeError if it cannot be read.
    Only the rate and duration bounds apply (:func:`check_duration`): nothing is held whole."""
    if path.suffix.lower().lstrip(".") in FFMPEG_ONLY_EXTENSIONS:
        yield from _ffmpeg_blocks(path)
        return
    try:
        with sf.SoundFile(os.fsencode(path)) as f:
            check_duration(f.samplerate, f.frames)
            while True:
                block = f.read(block_frames or BLOCK_FRAMES, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    return
                yield block
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as exc:
        raise _decode_error(path, exc) from exc


def _ffmpeg_blocks(path: Path) -> Iterator[np.ndarray]:
    """:func:`decode_blocks` for what only FFmpeg reads (PyAV): its decoded frames, as they come."""
    try:
        import av  # type: ignore[import-not-found]  # there: audio_info found this file long

        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise DecodeError("no audio stream")
            rate, held, resampler = int(stream.rate or 0), 0, av.AudioResampler(format="fltp")
            check_duration(rate, int(container.duration / 1e6 * rate) if container.duration else 0)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray()  # (channels, samples)
                    held += chunk.shape[1]
                    check_duration(rate, held)  # the header may not say, or lie
                    yield np.ascontiguousarray(chunk.T, dtype=np.float32)
    except DecodeError:
        raise
    except Exception as exc:  # FFmpeg raises many types
        raise DecodeError(f"cannot decode: {exc}") from exc


def to_mono(data: np.ndarray) -> np.ndarray:
    """Average the channels of ``(samples, channels)`` audio into float32 ``(samples,)``."""
    if data.ndim == 1:
        return data.astype(np.float32, copy=False)
    if data.shape[1] == 1:
        return np.ascontiguousarray(data[:, 0])
    return data.mean(axis=1, dtype=np.float32)


def resample(wav: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Resample with soxr (high quality); a no-op at the target rate. DecodeError where the input
    rate or the resampled length is beyond :func:`check_bounds`'s limits."""
    if rate == target_rate:
        return wav
    check_bounds(rate, wav.shape[0])
    check_bounds(target_rate, int(wav.shape[0] * (target_rate / rate)) + 1)
    return soxr.resample(wav, rate, target_rate, quality="HQ").astype(np.float32, copy=False)



# ---- utterances that are not a whole file: a segment of a recording, or a command's output ------------

COMMAND_TIMEOUT_S = 600.0  # seconds a wav.scp command may run (``sox ... |``) before it counts as failed
SEGMENT_SLACK_S = 0.01  # a segment may end this far past its recording's end (rounding in listings)


def decode_command(command: str, timeout: float = COMMAND_TIMEOUT_S) -> tuple[np.ndarray, int]:
    """The audio a shell pipeline writes to its standard output (a Kaldi ``wav.scp`` entry ``... |``), as
    :func:`decode` gives a file's; DecodeError when it fails, times out or writes no readable audio."""
    try:
        done = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DecodeError(f"the command ran longer than {timeout:g} s: {command}") from None
    except OSError as exc:
        raise DecodeError(f"cannot run the command: {exc.strerror or exc}") from None
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise DecodeError(f"the command failed (exit {done.returncode})" + (f": {said[-1][:200]}" if said else ""))
    if not done.stdout:
        raise DecodeError("the command wrote no audio")
    try:
        with sf.SoundFile(io.BytesIO(done.stdout)) as f:
            check_bounds(f.samplerate, f.frames, f.channels)
            return f.read(dtype="float32", always_2d=True), int(f.samplerate)
    except DecodeError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the command's output", str(exc))
        raise DecodeError(f"the command's output is not audio soundfile reads: {reason}") from None


def check_segment(start: float, end: float, length: float) -> None:
    """DecodeError for seconds ``start`` to ``end`` (0: the end) that run past a recording of ``length`` s."""
    if start >= length or (end and end > length + SEGMENT_SLACK_S):
        raise DecodeError(f"segment {start:g}-{end or length:g} s runs past the end of its recording ({length:.2f} s)")


def cut_segment(data: np.ndarray, rate: int, start: float, end: float) -> np.ndarray:
    """Seconds ``start`` to ``end`` (0: the end) of decoded ``(frames, channels)`` audio (:func:`check_segment`)."""
    check_segment(start, end, data.shape[0] / rate)
    return data[int(round(start * rate)): int(round(end * rate)) if end else None]


def _read_segment(path: Path, start: float, end: float) -> tuple[np.ndarray, int]:
    """A segment of a file soundfile reads, without decoding the rest of it."""
    try:
        with sf.SoundFile(os.fsencode(path)) as f:
            rate, frames = int(f.samplerate), int(f.frames)
            check_duration(rate, frames)
            check_segment(start, end, frames / rate)
            first = int(round(start * rate))
            count = (min(frames, int(round(end * rate))) if end else frames) - first
            check_bounds(rate, count, f.channels)
            f.seek(first)
            return f.read(count, dtype="float32", always_2d=True), rate
    except DecodeError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as exc:
        raise _decode_error(path, exc) from exc


def decode_utterance(path: Path, start: float = 0.0, end: float = 0.0, command: str = "",
                     timeout: float = COMMAND_TIMEOUT_S) -> tuple[np.ndarray, int]:
    """:func:`decode` for any utterance a corpus lists (:class:`dvector.corpus.Utterance`): a whole file,
    seconds ``start`` to ``end`` (0: the end) of one, or of what ``command`` writes."""
    if command:
        data, rate = decode_command(command, timeout)
        return (cut_segment(data, rate, start, end) if start or end else data), rate
    if not (start or end):
        return decode(path)
    if path.suffix.lower().lstrip(".") in FFMPEG_ONLY_EXTENSIONS:
        data, rate = decode(path)
        return cut_segment(data, rate, start, end), rate
    return _read_segment(path, start, end)
