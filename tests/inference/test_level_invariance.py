"""Level invariance: scaling a recording by 0.1 to 10 leaves its embedding (almost) unchanged.

The network subtracts each input row's log-mel mean over time (``ModelConfig.input_norm="mean"``),
so a gain on the waveform, a constant in every log-mel bin, never reaches the LSTM. Checked through
``Embedder.embed`` of an in-memory model, of a checkpoint, and of its TorchScript export.

Choice of levels: the waveforms are float32 arrays (and a float WAV file), which have no clip
point, so a gain of 10 on a peak of 0.5 is kept exactly. The VAD is level-relative (an adaptive
noise floor) except for one absolute floor: frames below ``VadConfig.min_level_db`` (-55 dBFS) are
never speech. The background noise is put at -30 dBFS, so that even at a gain of 0.1 (noise at
-50 dBFS, speech about 20 dB higher) every frame the relative rule calls speech lies well above that
floor: the floor decides nothing, and the VAD keeps the same frames at every level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import dvector
from dvector.config import FeatureConfig, ModelConfig, TrainConfig, VadConfig
from dvector.demo.synth import random_voice, utterance
from dvector.nn.model import DVector
from dvector.training.checkpoint import save_checkpoint
from dvector.inference.bundle import load_exported
from dvector.inference.embedder import Embedder
from dvector.export.torchscript import export_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.(script|save|load)` is deprecated:DeprecationWarning"),
]

GAINS = (0.1, 0.2, 0.5, 2.0, 5.0, 10.0)
SEG_LEN = 60  # short windows: a 3 s utterance spans several, so the windowing is exercised too
NOISE_DB = -30.0  # see the module docstring: keeps every speech frame far above the VAD's -55 dBFS floor


def recording(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wav = utterance(random_voice(rng), 3.0, 16000, rng, noise_db=NOISE_DB)
    assert np.abs(wav).max() < 0.8  # the base level; x10 is kept exactly in float32 (no clipping)
    return wav


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(1.0 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def tiny_model(input_norm: str, seed: int = 0) -> DVector:
    torch.manual_seed(seed)
    return DVector(ModelConfig.preset("tiny", input_norm=input_norm)).eval()


def write_run(run: Path, model: DVector, model_config: dict) -> None:
    """A checkpoint with the keys the training loop writes, holding ``model``'s weights."""
    train_cfg = TrainConfig(seg_len=(SEG_LEN, SEG_LEN), n_speakers=4, n_utterances=3)
    state = {
        "step": 1, "model": model.state_dict(), "criterion": {"w": torch.tensor(10.0), "b": torch.tensor(-5.0)},
        "optimizer": {}, "scheduler": {}, "model_config": model_config,
        "train_config": {k: list(v) if isinstance(v, tuple) else v for k, v in train_cfg.to_dict().items()},
        "feature_config": FeatureConfig().to_dict(), "vad_config": VadConfig().to_dict(),
        "rng": {"torch": torch.get_rng_state()}, "loader": {"world": 1, "ranks": []},
        "best_eer": None, "heldout_speakers": [], "loss": 1.0,
    }
    save_checkpoint(state, run, keep=2, best=False)


def test_the_vad_keeps_the_same_frames_at_every_gain() -> None:
    embedder = Embedder.from_model(tiny_model("mean"), seg_len=SEG_LEN)
    wav = recording()
    base = embedder.mel((wav, 16000))
    for gain in GAINS:
        mel = embedder.mel((wav * np.float32(gain), 16000))
        assert mel.shape == base.shape
        # a gain g adds 2 ln g to every log-power bin (up to float rounding)
        np.testing.assert_allclose(mel - base, np.full_like(base, 2 * np.log(gain)), atol=2e-3)


def test_embed_is_level_invariant_and_none_is_not() -> None:
    wav = recording()
    for input_norm, invariant in (("mean", True), ("none", False)):
        embedder = Embedder.from_model(tiny_model(input_norm), seg_len=SEG_LEN)
        base = embedder.embed((wav, 16000))
        distances = [cosine_distance(base, embedder.embed((wav * np.float32(g), 16000))) for g in GAINS]
        if invariant:
            assert max(distances) < 1e-3, distances
        else:  # the check can fail: without the normalisation, the level does change the embedding
            assert max(distances) > 1e-3, distances


def test_checkpoint_and_export_are_level_invariant(tmp_path: Path) -> None:
    model = tiny_model("mean", seed=1)
    run = tmp_path / "run"
    write_run(run, model, ModelConfig.preset("tiny").to_dict())
    export_model(run, tmp_path / "export")
    wav = recording(seed=5)
    for path in (run, tmp_path / "export"):
        embedder = dvector.load(path)
        base = embedder.embed((wav, 16000))
        for gain in GAINS:
            assert cosine_distance(base, embedder.embed((wav * np.float32(gain), 16000))) < 1e-3, (path, gain)
    # the exported module itself, called as a user would, and a float WAV file (no clip point)
    scripted = torch.jit.load(str(tmp_path / "export" / "dvector.pt"))
    base = scripted(torch.from_numpy(wav)).numpy()
    for gain in GAINS:
        assert cosine_distance(base, scripted(torch.from_numpy(wav * np.float32(gain))).numpy()) < 1e-3, gain
    loud, quiet = tmp_path / "loud.wav", tmp_path / "quiet.wav"
    sf.write(str(loud), wav * np.float32(10.0), 16000, subtype="FLOAT")  # float WAV: peaks above 1 kept
    sf.write(str(quiet), wav * np.float32(0.1), 16000, subtype="FLOAT")
    embedder = dvector.load(tmp_path / "export")
    assert cosine_distance(embedder.embed(loud), embedder.embed(quiet)) < 1e-3


def test_old_checkpoint_loads_with_its_old_behaviour(tmp_path: Path) -> None:
    """A checkpoint saved before ``input_norm`` existed has no such field: it loads as "none", and
    its embeddings are what the raw log-mels give (the same numbers as a "none" network)."""
    model = tiny_model("none", seed=2)
    old_config = ModelConfig.preset("tiny").to_dict()
    del old_config["input_norm"]
    run = tmp_path / "old"
    write_run(run, model, old_config)
    embedder = dvector.load(run)
    assert embedder.model.config.input_norm == "none"
    wav = recording(seed=7)
    expected = Embedder.from_model(model, seg_len=SEG_LEN).embed((wav, 16000))
    np.testing.assert_array_equal(embedder.embed((wav, 16000)), expected)
    export_model(run, tmp_path / "export")
    _, meta = load_exported(tmp_path / "export")
    assert meta["model"]["input_norm"] == "none"
    exported = dvector.load(tmp_path / "export")
    np.testing.assert_allclose(exported.embed((wav, 16000)), expected, atol=1e-4)
