"""The demo in its reduced size, through the CLI as a user runs it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dvector.cli import app


@pytest.mark.slow
def test_small_demo_runs_every_stage_and_training_helps(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--small", "-o", str(out)])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("EER=") and last.endswith("%"), last
    trained = float(last[len("EER="):-1]) / 100
    for name in ("tsne.png", "det.png", "run/checkpoints/latest.pt", "run/eval.json", "shards/index.json"):
        assert (out / name).exists(), name
    stored = json.loads((out / "run" / "eval.json").read_text())
    assert stored["eer"] == pytest.approx(trained, abs=5e-5)
    untrained = float(result.output.split("untrained network: EER ")[1].split("%")[0]) / 100
    assert trained < untrained


def test_synth_writes_nested_speaker_folders(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "root"), "--speakers", "2", "--utterances", "3",
                                      "--layout", "nested", "--prefix", "id", "--format", "wav"])
    assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(tmp_path / "root").as_posix() for p in (tmp_path / "root").rglob("*.wav"))
    assert len(files) == 6
    assert all(f.startswith(("id000/session", "id001/session")) for f in files), files


def test_synth_rejects_an_unknown_layout(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "root"), "--layout", "deep"])
    assert result.exit_code == 1
    assert "--layout" in result.output
