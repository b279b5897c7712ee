"""RTTM files: "who spoke when", the format diarization scorers read (NIST RT, DIHARD, pyannote).

One line per speaker turn, ten space-separated fields::

    SPEAKER <file> 1 <start> <duration> <NA> <NA> <speaker> <NA> <NA>

Times in seconds. Reading keeps ``SPEAKER`` lines only (lines of the other RTTM types, blank lines
and ``;;`` comments are skipped), and refuses a malformed line (one that starts with no RTTM type,
a ``SPEAKER`` line without its fields) with its file and line number. Writing is atomic.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from dvector.errors import DvectorError
from dvector.files import atomic_write


# the line types of NIST's RTTM format (RT-09 evaluation plan, appendix A)
RTTM_TYPES = frozenset({"SEGMENT", "NOSCORE", "NO_RT_METADATA", "LEXEME", "NON-LEX", "NON-SPEECH", "FILLER", "EDIT",
                        "IP", "END-OF-SU", "SU", "CB", "A/P", "SPEAKER", "SPKR-INFO", "NOISE"})


@dataclass(frozen=True, order=True)
class Turn:
    """One speaker turn of one recording: ``start`` and ``end`` in seconds."""

    start: float
    end: float
    speaker: str
    file: str = ""

    @property
    def duration(self) -> float:
        return self.end - self.start


def _field(text: str) -> str:
    """An RTTM field: no white space inside (it separates the fields)."""
    return "_".join(str(text).split()) or "NA"


def format_rttm(turns: Iterable[Turn], file_id: str) -> str:
    """RTTM text of ``turns`` (sorted by start), every line naming ``file_id``; zero-length turns dropped."""
    lines = []
    for t in sorted(turns, key=lambda t: (t.start, t.end, t.speaker)):
        if t.end - t.start <= 0:
            continue
        lines.append(f"SPEAKER {_field(file_id)} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> "
                     f"{_field(t.speaker)} <NA> <NA>")
    return "".join(line + "\n" for line in lines)


def write_rttm(path: str | os.PathLike[str], turns: Sequence[Turn], file_id: str) -> Path:
    """Write ``turns`` of recording ``file_id`` to ``path`` as RTTM, atomically; returns the path."""
    path = Path(path)
    text = format_rttm(turns, file_id)
    with atomic_write(path, suffix=".rttm") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def parse_rttm(text: str, where: str = "RTTM") -> list[Turn]:
    """The ``SPEAKER`` turns in RTTM ``text``; ``where`` names the source in errors."""
    turns = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith(";;"):
            continue
        if fields[0].upper() not in RTTM_TYPES:
            raise DvectorError(f"{where}:{number}: not an RTTM line: it starts with {fields[0][:40]!r}, not a type "
                               "such as SPEAKER")
        if fields[0].upper() != "SPEAKER":
            continue
        if len(fields) < 8:
            raise DvectorError(f"{where}:{number}: an RTTM SPEAKER line has 10 fields, found {len(fields)}")
        try:
            start, duration = float(fields[3]), float(fields[4])
        except ValueError:
            raise DvectorError(f"{where}:{number}: start and duration must be numbers, got "
                               f"{fields[3]!r} {fields[4]!r}") from None
        if not (math.isfinite(start) and math.isfinite(duration)) or start < 0 or duration < 0:
            raise DvectorError(f"{where}:{number}: start and duration must be finite and >= 0")
        turns.append(Turn(start, start + duration, fields[7], fields[1]))
    return turns


def read_rttm(path: str | os.PathLike[str]) -> list[Turn]:
    """The ``SPEAKER`` turns of an RTTM file (see ``parse_rttm``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first line
    except (OSError, UnicodeDecodeError) as exc:
        raise DvectorError(f"{path}: cannot read ({exc})") from exc
    return parse_rttm(text, str(path))


def rttm_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """``stem -> path`` of the ``*.rttm`` files directly in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DvectorError(f"{folder}: not a folder of RTTM files")
    return {p.stem: p for p in sorted(folder.glob("*.rttm")) if p.is_file()}
