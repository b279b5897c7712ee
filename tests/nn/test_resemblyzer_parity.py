"""Resemblyzer's voice encoder reproduced: weights (dvector.nn.resemblyzer), front end
(FeatureConfig.preset("resemblyzer"): numpy and torch twins), level, partial windows, and the whole
embed_utterance chain, each against Resemblyzer itself (and librosa) on synthetic voices.

Resemblyzer's webrtcvad trimming (preprocess_wav) is not reproduced: the chain is compared on waveforms
it never trims (embed_utterance takes the waveform as it is).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

resemblyzer = pytest.importorskip("resemblyzer")
librosa = pytest.importorskip("librosa")

from resemblyzer import VoiceEncoder  # noqa: E402
from resemblyzer.audio import normalize_volume, wav_to_mel_spectrogram  # noqa: E402

from dvector.config import FeatureConfig, ModelConfig, VadConfig, WindowConfig  # noqa: E402
from dvector.demo.synth import random_voice, utterance  # noqa: E402
from dvector.nn.resemblyzer import load_resemblyzer  # noqa: E402
from dvector.signal.features import log_mel, raise_level  # noqa: E402
from dvector.signal.process import speech_waveform  # noqa: E402
from dvector.signal.torch_frontend import TorchLevel, TorchLogMel  # noqa: E402
from dvector.signal.windows import embed_windows_at, partial_windows, window_batch_at  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

FEATURES = FeatureConfig.preset("resemblyzer")
WINDOWS = WindowConfig.preset("resemblyzer")
MIN_COSINE = 0.9999
MAX_REL = 1e-4


def voice(seconds: float, seed: int, gain: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wav = utterance(random_voice(rng), seconds, 16000, rng)
    return (gain * wav / np.max(np.abs(wav))).astype(np.float32)


def layout(n_samples: int, windows: WindowConfig = WINDOWS) -> tuple[int, list[int]]:
    return partial_windows(n_samples, FEATURES.hop_length, windows.frames, windows.step_frames(FEATURES),
                           windows.min_coverage)


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def encoder() -> VoiceEncoder:
    return VoiceEncoder(device="cpu", verbose=False).eval()


@pytest.fixture(scope="module")
def ours() -> torch.nn.Module:
    return load_resemblyzer().model


@pytest.fixture(scope="module")
def scripted(ours: torch.nn.Module) -> torch.jit.ScriptModule:
    return torch.jit.script(ours)


def test_presets_are_resemblyzers() -> None:
    from resemblyzer import hparams

    assert (FEATURES.sample_rate, FEATURES.n_mels, FEATURES.raise_to_dbfs) == (
        hparams.sampling_rate, hparams.mel_n_channels, hparams.audio_norm_target_dBFS)
    assert (FEATURES.win_length, FEATURES.fft_size, FEATURES.hop_length) == (400, 400, 160)
    assert (WINDOWS.frames, WINDOWS.step_frames(FEATURES)) == (hparams.partials_n_frames, 77)
    model = ModelConfig.preset("resemblyzer")
    assert (model.hidden_size, model.n_layers, model.embed_dim) == (
        hparams.model_hidden_size, hparams.model_num_layers, hparams.model_embedding_size)


@pytest.mark.parametrize("seconds", [0.3, 1.37, 4.1])
def test_mels_match_librosa_numpy_and_torch(seconds: float) -> None:
    wav = voice(seconds, seed=int(seconds * 10))
    ref = librosa.feature.melspectrogram(y=wav, sr=16000, n_fft=400, hop_length=160, n_mels=40).T
    assert np.array_equal(ref, wav_to_mel_spectrogram(wav))  # what Resemblyzer computes
    numpy_mel = log_mel(wav, FEATURES)
    torch_mel = torch.jit.script(TorchLogMel(FEATURES))(torch.from_numpy(wav)).numpy()
    assert numpy_mel.shape == torch_mel.shape == ref.shape
    assert relative_error(numpy_mel, ref) <= MAX_REL
    assert relative_error(torch_mel, ref) <= MAX_REL


def test_partial_windows_match_compute_partial_slices() -> None:
    lengths = set(range(1, 60000, 97))
    for k in range(1, 60):  # frame and window boundaries, and the 75 % coverage boundary
        lengths.update({k * 160 - 1, k * 160, k * 160 + 1, k * 77 * 160 + 19200 - 1, k * 77 * 160 + 19200,
                        k * 77 * 160 + 19200 + 1, k * 77 * 160 + 25600})
    options = [WINDOWS, WindowConfig(layout="partials", frames=160, rate=2.0, min_coverage=0.5),
               WindowConfig(layout="partials", frames=160, rate=0.7, min_coverage=1.0)]
    for windows in options:
        for n in sorted(lengths):
            wav_slices, mel_slices = VoiceEncoder.compute_partial_slices(n, windows.rate, windows.min_coverage)
            expected = (max(n, wav_slices[-1].stop), [s.start for s in mel_slices])
            assert layout(n, windows) == expected, (n, windows)
            assert all(s.stop - s.start == windows.frames for s in mel_slices)
    assert layout(16000 * 16 // 10 - 1) == (25600, [0])  # under 1.6 s: one padded window


@pytest.mark.parametrize("gain", [1e-4, 0.003, 0.02, 0.5])
def test_level_matches_normalize_volume(gain: float) -> None:
    wav = voice(1.2, seed=3, gain=gain)
    ref = normalize_volume(wav, -30, increase_only=True)
    ours = raise_level(wav, -30.0)
    twin = TorchLevel(FEATURES)(torch.from_numpy(wav)).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(twin, ref, rtol=1e-5, atol=1e-9)
    assert raise_level(np.zeros(100, np.float32), -30.0).tolist() == [0.0] * 100  # silence stays (no NaN)


def test_model_matches_voice_encoder_forward(encoder: VoiceEncoder, ours: torch.nn.Module,
                                             scripted: torch.jit.ScriptModule) -> None:
    wav = raise_level(voice(5.3, seed=7), -30.0)
    padded, starts = layout(len(wav))
    mel = wav_to_mel_spectrogram(np.pad(wav, (0, padded - len(wav))))  # Resemblyzer's own mels
    windows = window_batch_at(torch.from_numpy(mel), starts, 160)  # (B, 160, 40)
    with torch.no_grad():
        expected, got = encoder(windows), ours(windows)
    cosines = F.cosine_similarity(got, expected, dim=-1)
    assert len(starts) >= 5 and float(cosines.min()) >= MIN_COSINE, cosines
    with torch.no_grad():
        assert float(F.cosine_similarity(scripted(windows), expected, dim=-1).min()) >= MIN_COSINE


@pytest.mark.parametrize("seconds", [0.9, 1.6, 2.35, 6.2])
def test_embed_utterance_chain(encoder: VoiceEncoder, ours: torch.nn.Module, scripted: torch.jit.ScriptModule,
                               seconds: float) -> None:
    """Level, padding, mels, windows, network, mean, normalisation: numpy path and torch twins."""
    raw = voice(seconds, seed=int(seconds * 100), gain=0.004)
    expected = torch.from_numpy(encoder.embed_utterance(normalize_volume(raw, -30, increase_only=True)))
    audio, kept = speech_waveform(raw, FEATURES, VadConfig(enabled=False))
    padded, starts = layout(len(audio))
    mel = log_mel(np.pad(audio, (0, padded - len(audio))), FEATURES)
    numpy_path = embed_windows_at(ours, torch.from_numpy(mel), starts, WINDOWS.frames)
    wav = TorchLevel(FEATURES)(torch.from_numpy(raw))
    twin_mel = TorchLogMel(FEATURES)(F.pad(wav, (0, padded - wav.size(0))))
    torch_path = torch.jit.script(embed_windows_at)(scripted, twin_mel, starts, WINDOWS.frames)
    assert kept == 1.0
    for got in (numpy_path, torch_path):
        assert float(F.cosine_similarity(got, expected, dim=0)) >= MIN_COSINE
