"""One utterance from file to stored features: decode -> mono -> resample (and speed) -> level (when
``FeatureConfig.raise_to_dbfs`` asks) -> VAD -> log-mel (float16).

Used by build-shards (in worker processes) and by embedding, so that both see identical features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dvector.signal.audio import DecodeError, decode, resample, to_mono
from dvector.config import FeatureConfig, VadConfig
from dvector.signal.features import log_mel, min_samples, raise_level
from dvector.signal.vad import trim_silence

STAGES = ("decode", "resample", "vad", "features")


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


def process_file(path: Path, features: FeatureConfig, vad: VadConfig, speed: float = 1.0) -> Processed:
    """Features of one audio file; SkipUtterance with the reason when it cannot give any.

    ``speed`` other than 1 perturbs it as Kaldi's and WeSpeaker's speed perturbation does (sox
    ``speed``): the audio is read as if recorded at ``rate * speed`` and resampled to the feature
    rate, so its duration scales by 1/speed and its pitch and formants by speed (before VAD).
    ``duration_s`` is then the perturbed audio's.
    """
    clock = time.perf_counter
    t0 = clock()
    try:
        data, rate = decode(path)
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
