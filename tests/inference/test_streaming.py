"""Streaming window embeddings (issue 11, point 2): ``Embedder.stream()`` and ``dvector embed --per-window -``.

The stream's windows are the offline ``per_window`` windows (no VAD): the same starts and ends, and
vectors equal up to float rounding (cosine >= 0.99999; the offline path batches windows and computes
all frames in one FFT call). Across chunk sizes the stream's output is identical bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dvector
from dvector.config import FeatureConfig, ModelConfig, TrainConfig, VadConfig
from dvector.demo.synth import random_voice, utterance
from dvector.errors import DvectorError
from dvector.nn.encoders import build_encoder
from dvector.training.checkpoint import save_checkpoint

SR = 16000
SEG_LEN = 40  # frames per window: a 1.7 s signal has several windows and a final one ending at its end


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stream") / "run"
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", hidden_size=24, embed_dim=16)
    model = build_encoder(cfg).eval()
    train_cfg = TrainConfig(seg_len=(SEG_LEN, SEG_LEN), n_speakers=4, n_utterances=3)
    state = {"step": 1, "model": model.state_dict(), "criterion": {}, "optimizer": {}, "scheduler": {},
             "model_config": cfg.to_dict(), "feature_config": FeatureConfig().to_dict(),
             "vad_config": VadConfig().to_dict(), "rng": {"torch": torch.get_rng_state()},
             "train_config": {k: list(v) if isinstance(v, tuple) else v for k, v in train_cfg.to_dict().items()},
             "loader": {"world": 1, "ranks": []}, "best_eer": None, "heldout_speakers": [], "loss": 1.0}
    save_checkpoint(state, folder, keep=5, best=False)
    return folder


def speech(seed: int, duration_s: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return utterance(random_voice(rng), duration_s, SR, rng, noise_db=-45.0).astype(np.float32)


def streamed(embedder: dvector.Embedder, wav: np.ndarray, chunk: int) -> list:
    stream = embedder.stream()
    out = []
    for i in range(0, wav.shape[0], chunk):
        out.extend(stream.push(wav[i:i + chunk]))
    out.extend(stream.flush())
    return out


def test_chunk_sizes_give_identical_windows_equal_to_offline(run: Path) -> None:
    embedder = dvector.load(run, threads=1)
    wav = speech(1, 1.2)
    n = wav.shape[0]
    whole = streamed(embedder, wav, n)
    for chunk in (1, 160, 7919):
        got = streamed(embedder, wav, chunk)
        assert [(w.start_s, w.end_s) for w in got] == [(w.start_s, w.end_s) for w in whole]
        assert all(np.array_equal(a.vector, b.vector) for a, b in zip(got, whole))
    vectors, starts, ends = embedder.per_window((wav, SR))
    assert len(whole) == len(vectors) >= 3
    np.testing.assert_allclose([w.start_s for w in whole], starts, rtol=0, atol=1e-12)
    np.testing.assert_allclose([w.end_s for w in whole], ends, rtol=0, atol=1e-12)
    cosines = np.sum(np.stack([w.vector for w in whole]) * vectors, axis=1)
    assert cosines.min() >= 0.99999
    assert ends[-1] == pytest.approx(n / SR)  # the last window ends at the end: it came from flush()
    other = embedder.per_window((speech(2, 1.2), SR)).vectors
    assert np.sum(np.stack([w.vector for w in whole])[:len(other)] * other[:len(whole)], axis=1).min() < 0.99999


def test_windows_come_out_as_soon_as_complete(run: Path) -> None:
    embedder = dvector.load(run, threads=1)
    features = embedder.features
    stream = embedder.stream()
    hop, L = features.hop_length, embedder.seg_len
    ready = (L - 1) * hop + features.fft_size - features.fft_size // 2  # the first window's last sample
    ready = max(ready, L * hop)
    wav = speech(3, 1.5)
    assert stream.push(wav[:ready - 1]) == []
    first = stream.push(wav[ready - 1:ready])
    assert [(w.start_s, w.end_s) for w in first] == [(0.0, L * hop / SR)]
    rest = stream.push(wav[ready:])
    assert len(stream.buffer) < (L + L // 2 + 4) * hop < wav.shape[0] // 2  # what no later window reads is gone
    rest += stream.flush()
    assert len(rest) >= 2
    with pytest.raises(DvectorError, match="flushed"):
        stream.push(wav[:10])


def test_short_stream_is_one_window_and_a_too_short_one_an_error(run: Path) -> None:
    embedder = dvector.load(run, threads=1)
    wav = speech(4, 0.2)[:3000]  # under L frames
    got = streamed(embedder, wav, 500)
    vectors, starts, ends = embedder.per_window((wav, SR))
    assert len(got) == len(vectors) == 1 and got[0].end_s == pytest.approx(ends[0])
    assert float(got[0].vector @ vectors[0]) >= 0.99999
    stream = embedder.stream()
    stream.push(np.zeros(100, np.float32))
    with pytest.raises(DvectorError, match="too short"):
        stream.flush()


def test_stdin_pcm_through_the_cli(run: Path) -> None:
    from typer.testing import CliRunner

    from dvector.cli import app

    embedder = dvector.load(run, threads=1)
    wav = speech(5, 1.2)
    pcm = np.clip(np.round(wav * 32768.0), -32768, 32767).astype("<i2")
    result = CliRunner().invoke(app, ["embed", str(run), "-", "--per-window"], input=pcm.tobytes())
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]  # stdout: JSON lines only
    expected = streamed(embedder, pcm.astype(np.float32) / 32768.0, 4096)
    assert len(lines) == len(expected) >= 3
    for line, window in zip(lines, expected):
        assert (line["start"], line["end"]) == (window.start_s, window.end_s)
        assert np.array_equal(np.asarray(line["vector"], dtype=np.float32), window.vector)
    odd = CliRunner().invoke(app, ["embed", str(run), "-", "--per-window"], input=pcm.tobytes() + b"\x01")
    assert odd.exit_code != 0
    no_window = CliRunner().invoke(app, ["embed", str(run), "-"], input=pcm.tobytes())
    assert no_window.exit_code != 0


def test_resampled_stream_is_close_to_offline(run: Path) -> None:
    embedder = dvector.load(run, threads=1)
    wav8k = speech(6, 1.2)[::2].copy()  # 8 kHz
    stream = embedder.stream(sample_rate=8000)
    got = list(stream.windows(np.array_split(wav8k, 7)))
    vectors, _, _ = embedder.per_window((wav8k, 8000))
    assert abs(len(got) - len(vectors)) <= 1
    k = min(len(got), len(vectors)) - 1  # the last window may differ by the resampler's tail
    assert np.sum(np.stack([w.vector for w in got[:k]]) * vectors[:k], axis=1).min() > 0.99
