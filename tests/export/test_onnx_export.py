"""ONNX export (issue 11, point 1): ``dvector.onnx`` run by onnxruntime against ``dvector.load(checkpoint)``.

Checkpoints of small widths with random weights (an LSTM with attention, the paper's projected LSTM
with "last" pooling, ECAPA-TDNN, the thin ResNet), synthetic speech under and over one window of L frames.
Float: cosine >= 0.999 required (measured >= 0.9999999); int8: runs and gives unit vectors. The graph's
VAD keeps the same frames as the numba kernels on these signals. Skipped where onnxruntime is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import dvector  # noqa: E402
from dvector.config import ModelConfig, VadConfig  # noqa: E402
from dvector.demo.synth import random_voice, utterance  # noqa: E402
from dvector.errors import DvectorError  # noqa: E402
from dvector.signal.vad import speech_frames  # noqa: E402
from dvector.export.onnx_graph import GraphVad, export_onnx, onnx_embed, onnx_session  # noqa: E402
from test_export_encoders import write_checkpoint  # noqa: E402

SR = 16000
CONFIGS = {"lstm": ModelConfig.preset("tiny", hidden_size=32, embed_dim=16),
           "paper": ModelConfig.preset("paper", hidden_size=24, proj_size=8, n_layers=2, embed_dim=8),
           "ecapa": ModelConfig.preset("ecapa", channels=16, embed_dim=32),
           "resnet": ModelConfig.preset("resnet34", channels=4, embed_dim=32)}
DURATIONS = (0.05, 2.3)  # after VAD: under L = 60 frames (the one-window path), several windows
QUANTIZE = {"lstm": "int8", "paper": None, "ecapa": "int8", "resnet": "int8"}  # paper (unrolled): float only


def speech(seed: int, duration_s: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return utterance(random_voice(rng), duration_s, SR, rng, noise_db=-45.0).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_onnx_matches_pytorch_and_int8_runs(tmp_path: Path, name: str) -> None:
    run = tmp_path / "run"
    write_checkpoint(run, CONFIGS[name], seed=1)
    written = export_onnx(run, tmp_path / "out", quantize=QUANTIZE[name])
    assert [p.name for p in written] == ["dvector.onnx", "dvector.int8.onnx"][:len(written)]
    model = onnx.load(str(written[0]))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}  # no custom operators
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["sample_rate"] == str(SR) and meta["embed_dim"] == str(CONFIGS[name].embed_dim)
    assert meta["dvector_version"] == dvector.__version__ and meta["model"] == CONFIGS[name].name

    torch_model = dvector.load(run / "checkpoints" / "latest.pt", threads=1)
    session = onnx_session(written[0])
    int8 = onnx_session(written[1]) if len(written) > 1 else None
    lengths = set()
    for i, duration in enumerate(DURATIONS):
        wav = speech(10 + i, duration)
        lengths.add(torch_model.mel((wav, SR)).shape[0] < torch_model.seg_len)
        expected = torch_model.embed((wav, SR))
        got = onnx_embed(session, wav)
        assert got.shape == expected.shape
        assert float(got @ expected) >= 0.999, (name, duration)
        if int8 is not None:
            quantized = onnx_embed(int8, wav)
            assert abs(float(np.linalg.norm(quantized)) - 1.0) < 1e-4
            assert float(quantized @ expected) > 0.9
    assert lengths == {True, False}  # both the short path and the windows were exercised
    other = speech(99, 1.0)
    assert float(onnx_embed(session, other) @ torch_model.embed((speech(10, DURATIONS[0]), SR))) < 0.999  # it can fail


def test_graph_vad_keeps_the_kernel_frames() -> None:
    """The closed-form VAD of the graph against the numba kernels, frame by frame."""
    cfg = VadConfig()
    vad = GraphVad(cfg, SR)
    rng = np.random.default_rng(3)
    signals = [speech(s, d) for s, d in ((1, 0.5), (2, 1.5), (3, 3.0))]
    t = np.arange(3 * SR) / SR
    signals.append((rng.standard_normal(t.size) * 10 ** (-3 + 2 * t / t[-1])).astype(np.float32))  # rising noise
    signals.append(np.concatenate([1e-3 * rng.standard_normal(SR), 0.3 * rng.standard_normal(SR // 2),
                                   1e-3 * rng.standard_normal(SR)]).astype(np.float32))  # a level step
    for wav in signals:
        expected, _ = speech_frames(wav, SR, cfg)
        got = vad.frame_mask(torch.from_numpy(wav)).numpy()
        assert got.shape == expected.shape
        assert np.array_equal(got, expected)


def test_cli_export_onnx_and_its_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dvector.cli import app

    run = tmp_path / "run"
    write_checkpoint(run, CONFIGS["lstm"], seed=2)
    result = CliRunner().invoke(app, ["export", str(run), "--format", "onnx", "-o", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x" / "dvector.onnx").is_file() and (tmp_path / "x" / "dvector.onnx.json").is_file()
    assert not (tmp_path / "x" / "dvector.int8.onnx").exists()
    with pytest.raises(DvectorError, match="int8"):
        export_onnx(run, tmp_path / "y", quantize="int4")
    bad = CliRunner().invoke(app, ["export", str(run), "--quantize", "int8", "-o", str(tmp_path / "z")])
    assert bad.exit_code != 0


REAL_DEV = Path(__file__).resolve().parents[3] / "shared" / "data" / "real-dev"


@pytest.mark.skipif(not REAL_DEV.is_dir(), reason=f"no real-dev recordings at {REAL_DEV}")
@pytest.mark.parametrize("name", ["lstm", "ecapa"])
def test_onnx_matches_pytorch_on_real_recordings(tmp_path: Path, name: str) -> None:
    """Real recordings of every corpus (8, 16 and 22.05 kHz files, resampled as `embed` does): cosine >= 0.999."""
    run = tmp_path / "run"
    write_checkpoint(run, CONFIGS[name], seed=2)
    written = export_onnx(run, tmp_path / "out")
    torch_model = dvector.load(run / "checkpoints" / "latest.pt", threads=1)
    session = onnx_session(written[0])
    files = [f for corpus in ("audiomnist_az", "emodb", "fsdd", "librispeech_test_other")
             for f in sorted((REAL_DEV / corpus).rglob("*.flac"))[:2]]
    assert len(files) == 8
    for path in files:
        wav = torch_model.waveform(path)  # decoded, mono, at the model's rate: what the graph takes
        cosine = float(onnx_embed(session, wav.astype(np.float32)) @ torch_model.embed(path))
        assert cosine >= 0.999, (path.name, cosine)
