"""Utterances of Lhotse manifests, read through the ``lhotse`` package (``pip install 'dvector[lhotse]'``).

Give a cut set, or a recording set with its supervision set (each a ``.jsonl.gz``/``.jsonl``/``.json``
file, in any order). Every supervision is an utterance: its recording's audio from the supervision's
start for its duration (within its cut), its speaker ``MANIFEST_NAME/SPEAKER`` (the cut or recording
file's name without its extensions; ``merge_speakers``: ``SPEAKER`` alone), its key the supervision id.
Recordings stored as files are read; ``command`` sources only with ``allow_commands``; URL and
in-memory sources, and supervisions without a speaker, are problems ``(id, reason)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dvector.corpus.utterances import ScanResult, Utterance
from dvector.errors import DvectorError


def _lhotse() -> Any:
    try:
        import lhotse
    except ImportError:
        raise DvectorError("--lhotse needs the lhotse package: pip install 'dvector[lhotse]'") from None
    return lhotse


def manifest_name(path: str) -> str:
    """``librispeech_cuts_train.jsonl.gz`` -> ``librispeech_cuts_train``."""
    name = Path(path).name
    for ext in (".gz", ".jsonl", ".json", ".ndjson", ".yaml", ".yml"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    return name


def _load(paths: Sequence[str]) -> tuple[Any, str]:
    """The cuts the manifests make (a cut set, or recordings with supervisions), and the corpus's name."""
    lhotse = _lhotse()
    loaded = {}
    for path in paths:
        try:
            manifest = lhotse.load_manifest(path)
        except Exception as exc:  # lhotse raises what its readers raise
            raise DvectorError(f"cannot read Lhotse manifest {path}: {type(exc).__name__}: {exc}") from None
        kind = type(manifest).__name__
        if kind in loaded:
            raise DvectorError(f"Lhotse manifests {loaded[kind][0]} and {path} are both a {kind}: give one")
        loaded[kind] = (path, manifest)
    if "CutSet" in loaded:
        return loaded["CutSet"][1], manifest_name(loaded["CutSet"][0])
    if "RecordingSet" in loaded and "SupervisionSet" in loaded:
        cuts = lhotse.CutSet.from_manifests(recordings=loaded["RecordingSet"][1],
                                            supervisions=loaded["SupervisionSet"][1])
        return cuts, manifest_name(loaded["RecordingSet"][0])
    raise DvectorError("--lhotse needs a cut set, or a recording set and its supervision set "
                       f"(given: {', '.join(k for k in loaded) or 'nothing'})")


def _source(recording: Any, allow_commands: bool) -> tuple[Path, str]:
    """(path, command) of a recording's first audio source; ValueError for one that is not read."""
    source = recording.sources[0]
    if source.type == "file":
        return Path(str(source.source)).absolute(), ""
    if source.type == "command":
        if not allow_commands:
            raise ValueError("a command source: refused; --allow-commands runs it")
        return Path(recording.id), str(source.source)
    raise ValueError(f"a {source.type} source: only files (and commands) are read")


def scan_lhotse(paths: Sequence[str], allow_commands: bool = False, merge_speakers: bool = False) -> ScanResult:
    """Every supervision of the manifests as an utterance (see the module doc)."""
    cuts, name = _load(paths)
    root = str(paths[0])
    problems: list[tuple[str, str]] = []
    utterances: dict[str, Utterance] = {}
    for cut in cuts:
        recording = getattr(cut, "recording", None)
        if recording is None:
            problems.append((cut.id, "a cut without a recording"))
            continue
        try:
            path, command = _source(recording, allow_commands)
        except ValueError as exc:
            problems.append((recording.id, str(exc)))
            continue
        for sup in cut.supervisions:
            if not sup.speaker:
                problems.append((sup.id, "a supervision without a speaker"))
                continue
            start = cut.start + max(0.0, sup.start)
            end = min(cut.start + cut.duration, cut.start + sup.start + sup.duration)
            if sup.id in utterances or end <= start:
                problems.append((sup.id, "again: the first is used" if sup.id in utterances else "empty"))
                continue
            speaker = sup.speaker if merge_speakers else f"{name}/{sup.speaker}"
            utterances[sup.id] = Utterance(path=path, root=root, speaker=speaker, source=sup.id, start=start,
                                           end=end, command=command)
    listed = [utterances[k] for k in sorted(utterances)]
    return ScanResult(listed, sorted({u.speaker for u in listed}), {root: name}, problems, [] if listed else [root])
