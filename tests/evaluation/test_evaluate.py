"""Scoring and evaluation: EER and minDCF against brute force, trials files and generated trials,
embeddings computed once per file, the stored threshold."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from dvector.errors import DvectorError
from dvector.evaluation.evaluate import (Trial, check_trial_files, compute_metrics, cosine, evaluate, generate_trials,
                                  parse_trials, read_trials, save_det, write_trials)
from dvector.evaluation.results import DEFAULT_THRESHOLD, EVAL_FILE, decision_threshold, eval_path, write_eval
from dvector.metrics import eer, min_dcf
from use_helpers import copy_run


# ---- metrics against brute force ----------------------------------------------------------------

def brute_rates(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAR and FRR at every threshold that changes a decision (accept when score >= t), plus +inf."""
    thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
    far = np.array([np.mean(scores[~labels] >= t) for t in thresholds])
    frr = np.array([np.mean(scores[labels] < t) for t in thresholds])
    return far, frr


def brute_eer_bounds(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The EER lies between the best (FAR+FRR)/2 and the best max(FAR, FRR) over thresholds."""
    far, frr = brute_rates(scores, labels)
    return float(np.min((far + frr) / 2)), float(np.min(np.maximum(far, frr)))


def brute_min_dcf(scores: np.ndarray, labels: np.ndarray, p: float) -> float:
    far, frr = brute_rates(scores, labels)
    far, frr = np.r_[far, 1.0], np.r_[frr, 0.0]  # and "accept everything"
    return float(np.min(p * frr + (1 - p) * far) / min(p, 1 - p))


def test_eer_known_cases() -> None:
    # crossing exactly at an operating point: threshold 0.7 gives FAR = FRR = 1/3
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    rate, threshold = eer(scores, labels)
    assert rate == pytest.approx(1 / 3)
    assert 0.3 < threshold <= 0.8
    # perfectly separated: 0, with a threshold that separates
    rate, threshold = eer(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 1, 0, 0], dtype=bool))
    assert rate == 0.0 and 0.2 < threshold <= 0.8
    # fully reversed: 1
    assert eer(np.array([0.1, 0.2, 0.8, 0.9]), np.array([1, 1, 0, 0], dtype=bool))[0] == pytest.approx(1.0)
    # all scores equal: the only decision is all-or-nothing, EER 0.5
    assert eer(np.zeros(6), np.array([1, 1, 1, 0, 0, 0], dtype=bool))[0] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(12))
def test_eer_and_min_dcf_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_t, n_n = int(rng.integers(3, 60)), int(rng.integers(3, 200))
    scores = np.r_[rng.normal(1.0, 1.0, n_t), rng.normal(0.0, 1.0, n_n)]
    if seed % 3 == 0:
        scores = np.round(scores, 1)  # ties
    labels = np.r_[np.ones(n_t, bool), np.zeros(n_n, bool)]
    rate, threshold = eer(scores, labels)
    lo, hi = brute_eer_bounds(scores, labels)
    assert lo - 1e-12 <= rate <= hi + 1e-12
    # deciding at the threshold, the two error rates straddle the EER
    far_t, frr_t = np.mean(scores[~labels] >= threshold), np.mean(scores[labels] < threshold)
    assert min(far_t, frr_t) - 1e-9 <= rate <= max(far_t, frr_t) + 1e-9
    for p in (0.01, 0.05, 0.5):
        assert min_dcf(scores, labels, p_target=p)[0] == pytest.approx(brute_min_dcf(scores, labels, p), abs=1e-12)


def test_compute_metrics_fields() -> None:
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0.7, 0.1, 50), rng.normal(0.3, 0.1, 500)]
    labels = np.r_[np.ones(50, bool), np.zeros(500, bool)]
    r = compute_metrics(scores, labels)
    assert (r.n_trials, r.n_target, r.n_nontarget) == (550, 50, 500)
    assert set(r.min_dcf) == {"0.01", "0.05"}
    assert r.eer == pytest.approx(eer(scores, labels)[0])
    assert 0 <= r.min_dcf["0.05"] <= 1 and 0 <= r.min_dcf["0.01"] <= 1 + 1e-12
    with pytest.raises(DvectorError, match="both target and non-target"):
        compute_metrics(np.array([0.1, 0.2]), np.array([1, 1]))


def test_cosine() -> None:
    assert cosine(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    with pytest.raises(DvectorError):
        cosine(np.ones(3), np.ones(4))


# ---- trials ----------------------------------------------------------------------------------------

def test_parse_trials_good_lines() -> None:
    trials = parse_trials(["1 id1/a.wav id1/b.wav", "", "# comment", "0 id1/a.wav id2/c.wav  ", "\t1\tx y"])
    assert trials == [Trial(1, "id1/a.wav", "id1/b.wav"), Trial(0, "id1/a.wav", "id2/c.wav"), Trial(1, "x", "y")]


@pytest.mark.parametrize("bad, number", [
    ("2 a.wav b.wav", 2), ("1 a.wav", 2), ("1 a.wav b.wav c.wav", 2), ("target a.wav b.wav", 2), ("a.wav b.wav 1", 2),
])
def test_parse_trials_bad_line_names_it(bad: str, number: int) -> None:
    with pytest.raises(DvectorError) as err:
        parse_trials(["1 a.wav b.wav", bad, "0 a.wav c.wav"], "veri_test.txt")
    message = str(err.value)
    assert f"veri_test.txt line {number}" in message
    assert repr(bad.strip()) in message
    assert "label path1 path2" in message


def test_read_trials_errors(tmp_path: Path) -> None:
    with pytest.raises(DvectorError, match="cannot read trials file"):
        read_trials(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(DvectorError, match="no trials"):
        read_trials(empty)
    bad = tmp_path / "bad.txt"
    bad.write_text("1 a b\n0 a c\n1 a\n")
    with pytest.raises(DvectorError, match="line 3"):
        read_trials(bad)


def test_check_trial_files_names_missing(tmp_path: Path) -> None:
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "a.wav").write_bytes(b"x")
    trials = [Trial(1, "s1/a.wav", "s1/a.wav"), Trial(0, "s1/a.wav", "s2/missing.wav")]
    with pytest.raises(DvectorError, match="s2/missing.wav"):
        check_trial_files(trials, tmp_path)
    assert check_trial_files(trials[:1], tmp_path) == ["s1/a.wav"]


def test_generate_trials() -> None:
    files = {f"spk{s}": [f"spk{s}/u{u}.wav" for u in range(2 + s)] for s in range(6)}
    trials = generate_trials(files, n_nontarget=30, seed=3)
    targets = [t for t in trials if t.label == 1]
    nontargets = [t for t in trials if t.label == 0]
    expected_targets = {(a, b) for f in files.values() for a, b in combinations(sorted(f), 2)}
    assert {(t.a, t.b) for t in targets} == expected_targets  # all target pairs, once
    assert len(nontargets) == 30
    assert all(t.a.split("/")[0] != t.b.split("/")[0] for t in nontargets)
    assert len({frozenset((t.a, t.b)) for t in nontargets}) == 30  # distinct pairs
    assert generate_trials(files, n_nontarget=30, seed=3) == trials  # seeded
    assert generate_trials(files, n_nontarget=30, seed=4) != trials
    # more non-targets asked for than exist: all of them
    n_files = sum(len(f) for f in files.values())
    total = n_files * (n_files - 1) // 2 - len(expected_targets)
    assert sum(t.label == 0 for t in generate_trials(files, n_nontarget=10**6)) == total
    # default: as many as target pairs, at least 1,000 (here: all there are)
    assert sum(t.label == 0 for t in generate_trials(files)) == min(total, max(1000, len(expected_targets)))
    # a cap on target pairs samples them
    assert sum(t.label == 1 for t in generate_trials(files, max_target=5)) == 5
    with pytest.raises(DvectorError, match="at least 2 speakers"):
        generate_trials({"a": ["a/1", "a/2"]})
    with pytest.raises(DvectorError, match="2 or more"):
        generate_trials({"a": ["a/1"], "b": ["b/1"]})


# ---- evaluation on a trained model -----------------------------------------------------------------

def count_embeds(embedder, monkeypatch) -> list:  # noqa: ANN001
    calls: list = []
    original = type(embedder).embed

    def counting(source):  # noqa: ANN001, ANN202
        calls.append(str(source))
        return original(embedder, source)

    monkeypatch.setattr(embedder, "embed", counting)
    return calls


def test_evaluate_generated_embeds_each_file_once(trained, embedder, monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    calls = count_embeds(embedder, monkeypatch)
    ev = evaluate(embedder, trained.root, n_nontarget=400, seed=1)
    n_files = len(trained.files)
    assert len(calls) == n_files == len(set(calls))
    r = ev.result
    assert r.n_target == 14 * (8 * 7 // 2) and r.n_nontarget == 400
    assert len(ev.scores) == r.n_trials == len(ev.trials)
    assert 0.0 <= r.eer <= 1.0 and -1.0 <= r.eer_threshold <= 1.0
    assert r.eer == pytest.approx(eer(ev.scores, ev.labels)[0])
    assert r.model["sha256"] == embedder.info["sha256"] and r.model["step"] == 5
    png = save_det(ev, tmp_path / "det.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_trials_file_embeds_each_file_once(trained, embedder, monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    rels = [str(Path(f).relative_to(trained.root)) for f in trained.files]
    trials = [Trial(1, rels[0], rels[1]), Trial(1, rels[0], rels[2]), Trial(0, rels[0], rels[8]),
              Trial(0, rels[1], rels[9]), Trial(1, rels[8], rels[9]), Trial(0, rels[2], rels[9])]
    path = tmp_path / "trials.txt"
    write_trials(path, trials)
    calls = count_embeds(embedder, monkeypatch)
    ev = evaluate(embedder, trained.root, path)
    assert sorted(calls) == sorted(str(trained.root / r) for r in {rels[i] for i in (0, 1, 2, 8, 9)})
    assert ev.result.n_trials == 6 and ev.result.n_files == 5
    vec = {r: embedder.embed(trained.root / r) for r in rels[:10]}
    assert ev.scores[0] == pytest.approx(float(vec[rels[0]] @ vec[rels[1]]), abs=1e-6)
    # a trials file naming a missing file
    path.write_text(f"1 {rels[0]} nobody/x.wav\n0 {rels[0]} {rels[8]}\n")
    with pytest.raises(DvectorError, match="nobody/x.wav"):
        evaluate(embedder, trained.root, path)


def test_stored_threshold_round_trip(trained, embedder, tmp_path: Path) -> None:  # noqa: ANN001
    run = copy_run(trained.run, tmp_path / "run")
    default = decision_threshold(run, embedder)
    assert not default.stored and default.value == DEFAULT_THRESHOLD and "dvector eval" in default.note
    ev = evaluate(embedder, trained.root, n_nontarget=200)
    assert eval_path(run) == run / EVAL_FILE
    assert eval_path(run / "checkpoints" / "best.pt") == run / EVAL_FILE
    write_eval(eval_path(run), ev.result)
    stored = decision_threshold(run, embedder)
    assert stored.stored and stored.value == pytest.approx(ev.result.eer_threshold) and stored.note is None
    data = json.loads((run / EVAL_FILE).read_text())
    assert data["eer"] == pytest.approx(ev.result.eer) and set(data["min_dcf"]) == {"0.01", "0.05"}
    # the stored threshold belongs to another model file: still used, with a warning
    data["model"]["sha256"] = "0" * 64
    (run / EVAL_FILE).write_text(json.dumps(data))
    other = decision_threshold(run, embedder)
    assert other.stored and "another model" in other.note


def test_evaluate_needs_speakers(embedder, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(DvectorError, match="does not exist"):
        evaluate(embedder, tmp_path / "nope")
    (tmp_path / "root" / "only").mkdir(parents=True)
    with pytest.raises(DvectorError, match="at least 2 speaker"):
        evaluate(embedder, tmp_path / "root")


def test_untrained_baseline(trained, embedder) -> None:  # noqa: ANN001
    """An in-memory (here: untrained) network evaluates on the same trials, for a baseline EER."""
    import torch

    from dvector.inference.embedder import Embedder
    from dvector.nn.model import DVector

    torch.manual_seed(0)
    fresh = Embedder.from_model(DVector(embedder.model.config), embedder.features, embedder.vad, embedder.seg_len,
                                threads=1)
    ev = evaluate(fresh, trained.root, n_nontarget=300, seed=1)
    assert 0 <= ev.result.eer <= 1 and ev.result.model["kind"] == "model" and ev.result.n_nontarget == 300
