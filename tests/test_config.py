"""dvector.config: round trips through plain dicts (and JSON), checks on construction, stable hashes,
model presets, the learning-rate rule and segment-length parsing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from dvector.config import (
    MODEL_PRESETS,
    BuildConfig,
    FeatureConfig,
    ModelConfig,
    TrainConfig,
    VadConfig,
    WindowConfig,
    parse_seg_len,
)
from dvector.errors import DvectorError

CLASSES = [FeatureConfig, VadConfig, ModelConfig, BuildConfig, TrainConfig, WindowConfig]

# One non-default, valid instance of each class, to round-trip something other than the defaults.
CHANGED = {
    FeatureConfig: FeatureConfig(sample_rate=8000, win_ms=32.0, hop_ms=16.0, n_fft=512, n_mels=24, f_min=20.0,
                                 f_max=3800.0, log_floor=1e-6),
    VadConfig: VadConfig(enabled=False, frame_ms=20.0, threshold_db=9.0, min_threshold_db=2.0, max_pause_ms=0.0),
    ModelConfig: ModelConfig(name="custom", n_mels=24, hidden_size=32, proj_size=16, n_layers=2, embed_dim=16,
                             pooling="last"),
    BuildConfig: BuildConfig(extensions=("wav",), shard_size=7, min_shards=2, block_size=4, seed=3, merge_speakers=True,
                             features=FeatureConfig(n_mels=24), vad=VadConfig(enabled=False)),
    TrainConfig: TrainConfig(steps=10, save_every=5, n_speakers=4, n_utterances=3, seg_len=(140, 180),
                             loss="contrast", reduction="mean", optimizer="adam", lr=0.002, amp=False),
    WindowConfig: WindowConfig(layout="partials", frames=160, rate=1.3, min_coverage=0.75),
}

# Settings added after records were made: left out of to_dict at their defaults, so that old records and
# their hashes (index.json, build plans, checkpoints) stay as they were.
ADDED_LATER = {FeatureConfig: {"mel_scale", "mel_norm", "pad_mode", "compression", "raise_to_dbfs"},
               VadConfig: {"remove_dc"}, ModelConfig: {"head"}}


def through_json(data: dict[str, Any]) -> dict[str, Any]:
    """What a config looks like after being written to and read back from a JSON record."""
    return json.loads(json.dumps(data))


# ---------------------------------------------------------------------------------------------
# to_dict / from_dict
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_defaults_round_trip(cls: type) -> None:
    cfg = cls()
    assert cls.from_dict(cfg.to_dict()) == cfg
    assert cls.from_dict(through_json(cfg.to_dict())) == cfg


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_changed_settings_round_trip(cls: type) -> None:
    cfg = CHANGED[cls]
    assert cfg != cls()
    back = cls.from_dict(through_json(cfg.to_dict()))
    assert back == cfg
    assert back.hash() == cfg.hash()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_to_dict_holds_every_field(cls: type) -> None:
    # BuildConfig leaves an empty speed_perturb out on purpose: builds made before the option existed
    # keep their config dict and hash, so they still resume
    # (and split_seconds at 0, for the same reason)
    left_out_when_empty = {"speed_perturb", "split_seconds"} if cls is BuildConfig else ADDED_LATER.get(cls, set())
    assert set(cls().to_dict()) == {f.name for f in dataclasses.fields(cls)} - left_out_when_empty
    if cls in ADDED_LATER:  # ...and kept once they are set
        changed = {FeatureConfig: FeatureConfig.preset("resemblyzer"), VadConfig: VadConfig.preset("resemblyzer"),
                   ModelConfig: ModelConfig.preset("resemblyzer")}[cls]
        assert ADDED_LATER[cls] <= set(changed.to_dict()) and cls.from_dict(changed.to_dict()) == changed
    if cls is BuildConfig:
        full = BuildConfig(speed_perturb=(0.9,), split_seconds=2.0)
        assert set(full.to_dict()) == {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_from_dict_of_nothing_is_the_defaults(cls: type) -> None:
    assert cls.from_dict({}) == cls()


def test_build_config_nests_features_and_vad() -> None:
    cfg = CHANGED[BuildConfig]
    data = through_json(cfg.to_dict())
    assert data["features"] == FeatureConfig(n_mels=24).to_dict()
    assert data["vad"] == VadConfig(enabled=False).to_dict()
    back = BuildConfig.from_dict(data)
    assert isinstance(back.features, FeatureConfig) and back.features.n_mels == 24
    assert isinstance(back.vad, VadConfig) and back.vad.enabled is False
    assert back.extensions == ("wav",)


def test_build_config_from_dict_with_part_of_the_nested_settings() -> None:
    back = BuildConfig.from_dict({"features": {"n_mels": 64}})
    assert back.features == FeatureConfig(n_mels=64)
    assert back.vad == VadConfig()


def test_train_config_seg_len_is_a_list_in_json_and_a_tuple_in_the_config() -> None:
    cfg = TrainConfig(seg_len=(140, 180))
    data = through_json(cfg.to_dict())
    assert data["seg_len"] == [140, 180]
    back = TrainConfig.from_dict(data)
    assert back.seg_len == (140, 180)
    assert isinstance(back.seg_len, tuple)
    assert back == cfg


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_from_dict_rejects_unknown_settings(cls: type) -> None:
    data = cls().to_dict()
    data["no_such_setting"] = 1
    with pytest.raises(DvectorError, match="no_such_setting"):
        cls.from_dict(data)


@pytest.mark.parametrize("key", ["features", "vad"])
def test_from_dict_rejects_unknown_nested_settings(key: str) -> None:
    with pytest.raises(DvectorError, match="bogus"):
        BuildConfig.from_dict({key: {"bogus": 1}})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_configs_are_frozen(cls: type) -> None:
    cfg = cls()
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, name, getattr(cfg, name))


# ---------------------------------------------------------------------------------------------
# Checks on construction
# ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    # FeatureConfig (defaults: 16 kHz, 25 ms window = 400 samples, 10 ms hop, 40 mels)
    (FeatureConfig, dict(sample_rate=999)),
    (FeatureConfig, dict(sample_rate=0)),
    (FeatureConfig, dict(hop_ms=0.0)),
    (FeatureConfig, dict(hop_ms=-1.0)),
    (FeatureConfig, dict(hop_ms=30.0)),  # > win_ms
    (FeatureConfig, dict(n_fft=256)),  # < the 400-sample window
    (FeatureConfig, dict(n_mels=0)),
    (FeatureConfig, dict(f_min=-1.0)),
    (FeatureConfig, dict(f_max=9000.0)),  # > Nyquist
    (FeatureConfig, dict(f_min=8000.0)),  # >= f_max (Nyquist)
    (FeatureConfig, dict(f_min=3000.0, f_max=2000.0)),
    (FeatureConfig, dict(log_floor=0.0)),
    # VadConfig
    (VadConfig, dict(frame_ms=0.0)),
    (VadConfig, dict(threshold_db=0.0)),
    (VadConfig, dict(min_threshold_db=0.0)),
    (VadConfig, dict(min_threshold_db=13.0)),  # > threshold_db
    (VadConfig, dict(min_speech_ms=-1.0)),
    (VadConfig, dict(hangover_ms=-1.0)),
    (VadConfig, dict(preroll_ms=-1.0)),
    (VadConfig, dict(max_pause_ms=-1.0)),
    (VadConfig, dict(floor_rise_db_per_s=-0.5)),
    # ModelConfig
    (ModelConfig, dict(n_mels=0)),
    (ModelConfig, dict(hidden_size=0)),
    (ModelConfig, dict(n_layers=0)),
    (ModelConfig, dict(proj_size=-1)),
    (ModelConfig, dict(proj_size=256)),  # == hidden_size
    (ModelConfig, dict(embed_dim=0)),
    (ModelConfig, dict(pooling="mean")),
    # BuildConfig
    (BuildConfig, dict(shard_size=0)),
    (BuildConfig, dict(min_shards=0)),
    (BuildConfig, dict(block_size=0)),
    (BuildConfig, dict(extensions=())),
    (BuildConfig, dict(extensions=" , ")),
    # TrainConfig
    *[(TrainConfig, {name: 0}) for name in ("steps", "save_every", "decay_every", "valid_every", "log_every",
                                           "keep_checkpoints", "valid_utterances")],
    (TrainConfig, dict(n_speakers=1)),
    (TrainConfig, dict(n_utterances=1)),
    (TrainConfig, dict(seg_len=(0, 0))),
    (TrainConfig, dict(seg_len=(180, 140))),
    (TrainConfig, dict(loss="triplet")),
    (TrainConfig, dict(reduction="max")),
    (TrainConfig, dict(optimizer="rmsprop")),
    (TrainConfig, dict(lr=-0.1)),
    (TrainConfig, dict(grad_clip=0.0)),
    (TrainConfig, dict(decay_factor=0.0)),
    (TrainConfig, dict(decay_factor=1.5)),
    (TrainConfig, dict(valid_fraction=0.0)),
    (TrainConfig, dict(valid_fraction=1.0)),
    (TrainConfig, dict(workers=-1)),
    (TrainConfig, dict(threads=-1)),
]


@pytest.mark.parametrize(
    "cls,kwargs", BAD_VALUES, ids=[f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw in BAD_VALUES]
)
def test_bad_value_raises(cls: type, kwargs: dict[str, Any]) -> None:
    with pytest.raises(DvectorError):
        cls(**kwargs)


@pytest.mark.parametrize(
    "cls,kwargs", BAD_VALUES, ids=[f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw in BAD_VALUES]
)
def test_bad_value_raises_from_dict_too(cls: type, kwargs: dict[str, Any]) -> None:
    data = through_json({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})
    with pytest.raises(DvectorError):
        cls.from_dict(data)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (FeatureConfig, dict(hop_ms=25.0)),  # hop == window is allowed
        (FeatureConfig, dict(n_fft=400)),  # == the window
        (FeatureConfig, dict(f_min=0.0, f_max=8000.0)),
        (VadConfig, dict(min_threshold_db=12.0)),  # == threshold_db
        (VadConfig, dict(min_speech_ms=0.0, hangover_ms=0.0, preroll_ms=0.0, max_pause_ms=0.0, floor_rise_db_per_s=0.0)),
        (ModelConfig, dict(proj_size=255)),
        (BuildConfig, dict(shard_size=1, min_shards=1, block_size=1)),
        (TrainConfig, dict(n_speakers=2, n_utterances=2, seg_len=(1, 1), decay_factor=1.0, workers=0, threads=0)),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "-".join(v),
)
def test_boundary_values_are_accepted(cls: type, kwargs: dict[str, Any]) -> None:
    cls(**kwargs)


def test_error_message_names_the_setting() -> None:
    with pytest.raises(DvectorError, match="pooling"):
        ModelConfig(pooling="mean")
    with pytest.raises(DvectorError, match="hangover_ms"):
        VadConfig(hangover_ms=-1.0)


# ---------------------------------------------------------------------------------------------
# hash()
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_hash_is_stable_and_short(cls: type) -> None:
    a, b = cls(), cls()
    assert a is not b
    assert a.hash() == b.hash() == a.hash()
    assert len(a.hash()) == 16
    int(a.hash(), 16)  # hex


def test_hash_is_the_same_in_another_process() -> None:
    code = "from dvector.config import BuildConfig, TrainConfig; print(BuildConfig().hash(), TrainConfig().hash())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert out == [BuildConfig().hash(), TrainConfig().hash()]


CHANGES = [
    (FeatureConfig, dict(n_mels=41)),
    (FeatureConfig, dict(hop_ms=12.5)),
    (FeatureConfig, dict(f_max=7000.0)),
    (VadConfig, dict(enabled=False)),
    (VadConfig, dict(threshold_db=11.0)),
    (ModelConfig, dict(pooling="last")),
    (ModelConfig, dict(embed_dim=128)),
    (ModelConfig, dict(name="other")),
    (BuildConfig, dict(seed=1)),
    (BuildConfig, dict(extensions=("wav",))),
    (BuildConfig, dict(merge_speakers=True)),
    (BuildConfig, dict(features=FeatureConfig(n_mels=64))),
    (BuildConfig, dict(vad=VadConfig(enabled=False))),
    (TrainConfig, dict(seg_len=(140, 180))),
    (TrainConfig, dict(optimizer="adam")),
    (TrainConfig, dict(seed=1)),
]


@pytest.mark.parametrize(
    "cls,kwargs", CHANGES, ids=[f"{c.__name__}-{'-'.join(kw)}" for c, kw in CHANGES]
)
def test_hash_changes_with_a_setting(cls: type, kwargs: dict[str, Any]) -> None:
    assert cls(**kwargs).hash() != cls().hash()


def test_hash_ignores_the_order_of_settings() -> None:
    # the digest is of the sorted settings, so building from a reordered dict changes nothing
    data = TrainConfig(steps=7).to_dict()
    reordered = dict(reversed(list(data.items())))
    assert TrainConfig.from_dict(reordered).hash() == TrainConfig(steps=7).hash()


# ---------------------------------------------------------------------------------------------
# BuildConfig extensions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    ["WAV,.flac", "flac,wav", " wav , FLAC ,", ("flac", "wav"), ("wav", "flac"), (".WAV", "flac", "wav"), ["Flac", ".Wav"]],
    ids=repr,
)
def test_extensions_are_normalised(spelling: Any) -> None:
    cfg = BuildConfig(extensions=spelling)
    assert cfg.extensions == ("flac", "wav")
    assert cfg == BuildConfig(extensions=("flac", "wav"))
    assert cfg.hash() == BuildConfig(extensions=("flac", "wav")).hash()


def test_default_extensions_are_sorted_and_survive_a_round_trip() -> None:
    cfg = BuildConfig()
    assert list(cfg.extensions) == sorted(cfg.extensions)
    assert set(cfg.extensions) >= {"wav", "flac"}
    assert BuildConfig.from_dict(through_json(cfg.to_dict())).extensions == cfg.extensions


# ---------------------------------------------------------------------------------------------
# ModelConfig.preset
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_preset(name: str) -> None:
    cfg = ModelConfig.preset(name)
    assert cfg.name == name
    for key, value in MODEL_PRESETS[name].items():
        assert getattr(cfg, key) == value
    assert ModelConfig.from_dict(through_json(cfg.to_dict())) == cfg


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_preset_with_overrides(name: str) -> None:
    cfg = ModelConfig.preset(name, n_mels=80, embed_dim=32)
    assert cfg.name == name and cfg.n_mels == 80 and cfg.embed_dim == 32
    for key in ("hidden_size", "channels", "arch"):
        if key in MODEL_PRESETS[name]:
            assert getattr(cfg, key) == MODEL_PRESETS[name][key]


def test_old_loss_name_means_ge2e() -> None:
    assert TrainConfig(loss="softmax").loss == "ge2e" == TrainConfig().loss
    assert TrainConfig.from_dict({"loss": "softmax"}) == TrainConfig()


def test_encoder_presets_need_channels() -> None:
    with pytest.raises(DvectorError, match="channels"):
        ModelConfig(arch="ecapa", channels=0)


def test_presets_differ() -> None:
    hashes = {ModelConfig.preset(name).hash() for name in MODEL_PRESETS}
    assert len(hashes) == len(MODEL_PRESETS)


def test_unknown_preset_raises() -> None:
    with pytest.raises(DvectorError, match="no-such-model"):
        ModelConfig.preset("no-such-model")


def test_preset_override_is_still_checked() -> None:
    with pytest.raises(DvectorError):
        ModelConfig.preset("tiny", pooling="max")


# ---------------------------------------------------------------------------------------------
# TrainConfig.learning_rate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(optimizer="sgd"), 0.01),
        (dict(optimizer="sgd", reduction="sum", n_speakers=4, n_utterances=5), 0.01),
        (dict(optimizer="sgd", reduction="mean", n_speakers=4, n_utterances=5), 0.01 * 20),
        (dict(optimizer="sgd", reduction="mean"), 0.01 * 64 * 10),
        (dict(optimizer="adam"), 1e-3),
        (dict(optimizer="adam", reduction="mean", n_speakers=4, n_utterances=5), 1e-3),  # not scaled
        (dict(optimizer="sgd", lr=0.05), 0.05),
        (dict(optimizer="sgd", reduction="mean", lr=0.05), 0.05),  # an explicit rate is used as is
        (dict(optimizer="adam", lr=3e-4), 3e-4),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v),
)
def test_learning_rate(kwargs: dict[str, Any], expected: float) -> None:
    assert TrainConfig(**kwargs).learning_rate == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# parse_seg_len
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [("160", (160, 160)), ("140-180", (140, 180)), (160, (160, 160)), ("1", (1, 1)), (" 150 ", (150, 150))],
    ids=repr,
)
def test_parse_seg_len(text: Any, expected: tuple[int, int]) -> None:
    assert parse_seg_len(text) == expected
    assert TrainConfig(seg_len=parse_seg_len(text)).seg_len == expected


@pytest.mark.parametrize("text", ["", "abc", "160ms", "1.5", "140-", "-140", "140--180", "1-2-3", "140:180"], ids=repr)
def test_parse_seg_len_rejects_bad_text(text: str) -> None:
    with pytest.raises(DvectorError):
        parse_seg_len(text)


@pytest.mark.parametrize("text", ["180-140", "0", "0-5", 0], ids=repr)
def test_out_of_range_seg_len_never_makes_a_train_config(text: Any) -> None:
    # rejected by parse_seg_len itself or, at the latest, by TrainConfig
    with pytest.raises(DvectorError):
        TrainConfig(seg_len=parse_seg_len(text))
