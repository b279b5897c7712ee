"""Frozen configuration dataclasses, checked on construction, convertible to and from plain dicts.

Every setting that changes what is computed lives here, so that shards, checkpoints and exports
can record exactly how they were made (``to_dict``) and be rebuilt from that record
(``from_dict``). The configs' base class and the front end's settings (``FeatureConfig``, ``VadConfig``,
``WindowConfig``, their presets) are defined in ``dvector.frontend_config`` and re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable

from dvector.errors import DvectorError
from dvector.frontend_config import (  # noqa: F401 - re-exported: import every config from dvector.config
    FEATURE_PRESETS, VAD_PRESETS, WINDOW_PRESETS, FeatureConfig, VadConfig, WindowConfig, _check, _Config,
)

VERSION = "0.1.0"  # dvector's version, recorded in what it makes (exports, embeddings, eval results)
NORM_EPS = 1e-12  # eps of every L2 normalisation of embeddings (the network's output, pooled windows)

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Every trainable preset subtracts each utterance's log-mel mean (input_norm="mean"): the level never reaches it.
    # The GE2E paper: 3-layer LSTM, 768 cells, 256 projection, last frame.
    "paper": dict(hidden_size=768, proj_size=256, n_layers=3, embed_dim=256, pooling="last", input_norm="mean"),
    # The original project's default: 3 x 256 LSTM, tanh(Linear) per frame, attentive pooling.
    "attentive": dict(hidden_size=256, proj_size=0, n_layers=3, embed_dim=256, pooling="attention", input_norm="mean"),
    # For tests and the CPU demo.
    "tiny": dict(hidden_size=64, proj_size=0, n_layers=1, embed_dim=64, pooling="attention", input_norm="mean"),
    # ECAPA-TDNN (Desplanques et al. 2020): C channels, 192-d embedding; "channels" is C.
    "ecapa": dict(arch="ecapa", channels=512, embed_dim=192, input_norm="mean"),
    "ecapa-small": dict(arch="ecapa", channels=256, embed_dim=192, input_norm="mean"),
    # Thin ResNet-34 with attentive statistics pooling; "channels" is the first stage's width (x2 per stage).
    "resnet34": dict(arch="resnet", channels=32, embed_dim=256, input_norm="mean"),  # the VoxCeleb trainer's "half"
    "resnet34-quarter": dict(arch="resnet", channels=16, embed_dim=256, input_norm="mean"),
    # Resemblyzer's VoiceEncoder (its weights: dvector.nn.resemblyzer), on FeatureConfig.preset("resemblyzer")'s mel power.
    "resemblyzer": dict(hidden_size=256, proj_size=0, n_layers=3, embed_dim=256, pooling="last", head="linear-relu",
                        input_norm="none"),
}
ARCHES = ("lstm", "ecapa", "resnet")
LOSSES = ("ge2e", "contrast", "angleproto", "aamsoftmax", "softmaxproto")  # "softmax": the old name of "ge2e"


@dataclass(frozen=True)
class ModelConfig(_Config):
    """The d-vector network. Build one from a preset with ``ModelConfig.preset("paper")``."""

    name: str = "attentive"
    n_mels: int = 40
    hidden_size: int = 256
    proj_size: int = 0  # LSTM projection size (0: none)
    n_layers: int = 3
    embed_dim: int = 256
    pooling: str = "attention"  # "attention" or "last"
    # "mean" (every preset): each row's log-mel mean over its (valid) frames is subtracted inside the network.
    # "none", the field's default: raw log-mels, as checkpoints saved before this setting existed compute.
    input_norm: str = "none"
    arch: str = "lstm"  # "lstm" (the fields above), "ecapa" or "resnet" (sized by channels and embed_dim)
    channels: int = 0  # ECAPA's C, or the ResNet's first-stage width (0 for the LSTM)
    # pooling "last": "auto" (a Linear only when the LSTM output size differs from embed_dim) or "linear-relu"
    head: str = "auto"
    _omit_at_default = ("head",)

    def __post_init__(self) -> None:
        _check(min(self.n_mels, self.hidden_size, self.n_layers, self.embed_dim) >= 1, "sizes must be >= 1")
        _check(self.head == "auto" or (self.head == "linear-relu" and self.arch == "lstm" and self.pooling == "last"),
               f"head must be 'auto', or 'linear-relu' with the LSTM's 'last' pooling, got {self.head!r}")
        _check(0 <= self.proj_size < self.hidden_size, "proj_size must be in [0, hidden_size)")
        _check(self.pooling in ("attention", "last"), f"pooling must be 'attention' or 'last', got {self.pooling!r}")
        _check(self.input_norm in ("mean", "none"), f"input_norm must be 'mean' or 'none', got {self.input_norm!r}")
        _check(self.arch in ARCHES, f"arch must be one of {ARCHES}, got {self.arch!r}")
        _check(self.arch == "lstm" or self.channels >= 4, "ecapa and resnet need channels >= 4")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise DvectorError(f"unknown model {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        return cls(name=name, **{**MODEL_PRESETS[name], **overrides})


DEFAULT_EXTENSIONS = ("wav", "flac", "ogg", "mp3")


def normalize_extensions(extensions: str | Iterable[str]) -> tuple[str, ...]:
    """``"WAV,.flac"`` or ``["WAV", ".flac", "wav"]`` -> ``("flac", "wav")``: lower case, no dots, sorted,
    unique; the one spelling of a set of extensions (so that equal builds hash equal)."""
    items = extensions.split(",") if isinstance(extensions, str) else extensions
    out = tuple(sorted({e.strip().lower().lstrip(".") for e in items if e.strip()}))
    if not out:
        raise DvectorError("no audio extensions given (e.g. -e wav,flac)")
    return out


@dataclass(frozen=True)
class BuildConfig(_Config):
    """How ``build-shards`` groups utterances; together with the features and VAD it fixes the output."""

    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    shard_size: int = 10000  # utterances per shard (a bound kept to within one speaker block)
    min_shards: int = 8  # a small corpus is still split into at least this many shards
    block_size: int = 32  # utterances per speaker block
    seed: int = 0
    merge_speakers: bool = False  # key speakers by directory name alone, across roots
    features: FeatureConfig = field(default_factory=FeatureConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    # also write every utterance at these speeds, as new speakers ``SPK@sp0.9`` (empty: none)
    speed_perturb: tuple[float, ...] = ()
    # cut each utterance's speech (log-mel frames after VAD) into samples of this many seconds (0: off)
    split_seconds: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "extensions", normalize_extensions(self.extensions))
        object.__setattr__(self, "speed_perturb", parse_speed_perturb(self.speed_perturb))
        _check(self.shard_size >= 1, "shard_size must be >= 1")
        _check(self.min_shards >= 1, "min_shards must be >= 1")
        _check(self.block_size >= 1, "block_size must be >= 1")
        _check(isinstance(self.split_seconds, (int, float)) and not isinstance(self.split_seconds, bool)
               and (self.split_seconds == 0 or 0.1 <= self.split_seconds <= 3600),
               f"split_seconds must be 0 (off) or between 0.1 and 3600, got {self.split_seconds!r}")
        object.__setattr__(self, "split_seconds", float(self.split_seconds))

    def to_dict(self) -> dict[str, Any]:
        """Without an empty ``speed_perturb`` or a zero ``split_seconds``: builds made before they existed resume."""
        data = super().to_dict()
        if not self.speed_perturb:
            del data["speed_perturb"]
        if not self.split_seconds:
            del data["split_seconds"]
        return data


def parse_speed_perturb(value: str | Iterable[float]) -> tuple[float, ...]:
    """``--speed-perturb``: ``"1.1,0.9"`` or ``[1.1, 0.9]`` -> ``(0.9, 1.1)`` (sorted, unique, 4 decimals);
    ``""`` -> ``()``. Each factor must lie in (0.5, 2.0) and not be 1 (the utterance itself)."""
    items: Iterable[Any] = [p for p in value.split(",") if p.strip()] if isinstance(value, str) else value
    factors = set()
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            factor = round(float(item), 4)
        except (TypeError, ValueError):
            raise DvectorError(f"speed_perturb: factors must be numbers like 0.9,1.1, got {item!r}") from None
        _check(0.5 < factor < 2.0, f"speed_perturb: each factor must be in (0.5, 2.0), got {item!r}")
        _check(factor != 1.0, "speed_perturb: a factor of 1 is the utterance itself; give only other speeds")
        factors.add(factor)
    return tuple(sorted(factors))


AUGMENT_KINDS = ("noise", "babble", "reverb", "channel", "specaugment", "gain")
# channel and gain are left out: every preset's input mean normalisation removes a fixed per-band offset exactly
DEFAULT_AUGMENT: tuple[str, ...] = ("noise", "babble", "reverb", "specaugment")


def parse_augment(value: str | Iterable[str]) -> tuple[str, ...]:
    """``--augment``: a comma list of AUGMENT_KINDS, ``all``, ``none`` or ``default`` -> the kinds, in
    AUGMENT_KINDS' order."""
    items = [p.strip().lower() for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
    if items in (["none"], []):
        return ()
    if items == ["all"]:
        return AUGMENT_KINDS
    if items == ["default"]:
        return DEFAULT_AUGMENT
    unknown = [k for k in items if k not in AUGMENT_KINDS]
    _check(not unknown, f"augment: unknown kind(s) {', '.join(map(repr, unknown))}; choose from "
                        f"{', '.join(AUGMENT_KINDS)}, or all, none, default")
    return tuple(k for k in AUGMENT_KINDS if k in items)


def parse_probabilities(value: str) -> dict[str, float]:
    """``--augment-prob noise=0.5,reverb=0.2`` -> {"noise": 0.5, "reverb": 0.2}, checked."""
    out: dict[str, float] = {}
    for item in (p.strip() for p in value.split(",") if p.strip()):
        kind, _, number = item.partition("=")
        _check(kind.strip() in AUGMENT_KINDS, f"augment-prob: unknown kind {kind.strip()!r} in {item!r}; "
                                              f"choose from {', '.join(AUGMENT_KINDS)}")
        try:
            out[kind.strip()] = float(number)
        except ValueError:
            raise DvectorError(f"augment-prob: {item!r} is not KIND=PROBABILITY (e.g. noise=0.5)") from None
    return out


def parse_range(value: str | Iterable[float], name: str) -> tuple[float, float]:
    """``"5-20"``, ``"-5:20"``, ``"10"`` or a pair -> (lo, hi), checked lo <= hi."""
    if isinstance(value, str):
        text = value.strip()
        sep = ":" if ":" in text else ("-" if "-" in text.lstrip("-") else "")
        parts = [text] if not sep else ([text[:text.index(sep, 1)], text[text.index(sep, 1) + 1:]])
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise DvectorError(f"{name}: expected a number or a range LO:HI (e.g. 5:20), got {value!r}") from None
    else:
        numbers = [float(v) for v in value]
    _check(len(numbers) in (1, 2), f"{name}: expected one number or two, got {value!r}")
    lo, hi = numbers[0], numbers[-1]
    _check(math.isfinite(lo) and math.isfinite(hi) and lo <= hi, f"{name}: expected LO <= HI, got {value!r}")
    return (lo, hi)


@dataclass(frozen=True)
class AugmentConfig(_Config):
    """Online augmentation of training crops (``dvector.augment``): which kinds, how often (per row), how
    strong (ranges drawn uniformly; levels in dB of power)."""

    kinds: tuple[str, ...] = DEFAULT_AUGMENT
    noise_prob: float = 0.5
    noise_snr: tuple[float, float] = (0.0, 15.0)  # dB
    noise_colours: tuple[str, ...] = ("white", "pink", "brown")
    babble_prob: float = 0.3
    babble_snr: tuple[float, float] = (13.0, 20.0)  # dB (MUSAN babble's usual range)
    babble_speakers: tuple[int, int] = (3, 7)
    reverb_prob: float = 0.3
    reverb_rt60: tuple[float, float] = (0.2, 1.0)  # seconds
    reverb_drr: tuple[float, float] = (0.0, 10.0)  # dB, direct-to-reverberant ratio
    channel_prob: float = 0.5
    channel_db: float = 6.0  # peak of the gain curve across bands
    specaugment_prob: float = 0.5
    time_masks: int = 1
    time_mask_frames: int = 10  # widest mask
    freq_masks: int = 1
    freq_mask_bands: int = 6
    gain_prob: float = 0.5
    gain_db: float = 10.0  # +- this
    noise_dir: str = ""  # recordings for "noise" (instead of coloured noise)
    rir_dir: str = ""  # room responses for "reverb" (instead of drawn RT60 and DRR)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", parse_augment(self.kinds))
        for kind in AUGMENT_KINDS:
            p = getattr(self, f"{kind}_prob")
            _check(isinstance(p, (int, float)) and 0.0 <= p <= 1.0, f"{kind} probability must be in [0, 1], got {p!r}")
        for name in ("noise_snr", "babble_snr", "reverb_rt60", "reverb_drr", "babble_speakers"):
            object.__setattr__(self, name, parse_range(getattr(self, name), name))
        object.__setattr__(self, "babble_speakers", tuple(int(v) for v in self.babble_speakers))
        _check(self.babble_speakers[0] >= 1, "babble_speakers must be >= 1")
        _check(self.reverb_rt60[0] > 0, "reverb_rt60 must be > 0 seconds")
        bad = [c for c in self.noise_colours if c not in ("white", "pink", "brown")]
        _check(bool(self.noise_colours) and not bad, f"noise_colours: white, pink or brown, got {self.noise_colours!r}")
        for name in ("time_masks", "time_mask_frames", "freq_masks", "freq_mask_bands"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0")
        _check(self.channel_db >= 0 and self.gain_db >= 0, "channel_db and gain_db must be >= 0")

    def with_probabilities(self, probabilities: dict[str, float]) -> "AugmentConfig":
        """A copy with some kinds' probabilities set (``parse_probabilities``' result)."""
        return dataclasses.replace(self, **{f"{k}_prob": v for k, v in probabilities.items()})


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Training settings. Defaults follow the GE2E paper and the original project's flags."""
    steps: int = 100000  # -i: total steps (a continued run counts from its saved step)
    save_every: int = 10000  # -s
    decay_every: int = 100000  # -d: halve the learning rate every this many steps
    valid_every: int = 1000
    log_every: int = 50
    n_speakers: int = 64  # -n: N
    n_utterances: int = 10  # -m: M
    seg_len: tuple[int, int] = (160, 160)  # -l: L, or a range drawn per batch (the paper: 140-180)
    loss: str = "ge2e"  # one of LOSSES (GE2E softmax is also spelt "softmax")
    margin: float = 0.2  # aamsoftmax: margin m (radians), scale s, steps over which m grows from 0, sub-centres
    scale: float = 30.0
    margin_warmup: int = 0
    subcentres: int = 1
    gather: bool = False  # under DDP, angleproto/softmaxproto compare with every rank's embeddings
    weight_decay: float = 0.0
    reduction: str = "sum"  # the paper sums over the batch; "mean" scales the SGD rate by N*M to match
    optimizer: str = "auto"  # sgd, adam, or auto: sgd (the paper's) for ge2e and contrast, adam for the others
    lr: float = 0.0  # 0: 0.01 for SGD (x N*M with "mean"), 1e-3 for Adam
    momentum: float = 0.0
    decay_factor: float = 0.5
    grad_clip: float = 3.0
    paper_grad_scale: bool = True  # x0.5 on the projection, x0.01 on w and b, before clipping
    seed: int = 0
    workers: int = 2  # data loader processes per training process
    pool_size: int = 0  # utterances per sampling pool (0: 8 x N x M)
    short_policy: str = "repeat"
    valid_fraction: float = 0.1  # of speakers held out when no --valid shards are given
    valid_utterances: int = 20  # per validation speaker
    keep_checkpoints: int = 5
    max_minutes: float = 0.0  # stop (with a checkpoint) after this long; 0: no limit
    threads: int = 0  # torch CPU threads on CPU (0: every core, shared among torchrun processes)
    amp: bool = True  # bf16 autocast on CUDA
    compile: bool = False  # torch.compile on CUDA
    freeze_steps: int = 0  # with --init: only the loss's own weights train for the first this many steps
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # online augmentation of the crops

    def __post_init__(self) -> None:
        for name in ("steps", "save_every", "decay_every", "valid_every", "log_every", "keep_checkpoints",
                     "valid_utterances"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1")
        _check(self.n_speakers >= 2, "n_speakers (-n) must be >= 2")
        _check(self.n_utterances >= 2, "n_utterances (-m) must be >= 2")
        _check(1 <= self.seg_len[0] <= self.seg_len[1], f"seg_len must be L or lo-hi with 1 <= lo <= hi, got {self.seg_len}")
        object.__setattr__(self, "loss", "ge2e" if self.loss == "softmax" else self.loss)
        _check(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        _check(0 <= self.margin < 1.5 and self.scale > 0 and self.margin_warmup >= 0 and self.subcentres >= 1,
               "need 0 <= margin < 1.5, scale > 0, margin_warmup >= 0, subcentres >= 1")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(self.reduction in ("sum", "mean") and self.optimizer in ("sgd", "adam", "auto"),
               f"reduction must be sum or mean, optimizer sgd, adam or auto; got {self.reduction!r}, {self.optimizer!r}")
        _check(self.lr >= 0 and self.grad_clip > 0 and 0 < self.decay_factor <= 1, "lr >= 0, grad_clip > 0, 0 < decay_factor <= 1")
        _check(0 < self.valid_fraction < 1, "valid_fraction must be in (0, 1)")
        _check(min(self.workers, self.threads, self.freeze_steps) >= 0, "workers, threads, freeze_steps must be >= 0")

    @property
    def optimizer_kind(self) -> str:  # what "auto" means: sgd (the paper's) for ge2e and contrast, adam for the others
        return self.optimizer if self.optimizer != "auto" else ("sgd" if self.loss in ("ge2e", "contrast") else "adam")

    @property
    def learning_rate(self) -> float:
        if self.lr:
            return self.lr
        if self.optimizer_kind == "adam":
            return 1e-3
        return 0.01 * (self.n_speakers * self.n_utterances if self.reduction == "mean" else 1)


def launch_rank() -> int:
    """This process's rank as torchrun launched it (``RANK``; 0 when run alone). Only rank 0 reports
    to the user: the others would repeat the same lines (their errors still end them, exit 1)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def parse_seg_len(value: str | int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Segment length L in frames as ``(lo, hi)``, checked: the one parser of L.

    ``"160"`` or ``160`` -> (160, 160); ``"140-180"``, ``(140, 180)`` or ``[140, 180]`` -> (140, 180)
    (a range: L drawn per batch in [lo, hi]). Raises :class:`DvectorError` unless lo and hi are
    whole frames with ``1 <= lo <= hi``.
    """
    if isinstance(value, str):
        try:
            parts = [int(p) for p in value.split("-")]
        except ValueError:
            raise DvectorError(f"seg_len (segment length) must be frames like 160 or a range like 140-180, "
                               f"got {value!r}") from None
        if len(parts) not in (1, 2):
            raise DvectorError(f"seg_len (segment length) must be like 160 or 140-180, got {value!r}")
    elif isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise DvectorError(f"seg_len range must be (lo, hi), got {value!r}")
        parts = list(value)
    else:
        parts = [value]
    lo, hi = parts[0], parts[-1]
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise DvectorError(f"seg_len must be whole frames: an int L or a (lo, hi) pair, got {value!r}")
    if lo < 1:
        raise DvectorError(f"seg_len must be >= 1 frame, got {value!r}")
    if hi < lo:
        raise DvectorError(f"seg_len range must have lo <= hi, got ({lo}, {hi})")
    return int(lo), int(hi)
