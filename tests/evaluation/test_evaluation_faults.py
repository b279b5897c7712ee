"""Faults met when evaluating: a model folder that cannot be written to, and trials that name
files outside the root."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from dvector.errors import DvectorError
from dvector.evaluation import results
from dvector.evaluation.evaluate import Trial, check_trial_files, evaluate, parse_trials, read_trials
from dvector.evaluation.results import DET_FILE, EVAL_FILE, run_eval
from use_helpers import copy_run

RATE = 16000


# ---- eval in a model folder that cannot be written -------------------------------------------------

@pytest.mark.parametrize("error", [OSError(errno.EROFS, "Read-only file system"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_eval_into_a_read_only_model_folder_keeps_its_results(error: OSError, trained, small_root: Path,  # noqa: ANN001
                                                              tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    run = copy_run(trained.run, tmp_path / "run")

    def refuse(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise error

    monkeypatch.setattr(results, "write_output", refuse)
    monkeypatch.setattr(results, "save_det", refuse)
    done = run_eval(run, small_root, n_nontarget=20, threads=1)
    assert 0 <= done.result.eer <= 1 and done.result.n_target == 9
    assert (done.results_path, done.det_path) == (None, None)
    assert len(done.warnings) == 2
    assert done.warnings[0].startswith(f"could not write {run / EVAL_FILE}: {error.strerror}")
    assert done.warnings[1].startswith(f"could not write {run / DET_FILE}: {error.strerror}")
    assert not (run / EVAL_FILE).exists() and not (run / DET_FILE).exists()


def test_eval_when_only_the_det_curve_fails(trained, small_root: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    run = copy_run(trained.run, tmp_path / "run")

    def refuse(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results, "save_det", refuse)
    done = run_eval(run, small_root, n_nontarget=20, threads=1)
    assert (done.results_path, done.det_path) == (run / EVAL_FILE, None)
    assert [w.split(":")[0] for w in done.warnings] == [f"could not write {run / DET_FILE}"]
    stored = json.loads((run / EVAL_FILE).read_text())
    assert stored["det"] is None and stored["eer"] == pytest.approx(done.result.eer)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes whatever the mode")
def test_eval_into_a_chmod_read_only_model_folder(trained, small_root: Path, tmp_path: Path) -> None:  # noqa: ANN001
    run = copy_run(trained.run, tmp_path / "run")
    run.chmod(0o555)
    try:
        done = run_eval(run, small_root, n_nontarget=20, threads=1)
    finally:
        run.chmod(0o755)
    assert (done.results_path, done.det_path) == (None, None) and len(done.warnings) == 2


# ---- trials that leave the root --------------------------------------------------------------------

@pytest.mark.parametrize("path, why", [
    ("../outside/x.wav", "climbs out with '..'"), ("spk/../../x.wav", "climbs out with '..'"),
    ("spk/..", "climbs out with '..'"), ("/etc/passwd", "is an absolute path"),
])
def test_trials_naming_files_outside_the_root_are_refused(path: str, why: str) -> None:
    with pytest.raises(DvectorError) as err:
        parse_trials(["1 spk/a.wav spk/b.wav", f"0 spk/a.wav {path}"], "veri.txt")
    assert str(err.value).startswith(f"veri.txt line 2: {path!r} {why}")
    with pytest.raises(DvectorError, match=why):
        check_trial_files([Trial(0, "spk/a.wav", path)], "/data/root")


def test_dots_inside_names_are_fine() -> None:
    assert parse_trials(["1 spk..1/a..wav spk/.b.wav"]) == [Trial(1, "spk..1/a..wav", "spk/.b.wav")]


def test_evaluate_never_reads_outside_the_root(trained, embedder, small_root: Path, tmp_path: Path,  # noqa: ANN001
                                               monkeypatch) -> None:  # noqa: ANN001
    root = tmp_path / "root"
    shutil.copytree(small_root, root)
    outside = tmp_path / "outside.flac"
    shutil.copy(trained.files[0], outside)
    speakers = sorted(p.name for p in root.iterdir())
    a, b = (f"{speakers[0]}/{sorted(os.listdir(root / speakers[0]))[k]}" for k in (0, 1))
    opened = []
    real_embed = embedder.embed
    monkeypatch.setattr(embedder, "embed", lambda source: opened.append(Path(source)) or real_embed(source))
    for bad in ("../outside.flac", str(outside)):
        trials = tmp_path / "trials.txt"
        trials.write_text(f"1 {a} {b}\n0 {a} {bad}\n")
        with pytest.raises(DvectorError, match=r"trials.txt line 2: .* trial paths are relative"):
            evaluate(embedder, root, trials)
    assert opened == []
    os.symlink(outside, root / speakers[1] / "linked.flac")  # a link the user put inside the root is followed
    trials.write_text(f"1 {a} {b}\n0 {a} {speakers[1]}/linked.flac\n")
    done = evaluate(embedder, root, trials)
    assert done.result.n_trials == 2 and len(read_trials(trials)) == 2
