"""The commands that use a trained model, through Typer's runner: embed, score, eval, export, visualize."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dvector.cli import app, main
from dvector.inference.embed_inputs import load_embeddings
from dvector.errors import DvectorError
from use_helpers import copy_run

runner = CliRunner()


@pytest.fixture
def run(trained, tmp_path: Path) -> Path:  # noqa: ANN001
    """A private copy of the trained run (commands write eval.json into it)."""
    return copy_run(trained.run, tmp_path / "run")


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def invoke(*args: str, error: bool = False):  # noqa: ANN201
    """Run a command; an unexpected exception is re-raised with its traceback. With ``error``, the
    command must fail with a DvectorError (which ``main`` turns into one line and exit status 1)."""
    result = runner.invoke(app, [str(a) for a in args])
    if error:
        assert result.exit_code == 1 and isinstance(result.exception, DvectorError), result.output
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_embed_command(trained, run: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "emb.npz"
    folder = trained.root / "spk002"
    result = invoke("embed", run, folder, trained.files[0], "-o", out, "--threads", "1")
    assert result.exit_code == 0, result.output
    vectors, info, times = load_embeddings(out)
    assert len(vectors) == 9 and not times
    assert info["step"] == 5 and info["path"].endswith("best.pt") and len(info["sha256"]) == 64
    assert all(np.isclose(np.linalg.norm(v), 1, atol=1e-5) for v in vectors.values())
    assert "9 embeddings" in flat(result.output)

    windows = tmp_path / "win.npz"
    result = invoke("embed", run, trained.files[0], "--per-window", "-o", windows, "--threads", "1")
    assert result.exit_code == 0, result.output
    vectors, info, times = load_embeddings(windows)
    (key,) = vectors
    assert info["per_window"] and vectors[key].ndim == 2 and times[key].shape == (len(vectors[key]), 2)

    shards = invoke("embed", run, trained.shards, "-o", tmp_path / "shards.npz", "--threads", "1")
    assert shards.exit_code == 0 and len(load_embeddings(tmp_path / "shards.npz")[0]) == len(trained.files)

    flac_only = invoke("embed", run, folder, "-e", "wav", "-o", tmp_path / "none.npz", error=True)
    assert "nothing was embedded" in str(flac_only.exception)


def test_score_eval_score(trained, run: Path, tmp_path: Path) -> None:  # noqa: ANN001
    a, b, c = trained.files[0], trained.files[1], trained.files[8]
    before = invoke("score", run, a, b, "--threads", "1")
    assert before.exit_code == 0, before.output
    assert "threshold 0.5000 (default)" in before.stdout and "default threshold" in flat(before.output)
    score = float(before.stdout.split()[1])
    assert -1 <= score <= 1

    result = invoke("eval", run, trained.root, "--n-nontarget", "300", "--threads", "1")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("EER=") and lines[-1].endswith("%")
    assert "minDCF" in result.stdout and "threshold" in result.stdout
    stored = json.loads((run / "eval.json").read_text())
    assert stored["n_nontarget"] == 300 and stored["model"]["step"] == 5
    assert float(lines[-1][4:-1]) == pytest.approx(100 * stored["eer"], abs=0.006)
    assert (run / "det.png").read_bytes()[:4] == b"\x89PNG"

    after = invoke("score", run, a, c, "--threads", "1")
    assert after.exit_code == 0
    assert f"threshold {stored['eer_threshold']:.4f}" in after.stdout and "eval.json" in after.stdout
    decision = "same speaker" if float(after.stdout.split()[1]) >= stored["eer_threshold"] else "different speakers"
    assert after.stdout.strip().endswith(decision)
    forced = invoke("score", run, a, b, "-t", "2")
    assert forced.stdout.strip().endswith("different speakers")


def test_eval_with_trials_file(trained, run: Path, tmp_path: Path) -> None:  # noqa: ANN001
    rel = [str(Path(f).relative_to(trained.root)) for f in trained.files]
    trials = tmp_path / "veri_test.txt"
    trials.write_text(f"1 {rel[0]} {rel[1]}\n0 {rel[0]} {rel[8]}\n1 {rel[8]} {rel[9]}\n0 {rel[1]} {rel[16]}\n")
    det = tmp_path / "pics" / "my_det.png"
    result = invoke("eval", run, trained.root, "--trials", trials, "--det", det, "--no-save")
    assert result.exit_code == 0, result.output
    assert "4 (2 target, 2 non-target) over 5 files" in result.stdout
    assert det.exists() and not (run / "eval.json").exists()
    trials.write_text(f"1 {rel[0]} {rel[1]}\n1 {rel[0]}\n")
    bad = invoke("eval", run, trained.root, "--trials", trials, error=True)
    assert "line 2" in str(bad.exception)


def test_export_command(trained, run: Path, tmp_path: Path) -> None:  # noqa: ANN001
    pytest.importorskip("dvector.export.torchscript")
    out = tmp_path / "exported"
    result = invoke("export", run, "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "dvector.pt").is_file() and (out / "dvector.json").is_file()
    # the exported bundle serves as MODEL for the other commands
    from_checkpoint = invoke("score", run, trained.files[0], trained.files[1], "-t", "0.5")
    from_export = invoke("score", out, trained.files[0], trained.files[1], "-t", "0.5")
    assert from_export.exit_code == 0, from_export.output
    assert float(from_export.stdout.split()[1]) == pytest.approx(float(from_checkpoint.stdout.split()[1]), abs=2e-3)
    invoke("export", tmp_path / "no-run", "-o", out, error=True)


def test_visualize_command(trained, run: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "tsne.png"
    result = invoke("visualize", run, trained.root, "-o", out, "--max-speakers", "10", "--per-speaker", "4",
                    "--threads", "1")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG" and "40 utterances of 10 speakers" in flat(result.output)


def test_user_errors_are_one_line(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(tmp_path / "no-run"), "a.wav", "b.wav"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error:" in err and "does not exist" in err and "Traceback" not in err
