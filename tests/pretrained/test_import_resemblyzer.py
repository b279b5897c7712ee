"""``dvector import resemblyzer``: Resemblyzer's encoder as a run folder that the other commands take,
equal to Resemblyzer's own embeddings, and usable without resemblyzer, librosa and webrtcvad."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from dvector.cli import app
from dvector.config import VadConfig
from dvector.demo.synth import random_voice, utterance
from dvector.errors import DvectorError
from dvector.training.checkpoint import load_checkpoint

resemblyzer = pytest.importorskip("resemblyzer")

from dvector.pretrained.resemblyzer import import_resemblyzer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
runner = CliRunner()
RATE = 16000


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("rz") / "run"
    result = runner.invoke(app, ["import", "resemblyzer", "-o", str(run)])
    assert result.exit_code == 0, result.output
    assert "imported Resemblyzer" in result.output
    return run


def voice(seconds: float, seed: int, gain: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wav = utterance(random_voice(rng), seconds, RATE, rng)
    return (gain * wav / np.abs(wav).max()).astype(np.float32)


def test_the_run_records_the_network_front_end_windows_and_source(imported: Path) -> None:
    state = load_checkpoint(imported / "checkpoints" / "latest.pt")
    assert state["step"] == 0 and state["model_config"]["name"] == "resemblyzer"
    assert state["feature_config"]["mel_scale"] == "slaney" and state["feature_config"]["raise_to_dbfs"] == -30.0
    assert state["window_config"]["layout"] == "partials" and state["window_config"]["frames"] == 160
    record = state["imported"]
    assert record["from"] == "resemblyzer" and len(record["sha256"]) == 64 and record["license"] == "Apache-2.0"
    ours = {k: v for k, v in state["model"].items()}
    theirs = torch.load(Path(resemblyzer.__file__).parent / "pretrained.pt", map_location="cpu",
                        weights_only=True)["model_state"]
    assert torch.equal(ours["lstm.weight_hh_l2"], theirs["lstm.weight_hh_l2"])
    assert torch.equal(ours["embedding.weight"], theirs["linear.weight"])


@pytest.mark.parametrize("seconds", [0.9, 2.3, 5.0])
def test_embed_equals_resemblyzer_on_untrimmed_audio(imported: Path, seconds: float) -> None:
    """With VAD off on our side and no trimming on theirs, the whole chain is one computation."""
    from resemblyzer import VoiceEncoder
    from resemblyzer.audio import normalize_volume

    wav = voice(seconds, seed=int(seconds * 10))
    embedder = __import__("dvector").load(imported, threads=1)
    embedder.vad = VadConfig(enabled=False)
    ours = embedder.embed((wav, RATE))
    theirs = VoiceEncoder("cpu", verbose=False).embed_utterance(normalize_volume(wav, -30, increase_only=True))
    assert float(ours @ theirs) >= 0.9999


def test_a_second_import_into_the_same_folder_is_refused(imported: Path) -> None:
    with pytest.raises(DvectorError, match="already holds checkpoints"):
        import_resemblyzer(imported)
    result = runner.invoke(app, ["import", "resemblyzer", "-o", str(imported), "--overwrite"])
    assert result.exit_code == 0, result.output


def test_unknown_source_and_bad_weights_are_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["import", "speechbrain", "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and isinstance(result.exception, DvectorError)
    assert "dvector imports: resemblyzer" in str(result.exception)
    bad = tmp_path / "bad.pt"
    torch.save({"model_state": {"lstm.weight_ih_l0": torch.zeros(3)}}, bad)
    with pytest.raises(DvectorError, match="not Resemblyzer's voice encoder"):
        import_resemblyzer(tmp_path / "y", weights=bad)
    assert not (tmp_path / "y" / "checkpoints").exists()


def test_every_command_takes_the_import(imported: Path, tmp_path: Path) -> None:
    """embed (and --per-window), eval, diarize and visualize run on the imported run like on a trained one."""
    root = tmp_path / "root"
    for s in range(3):
        (root / f"spk{s}").mkdir(parents=True)
        rng = np.random.default_rng(100 + s)
        v = random_voice(rng)
        for u in range(3):
            sf.write(root / f"spk{s}" / f"u{u}.wav", 0.05 * utterance(v, 1.8, RATE, rng), RATE)
    for args in (["embed", imported, root, "-o", tmp_path / "e.npz", "--threads", "1"],
                 ["embed", imported, root, "-o", tmp_path / "w.npz", "--per-window", "--threads", "1"],
                 ["eval", imported, root, "--threads", "1", "--no-save"],
                 ["diarize", imported, root / "spk0" / "u0.wav", "-o", tmp_path / "rttm", "--threads", "1"]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, (args, result.output, result.exception)
    vectors = np.load(tmp_path / "e.npz")
    assert len([k for k in vectors.files if not k.startswith("__")]) == 9
    assert (tmp_path / "rttm" / "u0.rttm").is_file()


def test_the_import_works_without_resemblyzer_librosa_and_webrtcvad(imported: Path, tmp_path: Path) -> None:
    wav = tmp_path / "a.wav"
    sf.write(wav, voice(2.0, seed=3), RATE)
    code = (
        "import sys\n"
        "for name in ('resemblyzer', 'librosa', 'webrtcvad'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        "import dvector\n"
        f"e = dvector.load({str(imported)!r}, threads=1)\n"
        f"v = e.embed({str(wav)!r})\n"
        "assert v.shape == (256,) and abs(float((v * v).sum()) - 1) < 1e-5\n"
        "assert not any(sys.modules.get(n) for n in ('resemblyzer', 'librosa', 'webrtcvad'))\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_missing_package_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "resemblyzer", None)  # find_spec then raises: as if not installed
    result = runner.invoke(app, ["import", "resemblyzer", "-o", str(tmp_path / "z")])
    assert result.exit_code == 1 and isinstance(result.exception, DvectorError)
    assert "pip install 'dvector[resemblyzer]'" in str(result.exception)


def test_a_stream_of_the_import_raises_the_level_whatever_the_chunks(imported: Path) -> None:
    """The import's level raise in a stream: the same vectors for any chunking, the last window's equal to
    the offline one (both see the whole stream's level), and a quiet stream embedded as a loud one."""
    embedder = __import__("dvector").load(imported, threads=1)
    wav = voice(4.0, seed=11, gain=0.005)  # far under -30 dBFS
    whole = [w.vector for w in embedder.stream().windows([wav])]
    chunked = [w.vector for w in embedder.stream().windows(np.array_split(wav, 37))]
    assert len(whole) == len(chunked) and all(np.array_equal(a, b) for a, b in zip(whole, chunked))
    offline = embedder.per_window((wav, RATE)).vectors
    assert float(whole[-1] @ offline[-1]) >= 0.9999
    loud = [w.vector for w in embedder.stream().windows([wav * 5])]  # still under -30 dBFS: raised alike
    assert float(whole[-1] @ loud[-1]) >= 0.9999


@pytest.mark.slow
def test_fine_tuning_the_import_end_to_end(imported: Path, tmp_path: Path) -> None:
    """build-shards --features IMPORT, then train --init IMPORT (default augmentation, frozen encoder
    first): the shards hold the import's features, default-feature shards are refused in one line,
    the encoder starts as the import's and moves once unfrozen."""
    root = tmp_path / "corpus"
    result = runner.invoke(app, ["synth", str(root), "--speakers", "6", "--utterances", "4"])
    assert result.exit_code == 0, result.output
    shards, plain = tmp_path / "shards", tmp_path / "plain"
    for args in (["build-shards", root, "-o", shards, "--features", imported, "-j", "1"],
                 ["build-shards", root, "-o", plain, "-j", "1"]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    import json
    index = json.loads((shards / "index.json").read_text())
    assert index["config"]["features"]["mel_scale"] == "slaney"

    common = ["--init", str(imported), "-n", "3", "-m", "2", "-l", "120", "--threads", "1", "-w", "0",
              "--lr", "1e-4", "--optimizer", "adam", "--valid-every", "1000"]
    refused = runner.invoke(app, ["train", str(plain), str(tmp_path / "bad"), "-i", "1", *common])
    assert refused.exit_code == 1 and "--features" in str(refused.exception)
    run = tmp_path / "tuned"
    result = runner.invoke(app, ["train", str(shards), str(run), "-i", "2", "-s", "2", "--freeze-steps", "2", *common])
    assert result.exit_code == 0, (result.output, result.exception)
    start = load_checkpoint(imported / "checkpoints" / "latest.pt")["model"]
    frozen = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert frozen["init"]["sha256"] and all(torch.equal(frozen["model"][k], v) for k, v in start.items())
    result = runner.invoke(app, ["train", str(shards), str(run), "-i", "4", "-s", "2", "-c", str(run),
                                 "--freeze-steps", "2", *common])
    assert result.exit_code == 0, (result.output, result.exception)
    moved = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert moved["step"] == 4 and not torch.equal(moved["model"]["lstm.weight_ih_l0"], start["lstm.weight_ih_l0"])
