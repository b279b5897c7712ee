"""The real-speech yardstick's committed splits and trial lists (benchmarks/real_speech/), checked
against ../shared/data/real-dev when it is present; skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark_helpers import load_benchmark
from dvector.evaluation.evaluate import check_trial_files, read_trials

REPO = Path(__file__).resolve().parents[1]
LISTS = REPO / "benchmarks" / "real_speech"
REAL_DEV = REPO.parent / "shared" / "data" / "real-dev"
pytestmark = pytest.mark.skipif(not (REAL_DEV / "MANIFEST.tsv").is_file(),
                                reason=f"no real-dev recordings at {REAL_DEV}")
CORPORA = ("audiomnist_az", "emodb", "fsdd", "librispeech_test_other")


@pytest.fixture(scope="module")
def bench():
    """benchmarks/real_speech.py, imported from its path (benchmarks/ is not a package)."""
    return load_benchmark("real_speech")


def split_table() -> dict[tuple[str, str], str]:
    rows = [line.split("\t") for line in (LISTS / "splits.tsv").read_text().splitlines()[1:]]
    return {(corpus, speaker): side for corpus, speaker, side in rows}


def speaker_of(path: str) -> tuple[str, str]:
    corpus, speaker = path.split("/")[:2]
    return corpus, speaker


def test_splits_cover_every_speaker_once_and_hold_out_at_least_20() -> None:
    table = split_table()
    on_disk = {(c, p.name) for c in CORPORA for p in (REAL_DEV / c).iterdir() if p.is_dir()}
    assert set(table) == on_disk
    heldout = [k for k, side in table.items() if side == "heldout"]
    assert len(heldout) >= 20
    assert {c for c, _ in heldout} == set(CORPORA)  # every corpus has held-out speakers


@pytest.mark.parametrize("corpus", CORPORA)
@pytest.mark.parametrize("kind", ["all", "heldout"])
def test_trial_lists_are_valid_within_one_corpus_and_labelled_by_speaker(corpus: str, kind: str) -> None:
    path = LISTS / f"trials_{corpus}_{kind}.txt"
    trials = read_trials(path)
    check_trial_files(trials, REAL_DEV, str(path))  # every file exists under real-dev, paths stay inside
    table = split_table()
    speakers = set()
    for t in trials:
        a, b = speaker_of(t.a), speaker_of(t.b)
        assert a[0] == b[0] == corpus
        assert t.label == int(a == b)
        speakers |= {a, b}
        if kind == "heldout":
            assert table[a] == table[b] == "heldout"
    wanted = {k for k, side in table.items() if k[0] == corpus and (kind == "all" or side == "heldout")}
    assert speakers == wanted
    n_target = sum(t.label for t in trials)
    assert 0 < n_target <= 1500 and n_target == len(trials) - n_target  # balanced, a few thousand at most
    assert len({(t.a, t.b) for t in trials}) == len(trials)


def test_lists_regenerate_identically(bench, tmp_path: Path) -> None:
    written = bench.make_lists(REAL_DEV, tmp_path)
    assert {p.name for p in written} | {"splits.tsv"} == {p.name for p in tmp_path.iterdir()}
    for p in tmp_path.iterdir():
        assert p.read_text() == (LISTS / p.name).read_text(), p.name


@pytest.mark.parametrize("fold", CORPORA)
def test_a_fold_never_trains_on_a_speaker_it_tests(bench, fold: str) -> None:
    trained = {(c, s) for c, side in bench.fold_plan(fold)[0] for (cc, s), v in split_table().items()
               if cc == c and v == side}
    tested = set()
    for _corpus, _kind, path in bench.fold_plan(fold)[1]:
        tested |= {speaker_of(p) for t in read_trials(path) for p in (t.a, t.b)}
    assert trained and tested and not trained & tested
    assert {c for c, _ in trained} == set(CORPORA) - {fold}
