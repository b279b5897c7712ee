"""Export round trip for the convolutional encoders (ECAPA-TDNN, thin ResNet-34): a checkpoint of each
(small widths, random weights) exported with ``export_model``, loaded with ``torch.jit.load``, embeds
a wav as ``dvector.load(checkpoint)`` does, and serves per-window embeddings through the export.

The utterances are longer than the segment length L, so every window has L frames on both paths
(the checkpoint path pads a window shorter than L, which a conv net does not ignore exactly).
Tolerance: cosine > 0.9999 (the export's torch log-mel differs from the numpy one by ~1e-5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dvector
from dvector.config import FeatureConfig, ModelConfig, TrainConfig, VadConfig
from dvector.demo.synth import random_voice, utterance
from dvector.nn.encoders import ENCODER_NAMES, build_encoder
from dvector.training.checkpoint import save_checkpoint
from dvector.inference.embedder import _scripted_network
from dvector.export.torchscript import export_model
from use_helpers import write_wav

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.(script|save|load|script_method)` is deprecated:DeprecationWarning"),
]

SR = 16000
FEATURES = FeatureConfig()
SEG_LEN = 60
CONFIGS = {"ECAPA": ModelConfig.preset("ecapa", channels=16, embed_dim=32),
           "ThinResNet": ModelConfig.preset("resnet34", channels=4, embed_dim=32)}


def write_checkpoint(run: Path, model_cfg: ModelConfig, seed: int) -> None:
    """A checkpoint with the keys ``dvector.training.loop`` writes (random weights, BN statistics moved
    off their defaults by a few training-mode batches, so that eval mode is not the identity)."""
    torch.manual_seed(seed)
    model = build_encoder(model_cfg).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, SEG_LEN, model_cfg.n_mels) * 3 + 1)
    model.eval()
    train_cfg = TrainConfig(seg_len=(SEG_LEN, SEG_LEN), n_speakers=4, n_utterances=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    state = {
        "step": 1, "model": model.state_dict(), "criterion": {"w": torch.tensor(10.0), "b": torch.tensor(-5.0)},
        "optimizer": optimizer.state_dict(), "scheduler": {}, "model_config": model_cfg.to_dict(),
        "train_config": {k: list(v) if isinstance(v, tuple) else v for k, v in train_cfg.to_dict().items()},
        "feature_config": FEATURES.to_dict(), "vad_config": VadConfig().to_dict(),
        "rng": {"torch": torch.get_rng_state()}, "loader": {"world": 1, "ranks": []},
        "best_eer": None, "heldout_speakers": [], "loss": 1.0,
    }
    save_checkpoint(state, run, keep=5, best=False)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_round_trip(tmp_path: Path, name: str) -> None:
    run = tmp_path / "run"
    write_checkpoint(run, CONFIGS[name], seed=3)
    path = export_model(run, tmp_path / "exported")
    scripted = torch.jit.load(str(path)).eval()
    inner = _scripted_network(scripted)
    assert inner is not None and inner.original_name == name and name in ENCODER_NAMES

    rng = np.random.default_rng(11)
    wav = utterance(random_voice(rng), 2.5, SR, rng, noise_db=-45.0)  # ~250 frames: several windows of 60
    wav_path = write_wav(tmp_path / "a.wav", wav)
    from_checkpoint = dvector.load(run / "checkpoints" / "latest.pt", threads=1)
    expected = from_checkpoint.embed(wav_path)
    with torch.no_grad():
        got = scripted(torch.from_numpy(from_checkpoint.waveform(wav_path))).numpy()
    assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5
    assert cosine(got, expected) > 0.9999

    from_export = dvector.load(path, threads=1)
    assert cosine(from_export.embed(wav_path), expected) > 0.9999
    windows, ref_windows = from_export.per_window(wav_path), from_checkpoint.per_window(wav_path)
    assert windows.vectors.shape == ref_windows.vectors.shape and windows.vectors.shape[0] >= 3
    np.testing.assert_allclose(windows.starts_s, ref_windows.starts_s)
    for row, ref_row in zip(windows.vectors, ref_windows.vectors):
        assert cosine(row, ref_row) > 0.9999
    write_checkpoint(tmp_path / "other", CONFIGS[name], seed=4)  # another checkpoint differs: the test can fail
    other = dvector.load(tmp_path / "other" / "checkpoints" / "latest.pt", threads=1)
    assert cosine(other.embed(wav_path), expected) < 0.999


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_an_utterance_shorter_than_a_window_embeds_alike_from_checkpoint_and_export(tmp_path: Path, name: str) -> None:
    """Under L frames: the checkpoint's embedder must not zero-pad a convolutional encoder's input (the
    export does not), or the convolutions near the end read the zeros and the two disagree."""
    run = tmp_path / "run"
    write_checkpoint(run, CONFIGS[name], seed=3)
    path = export_model(run, tmp_path / "exported")
    rng = np.random.default_rng(5)
    wav_path = write_wav(tmp_path / "short.wav", utterance(random_voice(rng), 0.35, SR, rng, noise_db=-45.0))
    from_checkpoint = dvector.load(run / "checkpoints" / "latest.pt", threads=1)
    assert from_checkpoint.mel(wav_path).shape[0] < from_checkpoint.seg_len
    assert cosine(dvector.load(path, threads=1).embed(wav_path), from_checkpoint.embed(wav_path)) > 0.99999
