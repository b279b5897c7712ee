"""Exports of the Resemblyzer import (issue "transfer"): the TorchScript and ONNX exports of
``dvector import resemblyzer`` equal the PyTorch run (``dvector.load(RUN).embed``), as for the other presets.

The import's front end is the one the other presets do not use: the level raised to -30 dBFS (the
waveforms below are quiet, so it is raised), the VAD's frame energy around each frame's mean
(``remove_dc``; one waveform carries a DC offset louder than its speech), zero padding, Slaney mels of
power (no log) and Resemblyzer's partial windows (the speech zero-padded to the end of its last window).

Bars, as for the other presets (measured values in parentheses):
- the torch twins of level and VAD: the samples handed to the features identical to the package's;
- TorchScript module and ``dvector.load(export)`` vs the run: cosine > 0.9999 and max abs difference
  < 1e-4 (tests/export/test_export.py's; measured 1 - 1e-7 and 4e-7);
- ONNX (onnxruntime) vs the run: cosine >= 0.999 (tests/export/test_onnx_export.py's; measured 1 - 1e-7);
  the graph's VAD keeps the numba kernels' frames; int8: unit length and cosine > 0.9 (measured >= 0.99).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import dvector
from dvector.config import FeatureConfig, VadConfig
from dvector.demo.synth import random_voice, utterance
from dvector.export.torchscript import export_model
from dvector.signal.features import raise_level
from dvector.signal.process import SkipUtterance, speech_waveform
from dvector.signal.torch_frontend import TorchVad
from dvector.signal.vad import frame_energy_db, speech_frames

pytest.importorskip("resemblyzer")

from dvector.pretrained.resemblyzer import import_resemblyzer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

SR = 16000
FEATURES = FeatureConfig.preset("resemblyzer")
VAD = VadConfig.preset("resemblyzer")


def voice(seconds: float, seed: int, peak: float, dc: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wav = utterance(random_voice(rng), seconds, SR, rng, noise_db=-50.0)
    return (peak * wav / np.abs(wav).max() + dc).astype(np.float32)


WAVES = {  # quiet (peaks of -50 to -40 dBFS: raised to -30 dBFS RMS), over and under one partial window
    "0.8s": voice(0.8, seed=1, peak=0.003),
    "2.5s": voice(2.5, seed=2, peak=0.01),
    "6s": voice(6.0, seed=3, peak=0.002),
    "2.5s_dc": voice(2.5, seed=4, peak=0.01, dc=0.005),  # a DC offset: the VAD keeps 64% (100% without remove_dc)
    "1.5s_dc_only": voice(1.5, seed=5, peak=0.005, dc=0.02),  # no speech above the DC: the whole raised input
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("import") / "rz"
    import_resemblyzer(folder)
    return folder


@pytest.fixture(scope="module")
def expected(run: Path) -> dict[str, np.ndarray]:
    """The PyTorch run's embeddings: the reference every export is held to."""
    reference = dvector.load(run, threads=1)
    assert reference.windows.layout == "partials" and reference.features.raise_to_dbfs == -30.0
    return {name: reference.embed((wav, SR)) for name, wav in WAVES.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_waveforms_exercise_level_dc_and_windows() -> None:
    for name, wav in WAVES.items():
        assert not np.array_equal(raise_level(wav, -30.0), wav), name  # every one is raised
    dc = raise_level(WAVES["2.5s_dc"], -30.0)
    assert speech_frames(dc, SR, VAD)[0].mean() < 0.7  # the VAD's remove_dc decides frames here ...
    assert speech_frames(dc, SR, VadConfig.preset("resemblyzer", remove_dc=False))[0].all()  # ... all kept without it
    with pytest.raises(SkipUtterance):
        speech_waveform(WAVES["1.5s_dc_only"], FEATURES, VAD)  # the embedding falls back to the raised input


@pytest.mark.parametrize("n", [1, 159, 160, 161, 16000, 23457])
def test_frame_energy_with_remove_dc_equals_the_kernel(n: int) -> None:
    rng = np.random.default_rng(n)
    wav = (rng.standard_normal(n) * 10 ** rng.uniform(-5, 0) + rng.uniform(-0.3, 0.3)).astype(np.float32)
    for remove_dc in (False, True):
        twin = TorchVad(VadConfig(remove_dc=remove_dc), SR)
        assert np.array_equal(twin.frame_energy_db(torch.from_numpy(wav)).numpy(), frame_energy_db(wav, 160, remove_dc))


def test_graph_partial_layout_equals_partial_windows() -> None:
    from dvector.config import WindowConfig
    from dvector.export.onnx_frontend import partial_layout
    from dvector.signal.windows import partial_windows

    for windows in (WindowConfig.preset("resemblyzer"), WindowConfig.preset("resemblyzer", frames=100, min_coverage=1.0)):
        step = windows.step_frames(FEATURES)
        for n in [*range(400, 30000, 97), 25600, 25599, 12320, 12321, 37920, 160 * 3000]:
            padded, starts = partial_layout(torch.tensor(n), FEATURES.hop_length, windows, step)
            expected_padded, expected_starts = partial_windows(n, FEATURES.hop_length, windows.frames, step,
                                                               windows.min_coverage)
            assert (int(padded), starts.tolist()) == (expected_padded, expected_starts), (n, windows)


def test_torchscript_export_equals_the_run(run: Path, tmp_path: Path, expected: dict[str, np.ndarray],
                                          one_torch_thread: None) -> None:
    path = export_model(run, tmp_path / "ts")
    record = json.loads((tmp_path / "ts" / "dvector.json").read_text())
    assert record["window_config"]["layout"] == "partials" and record["features"]["raise_to_dbfs"] == -30.0
    assert "partial windows" in (tmp_path / "ts" / "README.txt").read_text()
    module = torch.jit.load(str(path)).eval()
    from_export = dvector.load(tmp_path / "ts", threads=1)
    assert from_export.windows.layout == "partials"
    with torch.jit.optimized_execution(False):  # the profiling executor's first runs would optimise it for each length
        for name, wav in WAVES.items():
            try:
                speech, _ = speech_waveform(wav, FEATURES, VAD)  # level, then the numba VAD with remove_dc
            except SkipUtterance:
                speech = raise_level(wav, -30.0)  # too little speech: the whole input, raised (both paths)
            assert np.array_equal(module.speech(torch.from_numpy(wav)).numpy(), speech), name
            got = module(torch.from_numpy(wav)).numpy()
            assert cosine(got, expected[name]) > 0.9999 and float(np.abs(got - expected[name]).max()) < 1e-4, name
            loaded = from_export.embed((wav, SR))
            assert cosine(loaded, expected[name]) > 0.9999 and float(np.abs(loaded - expected[name]).max()) < 1e-4
    assert cosine(expected["2.5s"], expected["2.5s_dc"]) < 0.9999  # the bar can fail


def test_onnx_export_and_int8_equal_the_run(run: Path, tmp_path: Path, expected: dict[str, np.ndarray]) -> None:
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from dvector.cli import app
    from dvector.export.onnx_frontend import GraphLevel
    from dvector.export.onnx_graph import GraphVad, onnx_embed, onnx_session

    out = tmp_path / "onnx"
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(out), "--format", "onnx", "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "dvector.onnx.json").read_text())
    assert record["window_config"]["layout"] == "partials" and record["int8_file"] == "dvector.int8.onnx"
    meta = {p.key: p.value for p in onnx.load(str(out / "dvector.onnx")).metadata_props}
    assert json.loads(meta["windows"])["layout"] == "partials" and json.loads(meta["features"])["compression"] == "none"
    session, int8 = onnx_session(out / "dvector.onnx"), onnx_session(out / "dvector.int8.onnx")
    vad, level = GraphVad(VAD, SR), GraphLevel(FEATURES)
    for name, wav in WAVES.items():
        raised = raise_level(wav, -30.0)
        assert np.array_equal(level(torch.from_numpy(wav)).numpy(), raised), name
        assert np.array_equal(vad.frame_mask(torch.from_numpy(raised)).numpy(), speech_frames(raised, SR, VAD)[0]), name
        got = onnx_embed(session, wav)
        assert got.shape == expected[name].shape and cosine(got, expected[name]) >= 0.999, name
        quantized = onnx_embed(int8, wav)
        assert abs(float(np.linalg.norm(quantized)) - 1.0) < 1e-4
        assert cosine(quantized, expected[name]) > 0.9, name
