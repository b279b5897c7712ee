"""Trials in Kaldi/NIST form (``utt1 utt2 target|nontarget``) beside the VoxCeleb form, detected per
line, and a Kaldi data directory as eval's test set (``eval --kaldi DATA_DIR``): entries are its
utterance ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dvector.errors import DvectorError
from dvector.evaluation.evaluate import KaldiTestSet, Trial, evaluate, parse_trials, read_trials
from use_helpers import copy_run, files_of, flat, kaldi_dir, run_main, uid



# ---- parsing -------------------------------------------------------------------------------------

def test_both_forms_are_read_line_by_line() -> None:
    lines = ["1 s1/a.wav s1/b.wav", "s1/a.wav s2/c.wav nontarget", "", "# comment", "s2/c.wav s2/d.wav target",
             "0\ts1/b.wav\ts2/d.wav", "x y TARGET"]
    assert parse_trials(lines) == [Trial(1, "s1/a.wav", "s1/b.wav"), Trial(0, "s1/a.wav", "s2/c.wav"),
                                   Trial(1, "s2/c.wav", "s2/d.wav"), Trial(0, "s1/b.wav", "s2/d.wav"),
                                   Trial(1, "x", "y")]


@pytest.mark.parametrize("bad", ["a b targets", "a b", "a b target extra", "target a b", "a b 1", "2 a b"])
def test_a_line_in_neither_form_names_file_and_line(bad: str) -> None:
    with pytest.raises(DvectorError) as err:
        parse_trials(["a b target", "1 a c", bad], "trials.txt")
    message = str(err.value)
    assert message.startswith("trials.txt line 3:") and repr(bad) in message
    assert "label path1 path2" in message and "utt1 utt2 target|nontarget" in message


def test_kaldi_form_paths_stay_inside_the_root_but_ids_are_free() -> None:
    with pytest.raises(DvectorError, match="line 1: '../x.wav' climbs out"):
        parse_trials(["../x.wav s/a.wav nontarget"])
    assert parse_trials(["../x s/a nontarget"], paths=False) == [Trial(0, "../x", "s/a")]


# ---- evaluation ------------------------------------------------------------------------------------

def write_pairs(path: Path, pairs: list[tuple[int, str, str]], kaldi_form: bool) -> Path:
    words = {1: "target", 0: "nontarget"}
    path.write_text("".join(f"{a} {b} {words[label]}\n" if kaldi_form else f"{label} {a} {b}\n"
                            for label, a, b in pairs))
    return path


def some_pairs(rels: list[str]) -> list[tuple[int, str, str]]:
    return [(1, rels[0], rels[1]), (1, rels[3], rels[4]), (0, rels[0], rels[3]), (0, rels[1], rels[7]),
            (1, rels[6], rels[8]), (0, rels[2], rels[6])]


def test_a_data_directory_scores_as_its_root_does(embedder, small_root: Path, tmp_path: Path) -> None:  # noqa: ANN001
    rels = files_of(small_root)
    pairs = some_pairs(rels)
    voxceleb = evaluate(embedder, small_root, write_pairs(tmp_path / "vox.txt", pairs, False))
    nist = evaluate(embedder, small_root, write_pairs(tmp_path / "nist.txt", pairs, True))
    data = kaldi_dir(small_root, tmp_path / "data")
    by_id = write_pairs(tmp_path / "ids.txt", [(label, uid(a), uid(b)) for label, a, b in pairs], True)
    kaldi = evaluate(embedder, None, by_id, kaldi=KaldiTestSet(str(data), str(small_root)))
    np.testing.assert_array_equal(nist.scores, voxceleb.scores)
    np.testing.assert_allclose(kaldi.scores, voxceleb.scores, atol=1e-6)
    assert kaldi.result.eer == voxceleb.result.eer and kaldi.result.n_files == 8
    assert kaldi.result.root == str(data) and kaldi.result.trials == str(by_id)
    assert [t.a for t in kaldi.trials][:1] == [uid(rels[0])]

    generated = evaluate(embedder, None, kaldi=KaldiTestSet(str(data), str(small_root)), n_nontarget=10)
    assert generated.result.n_target == 9 and generated.result.n_nontarget == 10


def test_ids_not_in_the_data_directory_are_named(embedder, small_root: Path, tmp_path: Path) -> None:  # noqa: ANN001
    data = kaldi_dir(small_root, tmp_path / "data")
    with open(data / "wav.scp", "a") as f:
        f.write("cmd1 sox a.wav -t wav - |\n")
    with open(data / "utt2spk", "a") as f:
        f.write("cmd1 X\n")
    first = uid(files_of(small_root)[0])
    trials = write_pairs(tmp_path / "t.txt", [(1, first, "nobody-1"), (0, first, "cmd1")], True)
    with pytest.raises(DvectorError) as err:
        evaluate(embedder, None, trials, kaldi=KaldiTestSet(str(data), str(small_root)))
    message = str(err.value)
    assert message.startswith(f"{trials}: 2 of 3 utterance ids are not in {data}: nobody-1, cmd1")
    assert "--allow-commands" in message  # the listing problem that may be why


def test_one_test_set_exactly(embedder, small_root: Path, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(DvectorError, match="ROOT or as --kaldi DATA_DIR, not both"):
        evaluate(embedder, small_root, kaldi=KaldiTestSet(str(tmp_path)))
    with pytest.raises(DvectorError, match="give the test set as ROOT or as --kaldi DATA_DIR$"):
        evaluate(embedder, None)


# ---- the command ---------------------------------------------------------------------------------

def test_eval_on_a_kaldi_directory_and_trial_list(trained, small_root: Path, tmp_path: Path,  # noqa: ANN001
                                                  capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained.run, tmp_path / "run")
    rels = files_of(small_root)
    data = kaldi_dir(small_root, tmp_path / "data")
    trials = write_pairs(tmp_path / "trials", [(label, uid(a), uid(b)) for label, a, b in some_pairs(rels)], True)
    code, out, err = run_main(capsys, "eval", run, "--kaldi", data, "--kaldi-root", small_root, "--trials", trials,
                              "--threads", "1")
    assert code == 0, err
    assert "trials: 6 (3 target, 3 non-target) over 8 utterances" in out
    stored = json.loads((run / "eval.json").read_text())
    assert out.strip().splitlines()[-1] == f"EER={100 * stored['eer']:.2f}%"
    assert stored["root"] == str(data) and stored["trials"] == str(trials)

    root_too = run_main(capsys, "eval", run, small_root, "--kaldi", data, "--trials", trials)
    assert root_too[0] == 1 and "not both" in flat(root_too[2])
    neither = run_main(capsys, "eval", run, "--trials", trials)
    assert neither[0] == 1 and "give the test set as ROOT or as --kaldi DATA_DIR" in flat(neither[2])
    stray = run_main(capsys, "eval", run, small_root, "--allow-commands")
    assert stray[0] == 1 and "go with --kaldi" in flat(stray[2])
    assert read_trials(trials, paths=False)[0].a == uid(rels[0])
