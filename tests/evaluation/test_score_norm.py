"""S-norm and AS-norm against a plain loop-based reference, and the cohort made from shards."""

from __future__ import annotations

import numpy as np
import pytest

from dvector.errors import DvectorError
from dvector.shards.locate import resolve_shards
from dvector.shards.reader import iter_shard
from dvector.evaluation.evaluate import Evaluation, Trial, compute_metrics
from dvector.evaluation.score_norm import (DEFAULT_TOP_N, Cohort, ScoreNorm, check_norm, cohort_from_shards,
                                    normalize_evaluation)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(enrol: np.ndarray, test: np.ndarray, cohort: np.ndarray, top_n: int | None) -> np.ndarray:
    """Normalised scores, one trial and one cohort speaker at a time (Matějka et al. 2017)."""
    out = []
    for e, t in zip(enrol, test):
        e, t = e / np.sqrt(sum(v * v for v in e)), t / np.sqrt(sum(v * v for v in t))
        s = float(np.dot(e, t))
        z = []
        for side in (e, t):
            scores = [float(np.dot(side, c / np.linalg.norm(c))) for c in cohort]
            scores = sorted(scores, reverse=True)[:top_n if top_n is not None else len(scores)]
            mean = sum(scores) / len(scores)
            std = (sum((x - mean) ** 2 for x in scores) / len(scores)) ** 0.5
            z.append((s - mean) / std)
        out.append((z[0] + z[1]) / 2)
    return np.array(out)


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    enrol, test = rng.normal(size=(40, 16)), rng.normal(size=(40, 16))
    test[:20] += 2 * enrol[:20]  # some targets
    return enrol, test, rng.normal(size=(57, 16))


@pytest.mark.parametrize("top_n", [2, 10, 56, 57])
def test_asnorm_matches_the_loop_reference(data, top_n: int) -> None:  # noqa: ANN001
    enrol, test, cohort = data
    norm = ScoreNorm("asnorm", Cohort(cohort, [f"s{i}" for i in range(len(cohort))]), top_n)
    raw = np.sum(unit(enrol) * unit(test), axis=1)
    got = norm.normalize(raw, enrol, test)
    assert np.allclose(got, reference(enrol, test, cohort, top_n), rtol=1e-10, atol=1e-10)
    assert norm.used_top == top_n and norm.note is None


def test_snorm_uses_the_whole_cohort(data) -> None:  # noqa: ANN001
    enrol, test, cohort = data
    norm = ScoreNorm("snorm", Cohort(cohort, [f"s{i}" for i in range(len(cohort))]), top_n=5)
    raw = np.sum(unit(enrol) * unit(test), axis=1)
    assert np.allclose(norm.normalize(raw, enrol, test), reference(enrol, test, cohort, None), atol=1e-10)
    assert norm.used_top == len(cohort) and norm.note is None


def test_a_cohort_smaller_than_top_n_is_used_whole_with_a_note(data) -> None:  # noqa: ANN001
    enrol, test, cohort = data
    speakers = [f"s{i}" for i in range(len(cohort))]
    big = ScoreNorm("asnorm", Cohort(cohort, speakers), top_n=DEFAULT_TOP_N)
    snorm = ScoreNorm("snorm", Cohort(cohort, speakers))
    raw = np.sum(unit(enrol) * unit(test), axis=1)
    assert big.used_top == len(cohort) and "57 speakers" in big.note and "300" in big.note
    assert np.allclose(big.normalize(raw, enrol, test), snorm.normalize(raw, enrol, test))


def test_normalize_evaluation_scores_each_file_once_and_stores_both(data) -> None:  # noqa: ANN001
    enrol, test, cohort = data
    vectors = {f"e{i}": v for i, v in enumerate(unit(enrol))} | {f"t{i}": v for i, v in enumerate(unit(test))}
    trials = [Trial(int(i < 20), f"e{i}", f"t{i}") for i in range(40)] + [Trial(0, "e0", "t39")]
    raw = np.array([vectors[t.a] @ vectors[t.b] for t in trials])
    labels = np.array([t.label for t in trials], dtype=bool)
    evaluation = Evaluation(compute_metrics(raw, labels), raw, labels, trials, vectors)
    norm = ScoreNorm("asnorm", Cohort(cohort, [f"s{i}" for i in range(len(cohort))]), top_n=10)
    stored = normalize_evaluation(evaluation, norm)
    expected = compute_metrics(reference(enrol[[*range(40), 0]], test[[*range(40), 39]], cohort, 10), labels)
    assert stored["eer"] == pytest.approx(expected.eer)
    assert stored["eer_threshold"] == pytest.approx(expected.eer_threshold)
    assert stored["min_dcf"] == pytest.approx(expected.min_dcf)
    assert stored["method"] == "asnorm" and stored["top_n"] == 10 and stored["cohort_speakers"] == 57


def test_bad_settings_are_errors() -> None:
    assert check_norm("ASNorm", "shards", 300) == "asnorm" and check_norm("none", None, 300) == "none"
    with pytest.raises(DvectorError, match="--norm must be one of none, snorm, asnorm"):
        check_norm("znorm", "shards", 300)
    with pytest.raises(DvectorError, match="needs a cohort"):
        check_norm("asnorm", None, 300)
    with pytest.raises(DvectorError, match="--cohort-top must be >= 2"):
        check_norm("asnorm", "shards", 1)
    with pytest.raises(DvectorError, match="at least 2"):
        Cohort(np.ones((1, 4)), ["only"])


def test_the_cohort_from_shards_is_each_speakers_mean_embedding(trained, embedder) -> None:  # noqa: ANN001
    made = cohort_from_shards(embedder, str(trained.shards))
    sums: dict[str, list[np.ndarray]] = {}
    for url in resolve_shards(str(trained.shards)).urls:
        for sample in iter_shard(url):
            sums.setdefault(sample["speaker"], []).append(embedder.embed_mel(sample["mel"].astype(np.float32)))
    assert made.speakers == sorted(sums) and made.n_samples == sum(len(v) for v in sums.values())
    expected = unit(np.stack([np.mean(sums[s], axis=0) for s in made.speakers]))
    assert np.allclose(made.vectors, expected, atol=1e-6)
    assert np.allclose(np.linalg.norm(made.vectors, axis=1), 1) and made.skipped == []


def test_an_empty_or_unreadable_cohort_is_an_error(embedder, tmp_path) -> None:  # noqa: ANN001
    bad = tmp_path / "shard-000000.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DvectorError, match="holds no usable samples"):
        cohort_from_shards(embedder, str(bad))
    with pytest.raises(DvectorError):
        cohort_from_shards(embedder, str(tmp_path / "missing"))


def test_speed_perturbed_copies_are_not_cohort_speakers(embedder, tmp_path) -> None:  # noqa: ANN001
    from dvector.config import BuildConfig
    from dvector.demo.synth import write_corpus
    from dvector.shards.build import build_shards

    write_corpus(tmp_path / "root", 3, 2, seed=3, duration_s=(1.0, 1.5))
    out = tmp_path / "shards"
    build_shards([str(tmp_path / "root")], out, BuildConfig(min_shards=1, speed_perturb=(0.9,)), workers=1)
    made = cohort_from_shards(embedder, str(out))
    assert len(made.speakers) == 3 and not any("@sp" in s for s in made.speakers) and made.n_samples == 6
