"""The imported Resemblyzer encoder against Resemblyzer on real recordings (every 16th file of
../shared/data/real-dev; benchmarks/resemblyzer_parity.py runs every file); skipped where the
recordings or resemblyzer are absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmark_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[2]
REAL_DEV = REPO.parent / "shared" / "data" / "real-dev"
pytestmark = [pytest.mark.skipif(not (REAL_DEV / "MANIFEST.tsv").is_file(), reason=f"no real-dev at {REAL_DEV}"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")]
pytest.importorskip("resemblyzer")


@pytest.mark.slow
def test_whole_files_match_resemblyzer_on_real_dev() -> None:
    by_corpus = load_benchmark("resemblyzer_parity").cosines(REAL_DEV, every=16)
    assert set(by_corpus) == {"audiomnist_az", "emodb", "fsdd", "librispeech_test_other"}
    everything = np.concatenate([np.asarray(v) for v in by_corpus.values()])
    assert len(everything) >= 190
    assert np.median(everything) >= 0.99, {c: float(np.median(v)) for c, v in by_corpus.items()}
    for corpus, values in by_corpus.items():  # no corpus far off, whatever the others do
        assert np.median(values) >= 0.98, (corpus, float(np.median(values)))
