"""FeatureConfig's front-end options (mel scale and normalisation, padding, compression, level) and
WindowConfig: records of today's defaults unchanged, every combination against librosa in numpy and in
the torch twin, the level raised only, and the partial windows' invariants (Resemblyzer itself: in
tests/nn/test_resemblyzer_parity.py)."""

from __future__ import annotations

import itertools
import json

import librosa
import numpy as np
import pytest
import torch

from dvector.config import BuildConfig, FeatureConfig, VadConfig, WindowConfig
from dvector.demo.synth import random_voice, utterance
from dvector.errors import DvectorError
from dvector.signal.features import log_mel, mel_filterbank, raise_level
from dvector.signal.process import speech_waveform, waveform_to_mel
from dvector.signal.torch_frontend import TorchLevel, TorchLogMel
from dvector.signal.windows import partial_windows, window_batch_at

NEW_FIELDS = ("mel_scale", "mel_norm", "pad_mode", "compression", "raise_to_dbfs")


def voice(seconds: float, seed: int = 0, peak: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wav = utterance(random_voice(rng), seconds, 16000, rng)
    return (peak * wav / np.max(np.abs(wav))).astype(np.float32)


def test_default_records_and_hashes_are_unchanged() -> None:
    # the digests of today's defaults, as recorded in existing index.json, plan.json and checkpoints
    assert FeatureConfig().hash() == "0f0b3fad96736683"
    assert BuildConfig().hash() == "b17f8d3d059bca6f"
    assert not set(NEW_FIELDS) & set(FeatureConfig().to_dict())
    assert not set(NEW_FIELDS) & set(BuildConfig().to_dict()["features"])


def test_old_records_load_and_new_ones_round_trip() -> None:
    old = {"sample_rate": 16000, "win_ms": 25.0, "hop_ms": 10.0, "n_fft": 0, "n_mels": 40, "f_min": 50.0,
           "f_max": 0.0, "log_floor": 1e-9}
    assert FeatureConfig.from_dict(old) == FeatureConfig() and FeatureConfig().to_dict() == old
    preset = FeatureConfig.preset("resemblyzer")
    data = json.loads(json.dumps(BuildConfig(features=preset).to_dict()))
    assert set(NEW_FIELDS) <= set(data["features"])
    assert BuildConfig.from_dict(data).features == preset
    assert preset.hash() != FeatureConfig().hash()
    window = WindowConfig.preset("resemblyzer")
    assert WindowConfig.from_dict(json.loads(json.dumps(window.to_dict()))) == window


@pytest.mark.parametrize("kwargs", [dict(mel_scale="mel"), dict(mel_norm="area"), dict(pad_mode="edge"),
                                    dict(compression="log10"), dict(raise_to_dbfs=3.0), dict(raise_to_dbfs="x")])
def test_bad_front_end_options_are_refused(kwargs: dict) -> None:
    with pytest.raises(DvectorError):
        FeatureConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(layout="sliding"), dict(layout="partials", frames=0), dict(rate=0.0),
                                    dict(min_coverage=0.0), dict(min_coverage=1.5), dict(frames=-1)])
def test_bad_window_options_are_refused(kwargs: dict) -> None:
    with pytest.raises(DvectorError):
        WindowConfig(**kwargs)


def test_window_step_must_fit_the_window() -> None:
    with pytest.raises(DvectorError, match="step"):
        WindowConfig(layout="partials", frames=160, rate=0.5).step_frames(FeatureConfig())  # 200 frames > 160
    assert WindowConfig.preset("resemblyzer").step_frames(FeatureConfig()) == 77


@pytest.mark.parametrize("scale,norm,pad,compression", list(itertools.product(
    ("htk", "slaney"), ("none", "slaney"), ("reflect", "constant"), ("log", "none"))))
def test_every_combination_matches_librosa(scale: str, norm: str, pad: str, compression: str) -> None:
    cfg = FeatureConfig(f_min=20.0, mel_scale=scale, mel_norm=norm, pad_mode=pad, compression=compression)
    bank = librosa.filters.mel(sr=16000, n_fft=400, n_mels=40, fmin=20.0, fmax=8000.0, htk=scale == "htk",
                               norm="slaney" if norm == "slaney" else None).T
    assert np.abs(mel_filterbank(cfg) - bank).max() <= 1e-6 * np.abs(bank).max()
    wav = voice(0.77, seed=len(scale + norm + pad))
    ref = librosa.feature.melspectrogram(y=wav, sr=16000, n_fft=400, hop_length=160, pad_mode=pad, n_mels=40,
                                         fmin=20.0, htk=scale == "htk", norm="slaney" if norm == "slaney" else None).T
    ref = np.log(np.maximum(ref, cfg.log_floor)) if compression == "log" else ref
    for ours in (log_mel(wav, cfg), TorchLogMel(cfg)(torch.from_numpy(wav)).numpy()):
        assert ours.shape == ref.shape
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-4


def test_defaults_compute_todays_features() -> None:
    wav = voice(0.5)
    legacy = FeatureConfig(mel_scale="htk", mel_norm="none", pad_mode="reflect", compression="log", raise_to_dbfs=0.0)
    assert legacy == FeatureConfig()
    assert np.array_equal(waveform_to_mel(wav * 0.001, FeatureConfig(), VadConfig(enabled=False))[0],
                          log_mel(wav * 0.001, FeatureConfig()))  # no level change by default


@pytest.mark.parametrize("peak", [1e-4, 0.01, 0.9])
def test_level_is_raised_only(peak: float) -> None:
    wav = voice(0.6, seed=1, peak=peak)
    out = raise_level(wav, -30.0)
    rms_db = 20 * np.log10(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    out_db = 20 * np.log10(np.sqrt(np.mean(np.square(out, dtype=np.float64))))
    assert out.dtype == np.float32
    assert out_db == pytest.approx(max(rms_db, -30.0), abs=1e-4)
    np.testing.assert_allclose(TorchLevel(FeatureConfig(raise_to_dbfs=-30.0))(torch.from_numpy(wav)).numpy(), out,
                               rtol=1e-6, atol=1e-12)
    assert raise_level(wav, 0.0) is wav  # off


def test_level_comes_before_vad() -> None:
    quiet = voice(1.0, seed=2, peak=1e-3)
    cfg = FeatureConfig(raise_to_dbfs=-30.0)
    audio, kept = speech_waveform(quiet, cfg, VadConfig(enabled=False))
    assert kept == 1.0 and np.array_equal(audio, raise_level(quiet, -30.0))
    mel, _ = waveform_to_mel(quiet, cfg, VadConfig(enabled=False))
    assert np.array_equal(mel, log_mel(raise_level(quiet, -30.0), cfg))


def test_silence_and_torchscript_twins() -> None:
    cfg = FeatureConfig.preset("resemblyzer")
    level, mel = torch.jit.script(TorchLevel(cfg)), torch.jit.script(TorchLogMel(cfg))
    assert torch.equal(level(torch.zeros(800)), torch.zeros(800))
    wav = torch.from_numpy(voice(0.4, peak=0.002))
    np.testing.assert_allclose(mel(level(wav)).numpy(), log_mel(raise_level(wav.numpy(), -30.0), cfg),
                               rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("n", [1, 159, 160, 25599, 25600, 25601, 37919, 37920, 44000, 160000, 160 * 1000 + 7])
def test_partial_windows_cover_the_audio(n: int) -> None:
    padded, starts = partial_windows(n, 160, 160, 77, 0.75)
    assert padded >= n and padded == max(n, (starts[-1] + 160) * 160)
    assert starts == list(range(0, 77 * len(starts), 77))
    frames = padded // 160 + 1  # the padded waveform's centred frames
    assert starts[-1] + 160 <= frames
    if len(starts) > 1:  # the last window is at least 75 % audio
        assert n - starts[-1] * 160 >= 0.75 * 160 * 160
    mel = torch.arange(frames * 2, dtype=torch.float32).view(frames, 2)
    batch = window_batch_at(mel, starts, 160)
    assert batch.shape == (len(starts), 160, 2) and torch.equal(batch[-1, 0], mel[starts[-1]])


def test_short_clip_is_one_padded_window() -> None:
    assert partial_windows(16000, 160, 160, 77, 0.75) == (25600, [0])
    assert torch.jit.script(partial_windows)(16000, 160, 160, 77, 0.75) == (25600, [0])
