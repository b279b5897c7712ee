"""Tests for dvector.signal.features: log-mel against librosa as an independent reference."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from dvector.config import FeatureConfig
from dvector.errors import DvectorError
from dvector.signal.features import log_mel, mel_filterbank, min_samples, n_frames
from dvector.demo.synth import random_voice, utterance

CONFIGS = {
    "default": FeatureConfig(),
    "80 mels": FeatureConfig(n_mels=80),
    "8 kHz": FeatureConfig(sample_rate=8000),
    "n_fft 512": FeatureConfig(n_fft=512),
    "fmax 7600": FeatureConfig(f_min=20.0, f_max=7600.0),
}


def librosa_log_mel(wav: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    mel = librosa.feature.melspectrogram(
        y=wav, sr=cfg.sample_rate, n_fft=cfg.fft_size, hop_length=cfg.hop_length, win_length=cfg.win_length,
        window="hann", center=True, pad_mode="reflect", power=2.0, n_mels=cfg.n_mels, fmin=cfg.f_min,
        fmax=cfg.fmax_hz, htk=True, norm=None)  # (n_mels, frames)
    return np.log(np.maximum(mel.T, cfg.log_floor))


def voice_at(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return utterance(random_voice(rng), seconds, rate, rng)


def test_default_config_is_the_original_projects() -> None:
    cfg = FeatureConfig()
    assert (cfg.win_length, cfg.hop_length, cfg.fft_size, cfg.n_mels) == (400, 160, 400, 40)
    assert (cfg.f_min, cfg.fmax_hz) == (50.0, 8000.0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_log_mel_matches_librosa(name: str) -> None:
    cfg = CONFIGS[name]
    wav = voice_at(cfg.sample_rate, 1.37, seed=len(name))
    ours = log_mel(wav, cfg)
    ref = librosa_log_mel(wav, cfg)
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape == (n_frames(wav.shape[0], cfg), cfg.n_mels)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_filterbank_matches_librosa(name: str) -> None:
    cfg = CONFIGS[name]
    ref = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.fft_size, n_mels=cfg.n_mels, fmin=cfg.f_min,
                              fmax=cfg.fmax_hz, htk=True, norm=None).T
    bank = mel_filterbank(cfg)
    assert bank.shape == (cfg.fft_size // 2 + 1, cfg.n_mels)
    np.testing.assert_allclose(bank, ref, atol=1e-5)


def test_log_mel_of_a_tone_peaks_in_the_right_band() -> None:
    cfg = FeatureConfig()
    t = np.arange(16000) / 16000
    wav = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    mel = log_mel(wav, cfg)
    centres = librosa.mel_frequencies(cfg.n_mels + 2, fmin=cfg.f_min, fmax=cfg.fmax_hz, htk=True)[1:-1]
    band = int(np.argmax(mel[10:-10].mean(axis=0)))
    assert abs(centres[band] - 1000.0) < 100.0


@pytest.mark.parametrize("n", [400, 401, 559, 560, 561, 16000, 16159, 16160, 23457])
def test_frame_count_formula(n: int) -> None:
    cfg = FeatureConfig()
    wav = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    mel = log_mel(wav, cfg)
    assert mel.shape == (1 + n // 160, 40) == (n_frames(n, cfg), cfg.n_mels)
    assert mel.shape[0] == librosa.util.frame(np.pad(wav, 200, mode="reflect"), frame_length=400,
                                              hop_length=160).shape[-1]


def test_too_short_input_raises() -> None:
    cfg = FeatureConfig()
    assert min_samples(cfg) == 400
    log_mel(np.ones(min_samples(cfg), np.float32) * 0.1, cfg)  # exactly one window is enough
    with pytest.raises(ValueError, match="shorter than one frame"):
        log_mel(np.ones(min_samples(cfg) - 1, np.float32), cfg)
    with pytest.raises(ValueError):
        log_mel(np.zeros(0, np.float32), cfg)
    big_fft = FeatureConfig(n_fft=1024)  # reflect padding needs n_fft/2 + 1 samples
    with pytest.raises(ValueError):
        log_mel(np.ones(500, np.float32), big_fft)


def test_rejects_multichannel() -> None:
    with pytest.raises(ValueError, match="mono"):
        log_mel(np.zeros((1000, 2), np.float32), FeatureConfig())


def test_silence_sits_at_the_log_floor() -> None:
    cfg = FeatureConfig()
    mel = log_mel(np.zeros(4000, np.float32), cfg)
    np.testing.assert_allclose(mel, np.log(cfg.log_floor), rtol=1e-6)
    assert np.all(np.isfinite(mel))


def test_float16_storage_keeps_the_values() -> None:
    cfg = FeatureConfig()
    mel = log_mel(voice_at(16000, 1.0), cfg)
    np.testing.assert_allclose(mel.astype(np.float16).astype(np.float32), mel, atol=0.02)


@pytest.mark.parametrize("kwargs", [dict(sample_rate=100), dict(hop_ms=30.0), dict(n_fft=100), dict(n_mels=0),
                                    dict(f_min=9000.0), dict(f_max=9000.0), dict(log_floor=0.0)])
def test_bad_configs_are_refused(kwargs: dict) -> None:
    with pytest.raises(DvectorError):
        FeatureConfig(**kwargs)
