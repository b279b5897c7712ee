"""Utterances of a table: a CSV, TSV or JSON-lines manifest with ``path`` and ``speaker`` columns, and
optional ``start`` and ``end`` (seconds into the recording) and ``id`` (the utterance's key; default:
its path as written, with ``@START-END`` for a segment).

The format follows the extension: ``.csv``, ``.tsv`` (or ``.txt``), ``.jsonl``/``.ndjson``/``.json``
(one object per line). Relative paths are relative to the manifest's own folder. Speakers are named
``MANIFEST_NAME/SPEAKER`` (the file name without its extension), as a root names its speaker folders
(``merge_speakers``: ``SPEAKER`` alone). A row that cannot be used is one problem ``(FILE:LINE, reason)``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from dvector.corpus.utterances import ScanResult, Utterance, root_namespaces
from dvector.errors import DvectorError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "json", ".ndjson": "json", ".json": "json"}
MAX_JSON_LINE = 1 << 20  # bytes: a longer line is not a manifest row


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row) of a manifest; a row that cannot be parsed is the reason instead."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DvectorError(f"manifest {path}: unknown format; name it .csv, .tsv or .jsonl")
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DvectorError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    with f:
        if kind == "json":
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line) if len(line) <= MAX_JSON_LINE else None
                except (ValueError, RecursionError):
                    row = None
                yield number, row if isinstance(row, dict) else "not a JSON object"
            return
        reader = csv.DictReader(f, delimiter="," if kind == "csv" else "\t")
        if not reader.fieldnames or not {"path", "speaker"} <= {n.strip() for n in reader.fieldnames}:
            raise DvectorError(f"manifest {path}: its first line must name the columns, with path and speaker "
                               f"(found {', '.join(reader.fieldnames or []) or 'nothing'})")
        for row in reader:
            yield reader.line_num, {(k or "").strip(): v for k, v in row.items()}


def _seconds(value: Any, name: str) -> float:
    if value in (None, ""):
        return 0.0
    seconds = float(value)
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{name} must be seconds >= 0, got {value!r}")
    return seconds


def _utterance(row: dict[str, Any], base: Path, root: str, namespace: str, merge: bool) -> Utterance:
    """One row as an utterance; ValueError says why it cannot be one."""
    path, speaker = str(row.get("path") or "").strip(), str(row.get("speaker") or "").strip()
    if not path or not speaker:
        raise ValueError("needs a path and a speaker")
    start, end = _seconds(row.get("start"), "start"), _seconds(row.get("end"), "end")
    if end and end <= start:
        raise ValueError(f"segment {start:g}-{end:g} s is empty")
    key = str(row.get("id") or "").strip() or (path + (f"@{start:g}-{end:g}" if start or end else ""))
    full = Path(path) if Path(path).is_absolute() else base / path
    return Utterance(path=full.absolute(), root=root, speaker=speaker if merge else f"{namespace}/{speaker}",
                     source=key, start=start, end=end)


def scan_manifests(manifests: Sequence[str], merge_speakers: bool = False) -> ScanResult:
    """Every usable row of the ``manifests`` (see the module doc); a key seen twice is used once."""
    if not manifests:
        raise DvectorError("give at least one manifest")
    names = {m: n.rsplit(".", 1)[0] if "." in n else n for m, n in root_namespaces(list(manifests)).items()}
    problems: list[tuple[str, str]] = []
    utterances: list[Utterance] = []
    empty: list[str] = []
    for manifest in manifests:
        path = Path(manifest)
        seen: dict[str, int] = {}
        before = len(utterances)
        for number, row in _rows(path):
            where = f"{manifest}:{number}"
            if isinstance(row, str):
                problems.append((where, row))
                continue
            try:
                utt = _utterance(row, path.parent, manifest, names[manifest], merge_speakers)
            except ValueError as exc:
                problems.append((where, str(exc)))
                continue
            if utt.source in seen:
                problems.append((where, f"{utt.source!r} again (first at line {seen[utt.source]}): the first is used"))
                continue
            seen[utt.source] = number
            utterances.append(utt)
        if len(utterances) == before:
            empty.append(manifest)
    utterances.sort(key=lambda u: (u.root, u.source))
    return ScanResult(utterances, sorted({u.speaker for u in utterances}), names, problems, empty)

