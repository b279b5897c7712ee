"""Synthetic speakers for tests, benchmarks and the demo: no download needed.

A voice is a sawtooth glottal source at the speaker's pitch, shaped by vowel formants scaled by
the speaker's vocal-tract length, a spectral tilt and some breath noise, spoken in syllables at
the speaker's rate, with pauses, leading and trailing silence, and background noise. Voices
differ in pitch, formants, rate and tilt, but their ranges overlap, so telling speakers apart
takes learning.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf

from dvector.errors import DvectorError
from dvector.files import atomic_write, display_path
from dvector.signal.audio import MAX_RATE, MIN_RATE

# F1, F2, F3 (Hz) of five vowels of an average adult voice
VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480], [570, 840, 2410]],
                  dtype=np.float64)
BANDWIDTHS = np.array([80.0, 100.0, 140.0])
LAYOUTS = ("flat", "nested")  # SPEAKER/utt.ext, or SPEAKER/SESSION/utt.ext
FORMATS = ("flac", "wav")


@dataclass(frozen=True)
class Voice:
    f0: float  # mean pitch, Hz
    tract: float  # formant scale (shorter vocal tract: higher formants)
    rate: float  # syllables per second
    tilt: float  # one-pole low-pass coefficient on the source, in [0, 1)
    breath: float  # breath noise relative to the voiced source
    vowel_bias: tuple[float, ...]  # how often this speaker uses each vowel (a speaking style)


def random_voice(rng: np.random.Generator) -> Voice:
    bias = rng.dirichlet(np.full(len(VOWELS), 2.0))
    return Voice(f0=float(np.exp(rng.uniform(np.log(85), np.log(260)))), tract=float(rng.uniform(0.85, 1.2)),
                 rate=float(rng.uniform(3.0, 6.0)), tilt=float(rng.uniform(0.2, 0.8)),
                 breath=float(rng.uniform(0.01, 0.15)), vowel_bias=tuple(float(b) for b in bias))


def _formant_sos(formants: np.ndarray, sample_rate: int) -> np.ndarray:
    sos = []
    for freq, bw in zip(formants, BANDWIDTHS):
        freq = min(freq, 0.45 * sample_rate)
        r = np.exp(-np.pi * bw / sample_rate)
        theta = 2 * np.pi * freq / sample_rate
        a = [1.0, -2 * r * np.cos(theta), r * r]
        sos.append([1.0 - r, 0.0, 0.0, *a])
    return np.array(sos)


def speech(voice: Voice, duration_s: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """About ``duration_s`` of voiced syllables and short pauses, float32, peak about 0.5."""
    pieces = []
    total = 0
    target = int(duration_s * sample_rate)
    while total < target:
        if pieces and rng.random() < 0.12:  # a short pause between words
            pause = np.zeros(int(rng.uniform(0.08, 0.35) * sample_rate), dtype=np.float64)
            pieces.append(pause)
            total += pause.size
            continue
        n = int(sample_rate / voice.rate * rng.uniform(0.7, 1.3))
        t = np.arange(n) / sample_rate
        f0 = voice.f0 * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(1, 3) * t + rng.uniform(0, 6.3))) * rng.uniform(0.9, 1.1)
        phase = np.cumsum(f0) / sample_rate + rng.random()
        source = 2 * (phase % 1.0) - 1.0
        source = scipy.signal.lfilter([1 - voice.tilt], [1, -voice.tilt], source)
        source += voice.breath * rng.standard_normal(n)
        vowel = VOWELS[rng.choice(len(VOWELS), p=np.asarray(voice.vowel_bias))] * voice.tract
        voiced = scipy.signal.sosfilt(_formant_sos(vowel * rng.uniform(0.95, 1.05, 3), sample_rate), source)
        envelope = np.sin(np.pi * np.arange(n) / n) ** 0.5
        syllable = voiced * envelope
        if rng.random() < 0.5:  # a fricative onset
            k = min(n, int(0.04 * sample_rate))
            syllable[:k] += 0.3 * np.std(voiced) * rng.standard_normal(k)
        pieces.append(syllable)
        total += n
    out = np.concatenate(pieces)[:target]
    peak = np.max(np.abs(out)) or 1.0
    return (0.5 * out / peak).astype(np.float32)


def utterance(voice: Voice, duration_s: float, sample_rate: int, rng: np.random.Generator,
              noise_db: float = -45.0, edge_silence_s: tuple[float, float] = (0.2, 0.6)) -> np.ndarray:
    """Speech with leading and trailing silence and background noise at ``noise_db`` dBFS."""
    lead, trail = (int(rng.uniform(*edge_silence_s) * sample_rate) for _ in range(2))
    body = speech(voice, max(0.1, duration_s - (lead + trail) / sample_rate), sample_rate, rng)
    wav = np.concatenate([np.zeros(lead, np.float32), body, np.zeros(trail, np.float32)])
    wav += (10 ** (noise_db / 20) * rng.standard_normal(wav.size)).astype(np.float32)
    return np.clip(wav, -1, 1)


def parse_duration(value: str | tuple[float, float]) -> tuple[float, float]:
    """Utterance lengths in seconds as ``(lo, hi)``, checked: ``"1.5-4.0"`` or ``(1.5, 4.0)`` -> (1.5, 4.0).

    Raises :class:`DvectorError` unless both are numbers with ``0 < lo <= hi``.
    """
    if isinstance(value, str):
        try:
            lo, hi = (float(x) for x in value.split("-"))
        except ValueError:
            raise DvectorError(f"--duration takes lo-hi seconds such as 1.5-4.0, got {value!r}") from None
    else:
        try:
            lo, hi = (float(x) for x in value)
        except (TypeError, ValueError):
            raise DvectorError(f"--duration takes (lo, hi) seconds such as (1.5, 4.0), got {value!r}") from None
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise DvectorError(f"--duration needs 0 < lo <= hi, got {value!r}")
    return lo, hi


def write_corpus(root: Path, n_speakers: int, utterances_per_speaker: int, seed: int = 0,
                 sample_rate: int = 16000, duration_s: str | tuple[float, float] = (1.5, 4.0),
                 extension: str = "flac", subtype: str | None = None, prefix: str = "spk",
                 layout: str = "flat") -> list[Path]:
    """Write a speaker-directory corpus ``root/spkNNN/uttNNN.ext``; returns the files written.

    ``layout`` "nested" puts each speaker's utterances in two session subfolders
    (``root/spkNNN/sessionK/...``), as LibriSpeech (chapters) and VoxCeleb (videos) do. ``extension``
    is flac or wav; ``duration_s`` the range of utterance lengths (see :func:`parse_duration`). All
    three are checked, in that order, and then the counts, rate and prefix
    (:func:`check_corpus_settings`), before anything is written. Each file is written atomically; one
    that cannot be written is one DvectorError line.
    """
    if layout not in LAYOUTS:
        raise DvectorError(f"--layout must be flat or nested, got {layout!r}")
    if extension not in FORMATS:
        raise DvectorError(f"--format must be flac or wav, got {extension!r}")
    lo, hi = parse_duration(duration_s)
    check_corpus_settings(n_speakers, utterances_per_speaker, sample_rate, prefix)
    nested = layout == "nested"
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(n_speakers):
        voice = random_voice(rng)
        speaker = f"{prefix}{s:03d}"
        for u in range(utterances_per_speaker):
            folder = Path(root) / speaker / (f"session{u % 2}" if nested else "")
            wav = utterance(voice, float(rng.uniform(lo, hi)), sample_rate, rng)
            path = folder / f"{speaker}-{u:03d}.{extension}" if nested else folder / f"utt{u:03d}.{extension}"
            _write_audio(path, wav, sample_rate, extension, subtype)
            paths.append(path)
    return paths


def check_corpus_settings(n_speakers: int, utterances_per_speaker: int, sample_rate: int, prefix: str) -> None:
    """A DvectorError unless the counts are >= 1, the rate one a file header may hold
    (``signal.audio.MIN_RATE``-``MAX_RATE``) and ``prefix`` a plain name (no folders, no ``..``)."""
    if n_speakers < 1 or utterances_per_speaker < 1:
        raise DvectorError(f"--speakers and --utterances must be >= 1, got {n_speakers} and {utterances_per_speaker}")
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise DvectorError(f"--sample-rate must be {MIN_RATE}-{MAX_RATE} Hz, got {sample_rate}")
    if any(c in prefix for c in ("/", "\\", "\0", os.sep, os.altsep or "/")) or ".." in prefix:
        raise DvectorError(f"--prefix must be a plain name, without folders or '..': got {prefix!r}")


def _write_audio(path: Path, wav: np.ndarray, sample_rate: int, extension: str, subtype: str | None) -> None:
    """One file, atomically; a failure (a file where a folder should be, a full disk, a rate the
    format cannot hold) is one DvectorError naming the file."""
    try:
        for above in (path.parent, *path.parent.parents):
            if os.path.lexists(above):
                if not above.is_dir():
                    raise DvectorError(f"cannot write {display_path(path)}: {display_path(above)} is a file, "
                                       "not a folder")
                break
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            sf.write(str(tmp), wav, sample_rate, subtype=subtype, format=extension.upper())
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DvectorError(f"cannot write {display_path(path)}: {reason}") from exc
