"""RTTM files: written and read back the same, malformed lines refused with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvector.errors import DvectorError
from dvector.diarization.rttm import Turn, format_rttm, parse_rttm, read_rttm, rttm_files, write_rttm


def test_round_trip(tmp_path: Path) -> None:
    turns = [Turn(3.25, 7.5, "bob", "meet"), Turn(0.5, 3.0, "alice", "meet"), Turn(6.0, 8.125, "alice", "meet")]
    path = write_rttm(tmp_path / "meet.rttm", turns, "meet")
    assert read_rttm(path) == sorted(turns)
    assert not list(tmp_path.glob(".*")), "no temporary file left behind"
    first = path.read_text().splitlines()[0].split()
    assert first == ["SPEAKER", "meet", "1", "0.500", "2.500", "<NA>", "<NA>", "alice", "<NA>", "<NA>"]
    assert rttm_files(tmp_path) == {"meet": path}


def test_spaces_in_names_and_empty_turns() -> None:
    text = format_rttm([Turn(0, 1, "a b"), Turn(2, 2, "c")], "my file")
    assert text == "SPEAKER my_file 1 0.000 1.000 <NA> <NA> a_b <NA> <NA>\n"


def test_reading_skips_other_lines_and_refuses_bad_ones() -> None:
    text = (";; a comment\nSPKR-INFO x 1 <NA> <NA> <NA> unknown s1 <NA> <NA>\n"
            "SPEAKER x 1 1.0 2.0 <NA> <NA> s1 <NA> <NA>\n")
    assert parse_rttm(text) == [Turn(1.0, 3.0, "s1", "x")]
    with pytest.raises(DvectorError, match=r"ref.rttm:2: start and duration must be numbers"):
        parse_rttm("SPEAKER x 1 0 1 <NA> <NA> a <NA> <NA>\nSPEAKER x 1 zero 1 <NA> <NA> a <NA> <NA>\n", "ref.rttm")
    with pytest.raises(DvectorError, match=r":1: an RTTM SPEAKER line has 10 fields"):
        parse_rttm("SPEAKER x 1 0 1\n")
    with pytest.raises(DvectorError, match=r"finite and >= 0"):
        parse_rttm("SPEAKER x 1 0 -1 <NA> <NA> a <NA> <NA>\n")


def test_a_line_that_is_no_rttm_line_is_refused_not_skipped(tmp_path: Path) -> None:
    """Before, a line of no RTTM type was skipped: a malformed hypothesis read as empty (DER 100%)."""
    for bad in ("SPEAKER,x,1,0,1,<NA>,<NA>,a,<NA>,<NA>", "x 1 0 1 <NA> <NA> a <NA> <NA>", "SPEAKRE x 1 0 1"):
        with pytest.raises(DvectorError, match=r"hyp.rttm:2: not an RTTM line"):
            parse_rttm(f";; fine\n{bad}\n", "hyp.rttm")
    text = "\nNON-SPEECH x 1 0 1 <NA> <NA> <NA> <NA> <NA>\nspeaker x 1 0.5 1 <NA> <NA> a <NA> <NA>\n"
    assert parse_rttm(text) == [Turn(0.5, 1.5, "a", "x")]  # other types skipped, the type's case ignored
    path = tmp_path / "bom.rttm"
    path.write_bytes(b"\xef\xbb\xbfSPEAKER x 1 0 1 <NA> <NA> a <NA> <NA>\n")  # a byte-order mark
    assert read_rttm(path) == [Turn(0.0, 1.0, "a", "x")]
