"""One utterance from file to stored features: decode -> mono -> resample (and speed) -> level (when
``FeatureConfig.raise_to_dbfs`` asks) -> VAD -> log-mel (float16).

Used by build-shards (in worker processes) and by embedding, so that both see identical features.

A file longer than :data:`LONG_FILE_S` (by its header) is never held whole: it is read in blocks
(:mod:`dvector.signal.blocks`) two or three times: once for the level (only with ``raise_to_dbfs``),
once for the VAD's frame energies (one value per VAD frame: the VAD decides on the whole file, as
for a short one), once for the kept samples and their log-mels. Its memory is then a few blocks of
audio, the per-frame VAD arrays (about 6 bytes per 10 ms) and the stored float16 features (80
bytes per 10 ms of speech at 40 mels, what the shard holds anyway), instead of about 34 bytes per
sample of audio (7.8 GB for a 4-hour file at 16 kHz). Its features are those of the whole-file
path but for rounding (the level's mean square is summed by blocks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from dvector.signal.audio import DecodeError, audio_info, decode, decode_utterance, resample, to_mono
from dvector.config import FeatureConfig, VadConfig
from dvector.signal.blocks import MelStream, exact_blocks, feature_blocks
from dvector.signal.features import level_gain, log_mel, min_samples, raise_level
from dvector.signal.vad import frame_energy_db, frame_length, gather_frames, keep_from_energy, trim_silence

STAGES = ("decode", "resample", "vad", "features")
LONG_FILE_S = 20 * 60.0  # files longer than this (by their header) are processed in blocks
BLOCK_S = 10.0  # seconds of audio per block of a long file


class SkipUtterance(Exception):
    """This file cannot give features; the message is the reason, for the index and the summary."""


@dataclass
class Processed:
    mel: np.ndarray  # (frames, n_mels) float16
    duration_s: float  # of the input audio
    vad_kept: float  # fraction of samples the VAD kept
    input_rate: int
    seconds: dict[str, float] = field(default_factory=dict)  # time per stage


def speech_waveform(
    wav: np.ndarray, features: FeatureConfig, vad: VadConfig, seconds: dict[str, float] | None = None
) -> tuple[np.ndarray, float]:
    """The samples ``log_mel`` is taken of, and the fraction the VAD kept: mono audio at the feature
    rate, raised to ``features.raise_to_dbfs`` when quieter (whole file; 0: off), then VAD-trimmed.

    Raises SkipUtterance when nothing (or less than one frame) is left. ``seconds`` collects the
    time spent in the "vad" stage (the level with it).
    """
    need = min_samples(features)
    if wav.shape[0] < need:
        raise SkipUtterance(f"too short: {wav.shape[0]} samples at {features.sample_rate} Hz, less than one frame ({need})")
    t0 = time.perf_counter()
    trimmed, kept = trim_silence(raise_level(wav, features.raise_to_dbfs), features.sample_rate, vad)
    if seconds is not None:
        seconds["vad"] = seconds.get("vad", 0.0) + time.perf_counter() - t0
    if trimmed.shape[0] == 0:
        raise SkipUtterance("empty after VAD: no speech found")
    if trimmed.shape[0] < need:
        raise SkipUtterance(f"too short after VAD: {trimmed.shape[0]} samples of speech, less than one frame")
    return trimmed, kept


def waveform_to_mel(
    wav: np.ndarray, features: FeatureConfig, vad: VadConfig, seconds: dict[str, float] | None = None
) -> tuple[np.ndarray, float]:
    """Float32 log-mel of mono audio at the feature rate after level and VAD (``speech_waveform``), and
    the kept fraction. Raises SkipUtterance when nothing (or less than one frame) is left. ``seconds``
    collects the time spent in the "vad" and "features" stages.
    """
    trimmed, kept = speech_waveform(wav, features, vad, seconds)
    t1 = time.perf_counter()
    mel = log_mel(trimmed, features)
    if seconds is not None:
        seconds["features"] = seconds.get("features", 0.0) + time.perf_counter() - t1
    return mel, kept


def process_file(path: Path, features: FeatureConfig, vad: VadConfig, speed: float = 1.0, start: float = 0.0,
                 end: float = 0.0, command: str = "") -> Processed:
    """Features of one audio file (or of seconds ``start`` to ``end`` of it, or of what ``command`` writes:
    :func:`dvector.signal.audio.decode_utterance`); SkipUtterance with the reason when it cannot give any.

    ``speed`` other than 1 perturbs it as Kaldi's and WeSpeaker's speed perturbation does (sox
    ``speed``): the audio is read as if recorded at ``rate * speed`` and resampled to the feature
    rate, so its duration scales by 1/speed and its pitch and formants by speed (before VAD).
    ``duration_s`` is then the perturbed audio's.
    """
    whole = not (start or end or command)
    info = audio_info(path) if whole else None
    if info is not None and info[1] > LONG_FILE_S * info[0]:
        return _process_long(path, info[0], features, vad, speed)
    clock = time.perf_counter
    t0 = clock()
    try:
        data, rate = decode(path) if whole else decode_utterance(path, start, end, command)
    except DecodeError as exc:
        raise SkipUtterance(str(exc)) from exc
    if data.shape[0] == 0:
        raise SkipUtterance("no audio samples")
    if not np.all(np.isfinite(data)):
        raise SkipUtterance("audio holds NaN or infinite samples")
    wav = to_mono(data)
    t1 = clock()
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked for below, not warned about
        try:
            wav = resample(wav, rate if speed == 1.0 else rate * speed, features.sample_rate)
        except DecodeError as exc:
            raise SkipUtterance(str(exc)) from exc
        seconds = {"decode": t1 - t0, "resample": clock() - t1}
        mel, kept = waveform_to_mel(wav, features, vad, seconds)
        stored = mel.astype(np.float16)
    check_finite(stored)
    duration_s = data.shape[0] / rate if speed == 1.0 else data.shape[0] / (rate * speed)
    return Processed(stored, duration_s, kept, rate, seconds)


def check_finite(mel: np.ndarray) -> None:
    """SkipUtterance unless every feature value is finite: one Inf or NaN in a stored mel turns a
    model trained on it into NaN. Finite audio can still give them: samples of huge amplitude (a
    float file holding 1e18) overflow the power spectrum, and values beyond float16's range
    (65504) become Inf when stored."""
    bad = mel.size - int(np.count_nonzero(np.isfinite(mel)))
    if bad:
        raise SkipUtterance(f"non-finite features: {bad} of {mel.size} log-mel values are NaN or infinite "
                            "(audio of huge amplitude?)")


def _process_long(path: Path, rate: int, features: FeatureConfig, vad: VadConfig, speed: float) -> Processed:
    """:func:`process_file` for a long file, in blocks (see the module's doc): the same checks and
    reasons, the same features but for rounding, memory independent of the length but for the output."""
    seconds: dict[str, float] = {}
    counts = [0]
    frame_len = frame_length(features.sample_rate, vad)
    block = frame_len * max(1, int(round(BLOCK_S * 1000.0 / vad.frame_ms)))

    def blocks(gain: float = 1.0) -> Iterator[np.ndarray]:
        """The audio at the feature rate (raised by ``gain``), read once more, in VAD-frame-aligned blocks."""
        for b in exact_blocks(feature_blocks(path, rate, features, speed, seconds, counts), block):
            yield b * np.float32(gain) if gain > 1.0 else b

    try:
        gain = _level_gain(blocks(), features) if features.raise_to_dbfs else 1.0
        keep, total = _keep_mask(blocks(gain), frame_len, features, vad, seconds)
        if counts[0] == 0:
            raise SkipUtterance("no audio samples")
        kept = _kept_length(keep, total, frame_len)
        _check_kept(kept, total, features)
        mel = MelStream(kept, features)
        with np.errstate(over="ignore", invalid="ignore"):
            per_block = block // frame_len
            for k, b in enumerate(blocks(gain)):
                t0 = time.perf_counter()
                frames = keep[k * per_block:k * per_block + -(-b.shape[0] // frame_len)] if keep is not None else None
                mel.push(b if frames is None else gather_frames(b, frames, frame_len))
                seconds["features"] = seconds.get("features", 0.0) + time.perf_counter() - t0
            stored = mel.finish()
    except DecodeError as exc:
        raise SkipUtterance(str(exc)) from exc
    check_finite(stored)
    duration_s = counts[0] / rate if speed == 1.0 else counts[0] / (rate * speed)
    return Processed(stored, duration_s, kept / total, rate, seconds)


def _level_gain(blocks: Iterator[np.ndarray], features: FeatureConfig) -> float:
    """``raise_level``'s gain for the whole audio, summed by blocks."""
    square, total = 0.0, 0
    for b in blocks:
        square += float(np.dot(b.astype(np.float64), b.astype(np.float64)))
        total += b.shape[0]
    return level_gain(square / total if total else 0.0, features.raise_to_dbfs)


def _keep_mask(blocks: Iterator[np.ndarray], frame_len: int, features: FeatureConfig, vad: VadConfig,
               seconds: dict[str, float]) -> tuple[np.ndarray | None, int]:
    """(the VAD's keep mask per frame, or None with the VAD off; the samples in all), from one more read."""
    energies, total = [], 0
    for b in blocks:
        t0 = time.perf_counter()
        total += b.shape[0]
        if vad.enabled:
            energies.append(frame_energy_db(np.ascontiguousarray(b), frame_len, vad.remove_dc))
        seconds["vad"] = seconds.get("vad", 0.0) + time.perf_counter() - t0
    need = min_samples(features)
    if total < need:
        raise SkipUtterance(f"too short: {total} samples at {features.sample_rate} Hz, less than one frame ({need})")
    if not vad.enabled:
        return None, total
    return keep_from_energy(np.concatenate(energies), vad), total


def _kept_length(keep: np.ndarray | None, total: int, frame_len: int) -> int:
    """Samples that the keep mask keeps of ``total`` (every frame is whole but the last)."""
    if keep is None:
        return total
    last = total - (keep.shape[0] - 1) * frame_len
    return int(np.count_nonzero(keep)) * frame_len - (frame_len - last if keep[-1] else 0)


def _check_kept(kept: int, total: int, features: FeatureConfig) -> None:
    """SkipUtterance as :func:`speech_waveform` says it when too little is left after the VAD."""
    if kept == 0:
        raise SkipUtterance("empty after VAD: no speech found")
    if kept < min_samples(features):
        raise SkipUtterance(f"too short after VAD: {kept} samples of speech, less than one frame")
