"""DER against hand-made references, scored by pyannote.metrics (0.25 s collar each side)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pyannote.metrics")

from dvector.errors import DvectorError  # noqa: E402
from dvector.diarization.der import score_folders, score_turns  # noqa: E402
from dvector.diarization.rttm import Turn, write_rttm  # noqa: E402

REF = [Turn(0.0, 4.0, "alice"), Turn(5.0, 9.0, "bob"), Turn(10.0, 14.0, "alice")]  # 12 s of speech


def test_perfect_and_swapped_labels_score_zero() -> None:
    assert score_turns(REF, REF).der == 0.0
    swapped = [Turn(t.start, t.end, {"alice": "B", "bob": "A"}[t.speaker]) for t in REF]
    assert score_turns(REF, swapped).der == 0.0


def test_missed_speaker_counts_as_miss() -> None:
    parts = score_turns(REF, [t for t in REF if t.speaker == "alice"], collar_s=0.0)
    assert parts.miss == pytest.approx(4.0) and parts.false_alarm == 0 and parts.confusion == 0
    assert parts.der == pytest.approx(4.0 / 12.0)


def test_false_alarm_and_confusion() -> None:
    hyp = [Turn(0.0, 4.0, "x"), Turn(4.0, 5.0, "x"), Turn(5.0, 9.0, "x"), Turn(10.0, 14.0, "x")]
    parts = score_turns(REF, hyp, collar_s=0.0)
    assert parts.false_alarm == pytest.approx(1.0)  # 4-5 s is silence in the reference
    assert parts.confusion == pytest.approx(4.0)  # bob's 4 s labelled as alice's speaker
    assert parts.total == pytest.approx(12.0)


def test_collar_forgives_small_boundary_errors() -> None:
    late = [Turn(t.start + 0.2, t.end + 0.2, t.speaker) for t in REF]
    assert score_turns(REF, late, collar_s=0.25).der == 0.0
    assert score_turns(REF, late, collar_s=0.0).der > 0.0


def test_folders_overall_sums_seconds_and_lists_unmatched(tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    write_rttm(tmp_path / "ref" / "a.rttm", REF, "a")
    write_rttm(tmp_path / "ref" / "b.rttm", REF[:1], "b")
    write_rttm(tmp_path / "ref" / "only_ref.rttm", REF, "only_ref")
    (tmp_path / "hyp").mkdir()
    write_rttm(tmp_path / "hyp" / "a.rttm", REF, "a")
    write_rttm(tmp_path / "hyp" / "b.rttm", [], "b")  # b: everything missed
    write_rttm(tmp_path / "hyp" / "only_hyp.rttm", REF, "only_hyp")
    report = score_folders(tmp_path / "ref", tmp_path / "hyp", collar_s=0.0)
    assert sorted(report.files) == ["a", "b"]
    assert report.only_reference == ["only_ref"] and report.only_hypothesis == ["only_hyp"]
    assert report.overall.total == pytest.approx(16.0)
    assert report.overall.der == pytest.approx(4.0 / 16.0)
    with pytest.raises(DvectorError, match="no RTTM file name is in both"):
        score_folders(tmp_path / "ref", tmp_path)
