"""Find speakers and utterances under root directories (a root holds one folder per speaker).

A speaker directory may nest subfolders. Speakers are namespaced by root (``vctk/p225``) unless
``merge_speakers`` keys them by directory name alone, as the original project did. Used by the
build (shards), evaluation and plots (use); imports nothing but the config and errors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from dvector.config import normalize_extensions
from dvector.errors import DvectorError


@dataclass(frozen=True)
class Utterance:
    path: Path  # absolute path of the audio file
    root: str  # the root directory as given
    speaker: str  # global speaker id (``rootname/speakerdir`` unless merged)
    source: str  # path relative to its root, as printed in the index


@dataclass
class ScanResult:
    utterances: list[Utterance]
    speakers: list[str]  # sorted global ids
    root_names: dict[str, str]  # root as given -> its namespace
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): scan warnings
    empty_roots: list[str] = field(default_factory=list)


def root_namespaces(roots: Sequence[str]) -> dict[str, str]:
    """A short, unique name per root: its folder name, with parent folders added to break ties."""
    paths = {r: Path(os.path.abspath(r)).parts for r in roots}
    depth = {r: 1 for r in roots}
    while True:
        names = {r: "_".join(paths[r][-depth[r]:]).strip("/") or "root" for r in roots}
        clash = [r for r in roots if list(names.values()).count(names[r]) > 1 and depth[r] < len(paths[r])]
        if not clash:
            return {r: names[r].replace("/", "_") for r in roots}
        for r in clash:
            depth[r] += 1


def walk_files(top: Path, extensions: frozenset[str], problems: list[tuple[str, str]]) -> list[Path]:
    """All non-hidden audio files below ``top``, following symlinks without looping, sorted."""
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError as exc:
            problems.append((str(folder), f"cannot read folder: {exc.strerror or exc}"))
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:
            continue  # a symlink loop or a folder reached twice
        seen_dirs.add(ident)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            problems.append((str(folder), f"cannot list folder: {exc.strerror or exc}"))
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():  # follows symlinks
                    subdirs.append(Path(entry.path))
                elif entry.is_file() and entry.name.rsplit(".", 1)[-1].lower() in extensions and "." in entry.name:
                    found.append(Path(entry.path))
            except OSError as exc:
                problems.append((entry.path, f"cannot stat: {exc.strerror or exc}"))
        stack.extend(reversed(subdirs))
    return sorted(found)


def scan_roots(roots: Sequence[str], extensions: Iterable[str], merge_speakers: bool = False) -> ScanResult:
    """List every speaker directory and utterance under ``roots``, deterministically."""
    if not roots:
        raise DvectorError("give at least one root directory")
    exts = frozenset(normalize_extensions(extensions))
    for root in roots:
        if not os.path.isdir(root):
            raise DvectorError(f"root directory {root!r} does not exist or is not a directory")
    names = root_namespaces(list(roots))
    utterances: list[Utterance] = []
    problems: list[tuple[str, str]] = []
    empty_roots: list[str] = []
    for root in roots:
        top = Path(os.path.abspath(root))
        count_before = len(utterances)
        try:
            entries = sorted(os.scandir(top), key=lambda e: e.name)
        except OSError as exc:
            raise DvectorError(f"cannot list root {root!r}: {exc.strerror or exc}") from exc
        loose = 0
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                speaker = entry.name if merge_speakers else f"{names[root]}/{entry.name}"
                for path in walk_files(Path(entry.path), exts, problems):
                    source = str(path.relative_to(top))
                    utterances.append(Utterance(path=path, root=root, speaker=speaker, source=source))
            elif entry.name.rsplit(".", 1)[-1].lower() in exts:
                loose += 1
        if loose:
            problems.append((root, f"{loose} audio file(s) directly in the root are not in a speaker directory and were ignored"))
        if len(utterances) == count_before:
            empty_roots.append(root)
    speakers = sorted({u.speaker for u in utterances})
    return ScanResult(utterances, speakers, names, problems, empty_roots)
