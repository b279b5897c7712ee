"""What every way of naming a corpus gives the build and the evaluation: utterances with their speakers,
and the problems found while listing them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Utterance:
    path: Path  # absolute path of the audio file (of the listing, for a command's output)
    root: str  # the root directory (Kaldi data directory, manifest) as given
    speaker: str  # global speaker id (``rootname/speakerdir`` unless merged)
    source: str  # path relative to its root, or the listing's utterance id: its key in the index and outputs
    start: float = 0.0  # seconds into the recording where the utterance starts (Kaldi ``segments``, manifests)
    end: float = 0.0  # seconds where it ends; 0: the end of the recording
    command: str = ""  # a shell pipeline whose output is the recording (a Kaldi ``wav.scp`` entry ending in ``|``)

    @property
    def is_segment(self) -> bool:
        return self.start > 0 or self.end > 0


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
