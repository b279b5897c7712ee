"""Speakers and utterances under root directories (a root holds one folder per speaker).

A speaker directory may nest subfolders. Speakers are namespaced by root (``vctk/p225``) unless
``merge_speakers`` keys them by directory name alone, as the original project did.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from dvector.config import normalize_extensions
from dvector.corpus.utterances import ScanResult, Utterance, root_namespaces
from dvector.errors import DvectorError


class Aliases:
    """Shared by the walks of one scan: what was read already, and which speaker owns which folder.

    Every audio file (by real path) is read once and belongs to the speaker folder that holds it by
    real path; a folder or file reached a second time (a symlink to ``..``, to another speaker, to
    the root itself, or two links to one file) is an alias: it is not read again, and listed once in
    ``aliases`` as (path as reached, reason).
    """

    def __init__(self, owners: dict[str, str | None] | None = None) -> None:
        self.owners: dict[str, str | None] = dict(owners or {})  # real path -> speaker id (None: a root)
        self.seen_dirs: dict[tuple[int, int], str] = {}  # (device, inode) -> the path it was first read as
        self.seen_files: dict[str, str] = {}  # real path -> the path it was first read as
        self.aliases: list[tuple[str, str]] = []

    def owner(self, real: str) -> tuple[bool, str | None]:
        """(found, owner) of the nearest registered folder holding ``real`` (itself included)."""
        path = real
        while True:
            if path in self.owners:
                return True, self.owners[path]
            parent = os.path.dirname(path)
            if parent == path:
                return False, None
            path = parent

    def foreign(self, real: str, speaker: str | None, reached: str) -> bool:
        """True (and the alias noted) if ``real`` is held by a speaker folder or root other than ``speaker``'s."""
        found, holder = self.owner(real)
        if not found or holder == speaker:
            return False
        if holder is None:
            self.aliases.append((reached, f"alias of {real}, a root folder: not read again here"))
        else:
            self.aliases.append((reached, f"alias of {real}, in the speaker folder of {holder}: read there, not here"))
        return True


def _ext_ok(name: str, extensions: frozenset[str]) -> bool:
    return "." in name and name.rsplit(".", 1)[-1].lower() in extensions


def walk_files(top: Path, extensions: frozenset[str], problems: list[tuple[str, str]],
               aliases: Aliases | None = None, speaker: str | None = None) -> list[Path]:
    """All non-hidden audio files below ``top``, following symlinks without looping, sorted.

    With ``aliases`` (shared by the walks of one scan): folders and files already read, or held by
    another speaker folder (``aliases.owners``) by real path, are skipped and noted there.
    """
    state = aliases if aliases is not None else Aliases()
    found: list[Path] = []
    stack: list[tuple[Path, str | None]] = [(top, None)]  # (folder as reached, its real path if known)
    while stack:
        folder, real = stack.pop()
        try:
            st = folder.stat()
        except OSError as exc:
            problems.append((str(folder), f"cannot read folder: {exc.strerror or exc}"))
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in state.seen_dirs:
            state.aliases.append((str(folder), f"alias of {state.seen_dirs[ident]}, already read: not read again"))
            continue
        state.seen_dirs[ident] = str(folder)
        real = real if real is not None else os.path.realpath(folder)
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
                linked = entry.is_symlink()
                if entry.is_dir():  # follows symlinks
                    sub_real = os.path.realpath(entry.path) if linked else os.path.join(real, entry.name)
                    if linked or sub_real in state.owners:
                        if state.foreign(sub_real, speaker, entry.path):
                            continue
                    subdirs.append((Path(entry.path), sub_real))
                elif entry.is_file() and _ext_ok(entry.name, extensions):
                    file_real = os.path.realpath(entry.path) if linked else os.path.join(real, entry.name)
                    if linked and state.foreign(file_real, speaker, entry.path):
                        continue
                    if file_real in state.seen_files:
                        state.aliases.append((entry.path, f"alias of {state.seen_files[file_real]}, already read"))
                        continue
                    state.seen_files[file_real] = entry.path
                    found.append(Path(entry.path))
            except OSError as exc:
                problems.append((entry.path, f"cannot stat: {exc.strerror or exc}"))
        stack.extend(reversed(subdirs))
    return sorted(found)


def _unique_roots(roots: Sequence[str], problems: list[tuple[str, str]]) -> dict[str, str]:
    """Root as given -> its real path, each folder once: a root given twice (``c1 c1/``, or a link
    to another root) is read once, and noted."""
    first: dict[str, str] = {}
    unique: dict[str, str] = {}
    for root in roots:
        real = os.path.realpath(root)
        if real in first:
            problems.append((root, f"the same folder as a root given before it ({first[real]}): read once"))
            continue
        first[real] = root
        unique[root] = real
    return unique


def _speaker_folders(root: str, problems: list[tuple[str, str]], extensions: frozenset[str]
                     ) -> list[tuple[str, str]]:
    """(name, path) of the speaker folders directly in ``root``, sorted; loose audio noted."""
    try:
        entries = sorted(os.scandir(os.path.abspath(root)), key=lambda e: e.name)
    except OSError as exc:
        raise DvectorError(f"cannot list root {root!r}: {exc.strerror or exc}") from exc
    folders, loose = [], 0
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                folders.append((entry.name, entry.path))
            elif _ext_ok(entry.name, extensions):
                loose += 1
        except OSError as exc:
            problems.append((entry.path, f"cannot stat: {exc.strerror or exc}"))
    if loose:
        problems.append((root, f"{loose} audio file(s) directly in the root are not in a speaker directory and were ignored"))
    return folders


def scan_roots(roots: Sequence[str], extensions: Iterable[str], merge_speakers: bool = False) -> ScanResult:
    """List every speaker directory and utterance under ``roots``, deterministically.

    Symlinked roots, speaker folders and subfolders are followed, but every audio file is read once
    (by real path) and belongs to the speaker folder that holds it by real path; a path reached a
    second time is listed once in ``problems`` as an alias, and a root given twice is read once.
    """
    if not roots:
        raise DvectorError("give at least one root directory")
    exts = frozenset(normalize_extensions(extensions))
    for root in roots:
        if not os.path.isdir(root):
            raise DvectorError(f"root directory {root!r} does not exist or is not a directory")
    problems: list[tuple[str, str]] = []
    unique = _unique_roots(roots, problems)
    names = root_namespaces(list(unique))
    owners: dict[str, str | None] = {real: None for real in unique.values()}
    speakers_of: dict[str, list[tuple[str, str, str]]] = {}
    for root in unique:
        speakers_of[root] = []
        for name, path in _speaker_folders(root, problems, exts):
            speaker = name if merge_speakers else f"{names[root]}/{name}"
            real = os.path.realpath(path)
            if real in owners:
                holder = owners[real]
                what = f"the speaker folder of {holder}" if holder is not None else "a root folder"
                problems.append((path, f"alias of {real}, {what}: not read as a speaker"))
                continue
            owners[real] = speaker
            speakers_of[root].append((speaker, path, real))
    aliases = Aliases(owners)
    utterances: list[Utterance] = []
    empty_roots: list[str] = []
    for root in unique:
        top = Path(os.path.abspath(root))
        count_before = len(utterances)
        for speaker, path, _real in speakers_of[root]:
            for found in walk_files(Path(path), exts, problems, aliases, speaker):
                utterances.append(Utterance(path=found, root=root, speaker=speaker, source=str(found.relative_to(top))))
        if len(utterances) == count_before:
            empty_roots.append(root)
    problems.extend(aliases.aliases)
    speakers = sorted({u.speaker for u in utterances})
    return ScanResult(utterances, speakers, names, problems, empty_roots)
