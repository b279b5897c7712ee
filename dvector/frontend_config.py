"""The configs' shared base (``_Config``: ``to_dict``, ``from_dict``, ``hash``) and the front end's recorded
settings: ``FeatureConfig`` (log-mel), ``VadConfig``, ``WindowConfig`` (an utterance's embedding windows) and
their presets (``FEATURE_PRESETS``, ``WINDOW_PRESETS``: Resemblyzer's).

Import them from ``dvector.config``, which re-exports everything here; they live apart only to keep that module
within its size. Imports only ``dvector.errors``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Type, TypeVar

from dvector.errors import DvectorError

T = TypeVar("T", bound="_Config")


class _Config:
    # settings added after records were made: left out of to_dict at their defaults (old records and hashes match)
    _omit_at_default: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self._omit_at_default and value == f.default:
                del data[f.name]
            elif isinstance(value, _Config):
                data[f.name] = value.to_dict()
        return data

    @classmethod
    def from_dict(cls: Type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - names
        if unknown:
            raise DvectorError(f"{cls.__name__}: unknown setting(s) {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            value = data[f.name]
            nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if isinstance(nested, type) and issubclass(nested, _Config) and isinstance(value, dict):
                value = nested.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def hash(self) -> str:
        """A short stable digest of the settings (used to refuse mixing configurations)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DvectorError(message)


@dataclass(frozen=True)
class FeatureConfig(_Config):
    """Log-mel features; defaults are the original project's (25 ms Hann, 10 ms hop, 40 HTK mels). The
    front-end options after ``log_floor`` default to those features and leave ``to_dict`` at their defaults;
    ``FeatureConfig.preset("resemblyzer")`` sets them to Resemblyzer's (librosa's melspectrogram, no log)."""

    sample_rate: int = 16000
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 0  # 0: the window length in samples
    n_mels: int = 40
    f_min: float = 50.0
    f_max: float = 0.0  # 0: Nyquist
    log_floor: float = 1e-9
    mel_scale: str = "htk"  # or "slaney" (librosa's default: linear below 1 kHz, logarithmic above)
    mel_norm: str = "none"  # or "slaney": each filter times 2 / its width in Hz (librosa's default)
    pad_mode: str = "reflect"  # n_fft // 2 samples added at each end for centred frames: "reflect" or "constant" (0)
    compression: str = "log"  # "log": natural log, clamped at log_floor; "none": the mel power itself
    raise_to_dbfs: float = 0.0  # before VAD, audio of a lower RMS level (dBFS, whole file) is raised to it; 0: off
    _omit_at_default = ("mel_scale", "mel_norm", "pad_mode", "compression", "raise_to_dbfs")

    def __post_init__(self) -> None:
        _check(self.sample_rate >= 1000, f"sample_rate must be >= 1000 Hz, got {self.sample_rate}")
        _check(0 < self.hop_ms <= self.win_ms, "hop_ms must be in (0, win_ms]")
        _check(self.n_fft == 0 or self.n_fft >= self.win_length, "n_fft must be >= the window length")
        _check(self.n_mels >= 1, "n_mels must be >= 1")
        _check(0 <= self.f_min < self.fmax_hz <= self.sample_rate / 2, "need 0 <= f_min < f_max <= sample_rate/2")
        _check(self.log_floor > 0, "log_floor must be > 0")
        for name, choices in (("mel_scale", ("htk", "slaney")), ("mel_norm", ("none", "slaney")),
                              ("pad_mode", ("reflect", "constant")), ("compression", ("log", "none"))):
            _check(getattr(self, name) in choices, f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        _check(isinstance(self.raise_to_dbfs, (int, float)) and -200 < self.raise_to_dbfs <= 0,
               f"raise_to_dbfs must be a level in dBFS in (-200, 0] (0: off), got {self.raise_to_dbfs!r}")
        object.__setattr__(self, "raise_to_dbfs", float(self.raise_to_dbfs))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "FeatureConfig":
        return _preset(cls, FEATURE_PRESETS, name, overrides)

    @property
    def win_length(self) -> int:
        return int(round(self.sample_rate * self.win_ms / 1000))

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def fft_size(self) -> int:
        return self.n_fft or self.win_length

    @property
    def fmax_hz(self) -> float:
        return self.f_max or self.sample_rate / 2


@dataclass(frozen=True)
class VadConfig(_Config):
    """Energy VAD with an adaptive noise floor; all times in milliseconds, levels in dB."""

    enabled: bool = True
    frame_ms: float = 10.0
    threshold_db: float = 12.0  # speech: frame energy this far above the noise floor...
    min_threshold_db: float = 3.0  # ...or half the file's dynamic range if that is less, but not below this
    min_level_db: float = -55.0  # frames quieter than this (dBFS) are never speech
    floor_rise_db_per_s: float = 3.0  # how fast the noise floor may rise in steady noise
    min_speech_ms: float = 60.0  # shorter bursts are not speech
    hangover_ms: float = 150.0  # keep this much after speech ends
    preroll_ms: float = 50.0  # keep this much before speech starts
    max_pause_ms: float = 300.0  # internal pauses longer than this are shortened to it
    remove_dc: bool = False  # frame energy around the frame's mean: a DC offset is not speech
    _omit_at_default = ("remove_dc",)

    def __post_init__(self) -> None:
        _check(self.frame_ms > 0, "frame_ms must be > 0")
        _check(self.threshold_db > 0, "threshold_db must be > 0")
        _check(0 < self.min_threshold_db <= self.threshold_db, "min_threshold_db must be in (0, threshold_db]")
        for name in ("min_speech_ms", "hangover_ms", "preroll_ms", "max_pause_ms", "floor_rise_db_per_s"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "VadConfig":
        return _preset(cls, VAD_PRESETS, name, overrides)


# Resemblyzer's front end (its audio.py): librosa.feature.melspectrogram(sr=16000, n_fft=400, hop_length=160, n_mels=40)
# of the waveform raised to -30 dBFS (normalize_volume(wav, -30, increase_only=True)); webrtcvad trimming not copied
FEATURE_PRESETS: dict[str, dict[str, Any]] = {"resemblyzer": dict(
    f_min=0.0, f_max=8000.0, mel_scale="slaney", mel_norm="slaney", pad_mode="constant", compression="none",
    raise_to_dbfs=-30.0)}
# Our VAD set to trim as Resemblyzer's preprocess_wav (webrtcvad, smoothed over 8 x 30 ms, dilated by 90 ms,
# every remaining pause cut) does, searched on all 3,217 real-dev files: median cosine of the imported
# encoder's embeddings to Resemblyzer's 0.9991 (0.9608 with the default VAD); see docs/pretrained.md
VAD_PRESETS: dict[str, dict[str, Any]] = {"resemblyzer": dict(
    threshold_db=9.0, min_threshold_db=3.0, min_level_db=-45.0, min_speech_ms=60.0, preroll_ms=90.0,
    hangover_ms=150.0, max_pause_ms=0.0, remove_dc=True)}
WINDOW_PRESETS: dict[str, dict[str, Any]] = {"resemblyzer": dict(layout="partials", frames=160, rate=1.3, min_coverage=0.75)}


def _preset(cls: Type[T], presets: dict[str, dict[str, Any]], name: str, overrides: dict[str, Any]) -> T:
    _check(name in presets, f"unknown {cls.__name__} preset {name!r}; choose one of {sorted(presets)}")
    return cls(**{**presets[name], **overrides})


@dataclass(frozen=True)
class WindowConfig(_Config):
    """How an utterance's features are cut into windows for its embedding (``dvector.signal.windows``).

    ``"overlap"`` (dvector's): L frames (``frames``, or the training ``seg_len``), hop L // 2, one more ending
    at the last frame; a shorter utterance is one window as it is. ``"partials"`` (Resemblyzer's
    ``embed_utterance``): ``frames`` frames every ``round(sample_rate / rate / hop)`` frames, the last kept
    when ``min_coverage`` of it is audio, the waveform zero-padded to the end of the last before its features.
    """

    layout: str = "overlap"  # or "partials"
    frames: int = 0  # window length L in frames; 0 ("overlap" only): the training segment length
    rate: float = 1.3  # "partials": windows per second
    min_coverage: float = 0.75  # "partials": the last window's least fraction of audio samples

    def __post_init__(self) -> None:
        _check(self.layout in ("overlap", "partials"), f"layout must be 'overlap' or 'partials', got {self.layout!r}")
        _check(self.frames >= (1 if self.layout == "partials" else 0), "frames must be >= 1 (0: seg_len, overlap only)")
        _check(self.rate > 0 and 0 < self.min_coverage <= 1, "need rate > 0 and 0 < min_coverage <= 1")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "WindowConfig":
        return _preset(cls, WINDOW_PRESETS, name, overrides)

    def step_frames(self, features: FeatureConfig) -> int:
        """``"partials"``: frames between window starts, ``round(sample_rate / rate / hop)`` (77 for Resemblyzer's)."""
        step = int(round(features.sample_rate / self.rate / features.hop_length))
        _check(1 <= step <= self.frames, f"rate {self.rate} gives a step of {step} frames; it must be in [1, {self.frames}]")
        return step
