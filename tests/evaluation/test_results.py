"""Where `eval` stores results and the DET curve, and how `score` picks its threshold and decides:
the decisions the CLI leaves to ``dvector.evaluation.results``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dvector.evaluation.evaluate import compute_metrics
from dvector.evaluation.results import (DEFAULT_THRESHOLD, DET_FILE, EVAL_FILE, NO_DET_NOTE, Decision, Threshold,
                                 choose_threshold, decide, eval_outputs, run_eval, write_eval)
from use_helpers import copy_run


# ---- where eval writes ---------------------------------------------------------------------------

def test_eval_outputs_of_a_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    mine = tmp_path / "pics" / "mine.png"
    assert eval_outputs(run) == (run / EVAL_FILE, run / DET_FILE)
    assert eval_outputs(run / "checkpoints" / "best.pt") == (run / EVAL_FILE, run / DET_FILE)
    assert eval_outputs(run, det=mine) == (run / EVAL_FILE, mine)
    assert eval_outputs(run, save=False) == (None, None)
    assert eval_outputs(run, det=mine, save=False) == (None, mine)
    # an untrained baseline stores nothing, but draws the DET curve it is asked for
    assert eval_outputs(run, untrained=True) == (None, None)
    assert eval_outputs(run, det=str(mine), untrained=True) == (None, mine)


def test_eval_outputs_of_files(tmp_path: Path) -> None:
    lone = tmp_path / "model.pt"
    assert eval_outputs(lone) == (None, None)  # nowhere to store: the CLI says to give --det
    assert eval_outputs(lone, det=tmp_path / "d.png") == (None, tmp_path / "d.png")
    exported = tmp_path / "exported" / "dvector.pt"
    assert eval_outputs(exported) == (exported.parent / EVAL_FILE, exported.parent / DET_FILE)
    (tmp_path / EVAL_FILE).write_text("{}")  # an eval.json beside a file: that one
    assert eval_outputs(lone) == (tmp_path / EVAL_FILE, tmp_path / DET_FILE)


def test_run_eval_writes_results_first_then_the_det_curve(trained, small_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import dvector.evaluation.results as results

    run = copy_run(trained.run, tmp_path / "run")
    real_save_det = results.save_det
    order = []

    def save_det(evaluation, path):  # noqa: ANN001, ANN202
        order.append(("det", (run / EVAL_FILE).is_file()))
        return real_save_det(evaluation, path)

    monkeypatch.setattr(results, "save_det", save_det)
    done = run_eval(run, small_root, n_nontarget=20, threads=0)
    assert order == [("det", True)]
    assert (done.results_path, done.det_path, done.note) == (run / EVAL_FILE, run / DET_FILE, None)
    stored = json.loads((run / EVAL_FILE).read_text())
    assert stored["det"] == str(run / DET_FILE) and stored["eer"] == pytest.approx(done.result.eer)
    assert stored["n_nontarget"] == 20 and stored["model"]["step"] == 5
    assert (run / DET_FILE).read_bytes()[:4] == b"\x89PNG"


def test_run_eval_untrained_and_unstorable(trained, small_root: Path, tmp_path: Path) -> None:  # noqa: ANN001
    run = copy_run(trained.run, tmp_path / "run")
    baseline = run_eval(run, small_root, untrained=True, n_nontarget=20, threads=1)
    assert (baseline.results_path, baseline.det_path, baseline.note) == (None, None, None)
    assert not (run / EVAL_FILE).exists() and not (run / DET_FILE).exists()
    assert baseline.result.model["kind"] == "model"  # the in-memory twin, not the checkpoint

    lone = tmp_path / "elsewhere" / "model.pt"
    lone.parent.mkdir()
    shutil.copy(run / "checkpoints" / "best.pt", lone)
    nowhere = run_eval(lone, small_root, n_nontarget=20)
    assert (nowhere.results_path, nowhere.det_path, nowhere.note) == (None, None, NO_DET_NOTE)
    assert sorted(p.name for p in lone.parent.iterdir()) == ["model.pt"]


# ---- score: the threshold and the decision -------------------------------------------------------

def test_choose_threshold(trained, tmp_path: Path) -> None:  # noqa: ANN001
    run = copy_run(trained.run, tmp_path / "run")
    default = choose_threshold(run)
    assert (default.value, default.source, default.stored) == (DEFAULT_THRESHOLD, "default", False)
    assert "dvector eval" in default.note
    forced = choose_threshold(run, override=0.25)
    assert forced == Threshold(0.25, "--threshold", True, None)  # no warning: the user chose it
    (run / EVAL_FILE).write_text(json.dumps({"eer_threshold": 0.3125, "eer": 0.1}))
    stored = choose_threshold(run)
    assert stored.stored and stored.value == 0.3125 and stored.source == f"{run / EVAL_FILE}, EER 10.00%"
    assert choose_threshold(run, override=0.9).value == 0.9  # the override wins over the stored one


def test_decision_at_the_threshold() -> None:
    at = Threshold(0.5, "default", False)
    assert Decision(0.5, at).same and Decision(0.5, at).text == "same speaker"
    assert not Decision(0.4999, at).same and Decision(0.4999, at).text == "different speakers"


def test_decide(trained, tmp_path: Path) -> None:  # noqa: ANN001
    from dvector.inference.embedder import load

    run = copy_run(trained.run, tmp_path / "run")
    embedder = load(run, threads=1)
    a, b = trained.files[0], trained.files[1]
    default = decide(embedder, a, b, run)
    assert -1 <= default.score <= 1 and default.threshold.value == DEFAULT_THRESHOLD and default.threshold.note
    assert decide(embedder, a, b, run, threshold=2.0).text == "different speakers"
    assert decide(embedder, a, b, run, threshold=-2.0).text == "same speaker"

    result = compute_metrics(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0]))
    result.model = {"sha256": embedder.info["sha256"], "step": 5}
    write_eval(run / EVAL_FILE, result)
    stored = decide(embedder, a, b, run)
    assert stored.threshold.stored and stored.threshold.value == pytest.approx(result.eer_threshold)
    assert stored.threshold.note is None and stored.score == pytest.approx(default.score)
