"""``dvector score MODEL --trials TRIALS (ROOT | --kaldi DATA_DIR)``: the scores of a trial list (labelled
in either form, or unlabelled), ``a b score`` a line, decided where a threshold is stored or given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dvector.errors import DvectorError
from dvector.evaluation.evaluate import KaldiTestSet, Trial, cosine, parse_trials
from dvector.evaluation.results import score_trials
from dvector.inference.embed_inputs import NothingEmbedded
from use_helpers import copy_run, files_of, flat, kaldi_dir, run_main, uid



def some_pairs(rels: list[str]) -> list[tuple[int, str, str]]:
    return [(1, rels[0], rels[1]), (0, rels[0], rels[3]), (1, rels[3], rels[4]), (0, rels[1], rels[7])]


def write_list(path: Path, pairs: list[tuple[int, str, str]], form: str) -> Path:
    words = {1: "target", 0: "nontarget"}
    line = {"kaldi": lambda label, a, b: f"{a} {b} {words[label]}", "voxceleb": lambda label, a, b: f"{label} {a} {b}",
            "blind": lambda label, a, b: f"{a} {b}"}[form]
    path.write_text("".join(line(*p) + "\n" for p in pairs))
    return path


@pytest.fixture(scope="module")
def run(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """A copy of the trained run without an eval.json: no threshold stored."""
    return copy_run(trained.run, tmp_path_factory.mktemp("score") / "run")


# ---- the library ---------------------------------------------------------------------------------

def test_scores_are_the_cosines_and_every_form_gives_the_same(run: Path, embedder, small_root: Path,  # noqa: ANN001
                                                             tmp_path: Path) -> None:
    pairs = some_pairs(files_of(small_root))
    got = {form: score_trials(run, small_root, write_list(tmp_path / form, pairs, form), threads=1)
           for form in ("blind", "kaldi", "voxceleb")}
    want = [cosine(embedder.embed(small_root / a), embedder.embed(small_root / b)) for _, a, b in pairs]
    np.testing.assert_allclose(got["blind"].scores, want, atol=1e-6)
    for form in ("kaldi", "voxceleb"):
        np.testing.assert_array_equal(got[form].scores, got["blind"].scores)
    blind = got["blind"]
    assert [(t.a, t.b) for t in blind.trials] == [(a, b) for _, a, b in pairs] and blind.threshold is None
    assert blind.text().splitlines() == [f"{a} {b} {s:.6f}" for (_, a, b), s in zip(pairs, blind.scores)]
    assert blind.left_out == 0 and blind.skipped == [] and "no threshold stored" in blind.note


def test_a_kaldi_data_directory_scores_as_its_root_does(run: Path, small_root: Path, tmp_path: Path) -> None:
    pairs = some_pairs(files_of(small_root))
    by_path = score_trials(run, small_root, write_list(tmp_path / "paths", pairs, "blind"), threads=1)
    data = kaldi_dir(small_root, tmp_path / "data")
    ids = write_list(tmp_path / "ids", [(label, uid(a), uid(b)) for label, a, b in pairs], "kaldi")
    by_id = score_trials(run, None, ids, kaldi=KaldiTestSet(str(data), str(small_root)), threshold=0.3, threads=1)
    np.testing.assert_allclose(by_id.scores, by_path.scores, atol=1e-6)
    assert by_id.trials[0].a == uid(pairs[0][1]) and by_id.threshold.value == 0.3
    decided = [line.split()[3] for line in by_id.text().splitlines()]
    assert decided == ["target" if s >= 0.3 else "nontarget" for s in by_id.scores]


def test_missing_files_and_ids_are_named(run: Path, small_root: Path, tmp_path: Path) -> None:
    first = files_of(small_root)[0]
    trials = write_list(tmp_path / "t", [(0, first, "nobody/x.flac")], "blind")
    with pytest.raises(DvectorError, match=f"{trials}: 1 of 2 files are not under {small_root}: nobody/x.flac"):
        score_trials(run, small_root, trials)
    data = kaldi_dir(small_root, tmp_path / "data")
    ids = write_list(tmp_path / "ids", [(0, uid(first), "nobody-1")], "blind")
    with pytest.raises(DvectorError, match="1 of 2 utterance ids are not in .*: nobody-1"):
        score_trials(run, None, ids, kaldi=KaldiTestSet(str(data), str(small_root)))


def test_a_file_that_cannot_be_embedded_leaves_its_trials_out(run: Path, small_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    rels = files_of(small_root)[:3]
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((small_root / rel).read_bytes())
    (root / "bad").mkdir()
    (root / "bad" / "x.flac").write_bytes(b"not audio")
    pairs = [(1, rels[0], rels[1]), (0, rels[0], "bad/x.flac"), (0, "bad/x.flac", rels[2])]
    scored = score_trials(run, root, write_list(tmp_path / "t", pairs, "blind"), threads=1)
    assert len(scored.trials) == 1 and scored.left_out == 2 and [k for k, _ in scored.skipped] == ["bad/x.flac"]
    with pytest.raises(NothingEmbedded, match="no trial of .* could be scored") as err:
        score_trials(run, root, write_list(tmp_path / "u", pairs[1:], "blind"), threads=1)
    assert [k for k, _ in err.value.skipped] == ["bad/x.flac"]


def test_eval_still_needs_labels() -> None:
    assert parse_trials(["a b", "1 a c"], labels=False) == [Trial(None, "a", "b"), Trial(1, "a", "c")]
    with pytest.raises(DvectorError) as err:
        parse_trials(["1 a c", "a b"], "veri.txt")
    assert str(err.value).startswith("veri.txt line 2:") and "score --trials" in str(err.value)


# ---- the command ---------------------------------------------------------------------------------

def test_score_trials_command(run: Path, small_root: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    pairs = some_pairs(files_of(small_root))
    trials = write_list(tmp_path / "t", pairs, "voxceleb")
    code, out, err = run_main(capsys, "score", run, small_root, "--trials", trials, "--threads", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [[a, b] for _, a, b in pairs]
    assert all(len(line.split()) == 3 and len(line.split()[2].split(".")[1]) == 6 for line in lines)

    stored = copy_run(run, tmp_path / "stored")
    (stored / "eval.json").write_text(json.dumps({"eer_threshold": 0.25, "eer": 0.1}))
    scores = tmp_path / "out" / "scores"
    code, out, err = run_main(capsys, "score", stored, small_root, "--trials", trials, "-o", scores, "--threads", "1")
    assert code == 0, err
    assert out == ""
    written = scores.read_text().splitlines()
    assert [w.split()[:3] for w in written] == [line.split() for line in lines]
    assert [w.split()[3] for w in written] == ["target" if float(w.split()[2]) >= 0.25 else "nontarget"
                                               for w in written]
    assert f"written to {scores}" in flat(err)


@pytest.mark.parametrize("args, message", [
    (["a.wav", "b.wav", "--trials", "TRIALS"], "give two audio files A B or --trials TRIALS (with ROOT or --kaldi "
                                               "DATA_DIR), not both"),
    ([], "give two audio files A B, or --trials TRIALS with ROOT or --kaldi DATA_DIR"),
    (["a.wav"], "give two audio files A B, or --trials TRIALS with ROOT or --kaldi DATA_DIR"),
    (["a.wav", "b.wav", "--kaldi", "data"], "--kaldi and -o/--out go with --trials TRIALS"),
    (["ROOT", "--trials", "TRIALS", "--kaldi", "data"], "give the test set as ROOT or as --kaldi DATA_DIR, not both"),
    (["--trials", "TRIALS"], "give the test set as ROOT or as --kaldi DATA_DIR"),
])
def test_a_mix_or_neither_is_refused_in_one_line(args: list[str], message: str, run: Path, small_root: Path,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trials = write_list(tmp_path / "t", some_pairs(files_of(small_root)), "blind")
    args = [str(trials) if a == "TRIALS" else str(small_root) if a == "ROOT" else a for a in args]
    code, out, err = run_main(capsys, "score", run, *args)
    assert code == 1 and out == ""
    assert flat(err).count("error:") == 1 and message in flat(err)
