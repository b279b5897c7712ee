"""Utterances of Kaldi data directories: ``wav.scp`` and ``utt2spk``, with ``segments`` where present.

- ``wav.scp`` (``ID PATH`` or ``ID COMMAND |``): a path is absolute or relative to ``kaldi_root``
  (default: the current folder); a command (the line ends in ``|``) is an utterance only when
  ``allow_commands`` says so: data files never run code unasked.
- ``utt2spk`` (``UTT SPEAKER``) names each utterance's speaker: ``DATA_DIR_NAME/SPEAKER``, as a root
  names ``ROOT_NAME/SPEAKER_FOLDER`` (``merge_speakers``: ``SPEAKER`` alone).
- ``segments`` (``UTT RECORDING START END``, seconds; END -1: to the end): each utterance is cut from
  its recording in ``wav.scp``.

Whatever is wrong with one line (a duplicated id, an utterance without a speaker, a speaker without an
utterance, a segment that makes no sense) is one problem ``(FILE:LINE, reason)``, counted like a scan
warning; it never stops the listing. A segment past its recording's end is found when it is decoded.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dvector.corpus.utterances import ScanResult, Utterance, root_namespaces
from dvector.errors import DvectorError


@dataclass(frozen=True)
class Line:
    where: str  # FILE:LINE
    key: str
    value: str


def read_table(path: Path, problems: list[tuple[str, str]]) -> dict[str, Line]:
    """``KEY VALUE...`` lines of a Kaldi table; a key seen before and a line without a value are problems."""
    table: dict[str, Line] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise DvectorError(f"cannot read {path}: {exc.strerror or exc}") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path}:{number}"
        key, _, value = line.partition(" ")
        if "\t" in key:
            key, _, rest = key.partition("\t")
            value = f"{rest} {value}".strip()
        value = value.strip()
        if not value:
            problems.append((where, f"{key!r} has no value"))
        elif key in table:
            problems.append((where, f"{key!r} again (first at line {table[key].where.rsplit(':', 1)[1]}): the first is used"))
        else:
            table[key] = Line(where, key, value)
    return table


def _recording(line: Line, base: Path, allow_commands: bool, problems: list[tuple[str, str]]
               ) -> tuple[Path, str] | None:
    """(path, command) of a ``wav.scp`` entry, or None (a problem noted) for a command not allowed."""
    if line.value.endswith("|"):
        if not allow_commands:
            problems.append((line.where, f"{line.key!r}: a command (the entry ends in '|'): refused; "
                                         "--allow-commands runs it"))
            return None
        # run in the folder that relative paths start from, as its paths are written for it
        return Path(line.where.rsplit(":", 1)[0]).absolute(), f"cd {shlex.quote(str(base))} && {line.value[:-1].strip()}"
    path = Path(line.value)
    return (path if path.is_absolute() else (base / path)).absolute(), ""


def _segments(data_dir: Path, wav: dict[str, Line], problems: list[tuple[str, str]]
              ) -> dict[str, tuple[Line, float, float, str]]:
    """Utterance id -> (its recording's wav.scp line, start, end, its own segments line) from ``segments``."""
    cut: dict[str, tuple[Line, float, float, str]] = {}
    for uid, line in read_table(data_dir / "segments", problems).items():
        fields = line.value.split()
        try:
            rec, start, end = fields[0], float(fields[1]), float(fields[2])
        except (IndexError, ValueError):
            problems.append((line.where, f"{uid!r}: a segment is 'UTT RECORDING START END' in seconds"))
            continue
        if rec not in wav:
            problems.append((line.where, f"{uid!r}: recording {rec!r} is not in wav.scp"))
        elif start < 0 or (end != -1 and end <= start):
            problems.append((line.where, f"{uid!r}: segment {start:g}-{end:g} s is empty or negative"))
        else:
            cut[uid] = (wav[rec], start, 0.0 if end == -1 else end, line.where)
    return cut


def _scan_one(data_dir: Path, name: str, base: Path, allow_commands: bool, merge_speakers: bool,
              problems: list[tuple[str, str]], root: str) -> list[Utterance]:
    for needed in ("wav.scp", "utt2spk"):
        if not (data_dir / needed).is_file():
            raise DvectorError(f"{data_dir} is not a Kaldi data directory: it has no {needed}")
    wav = read_table(data_dir / "wav.scp", problems)
    speakers = read_table(data_dir / "utt2spk", problems)
    if (data_dir / "segments").is_file():
        entries = _segments(data_dir, wav, problems)
    else:
        entries = {uid: (line, 0.0, 0.0, line.where) for uid, line in wav.items()}
    utterances = []
    wav_value = {uid: entries[uid][0].value for uid in entries}
    for uid in sorted(entries):
        line, start, end, where = entries[uid]
        if uid not in speakers:
            problems.append((where, f"{uid!r} is not in utt2spk: skipped"))
            continue
        recording = _recording(line, base, allow_commands, problems)
        if recording is None:
            continue
        spk = speakers[uid].value.split()[0]
        utterances.append(Utterance(path=recording[0], root=root, speaker=spk if merge_speakers else f"{name}/{spk}",
                                    source=uid, start=start, end=end, command=recording[1]))
    listing = "segments" if (data_dir / "segments").is_file() else "wav.scp"
    for uid, line in speakers.items():
        if uid not in entries:
            problems.append((line.where, f"{uid!r} is in utt2spk but not in {listing}"))
    have = {u.speaker.rsplit("/", 1)[-1] if not merge_speakers else u.speaker for u in utterances}
    first_line = {}
    for line in speakers.values():
        first_line.setdefault(line.value.split()[0], line.where)
    for spk in sorted(set(first_line) - have):
        problems.append((first_line[spk], f"speaker {spk!r} has no utterance to read"))
    relative = [u for u in utterances if not u.command and not Path(wav_value[u.source]).is_absolute()]
    _check_relative_paths(relative, base)
    return utterances


def _check_relative_paths(relative: list[Utterance], base: Path) -> None:
    """One line, at once, when none of the relative paths of ``wav.scp`` (``relative``: their utterances)
    exists under ``base``: the paths start elsewhere (``--kaldi-root``), and every file would be skipped."""
    if relative and not any(u.path.exists() for u in relative[:1000]):
        raise DvectorError(f"none of the first {min(len(relative), 1000)} paths of wav.scp exists under {base} "
                           f"(e.g. {relative[0].path}): give --kaldi-root, the folder its relative paths start from")


def scan_kaldi(data_dirs: Sequence[str], kaldi_root: str | os.PathLike[str] | None = None,
               allow_commands: bool = False, merge_speakers: bool = False) -> ScanResult:
    """Every utterance of the Kaldi data directories ``data_dirs`` (see the module doc), deterministically."""
    if not data_dirs:
        raise DvectorError("give at least one Kaldi data directory")
    base = Path(kaldi_root if kaldi_root is not None else os.getcwd())
    if not base.is_dir():
        raise DvectorError(f"--kaldi-root {base} is not a folder")
    names = root_namespaces(list(data_dirs))
    problems: list[tuple[str, str]] = []
    utterances: list[Utterance] = []
    empty: list[str] = []
    for root in data_dirs:
        found = _scan_one(Path(root), names[root], base, allow_commands, merge_speakers, problems, root)
        if not found:
            empty.append(root)
        utterances.extend(found)
    return ScanResult(utterances, sorted({u.speaker for u in utterances}), names, problems, empty)
