"""Real recordings, when ../shared/data/real-dev is present (developer and CI checkouts); skipped elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvector.shards.build import build_shards
from dvector.config import BuildConfig

REAL_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dev"
pytestmark = pytest.mark.skipif(not REAL_DEV.is_dir(), reason=f"no real-dev recordings at {REAL_DEV}")


@pytest.fixture(scope="module")
def small_real_roots(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two speakers of each corpus, five files each, linked into fresh roots (rates 8, 16, 22.05 kHz)."""
    top = tmp_path_factory.mktemp("real")
    roots = []
    for corpus in ("audiomnist_az", "emodb", "fsdd", "librispeech_test_other"):
        for speaker in sorted(p for p in (REAL_DEV / corpus).iterdir() if p.is_dir())[:2]:
            folder = top / corpus / speaker.name
            folder.mkdir(parents=True)
            for audio in sorted(speaker.rglob("*.flac"))[:5]:
                (folder / audio.name).symlink_to(audio)
        roots.append(str(top / corpus))
    return roots


def test_real_recordings_of_every_rate_build_without_loss(small_real_roots: list[str], tmp_path: Path) -> None:
    report = build_shards(small_real_roots, tmp_path / "shards", BuildConfig(extensions=("flac",), min_shards=2),
                          workers=2)
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["failures"] == [], index["failures"][:3]
    assert index["totals"]["utterances"] == 40 and report.speakers == 8
    for speaker in index["speakers"]:
        # at 10 ms per frame, every speaker keeps at least a few tenths of a second per file
        assert speaker["frames"] >= 5 * 30, speaker
