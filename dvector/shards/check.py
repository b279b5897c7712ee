"""Verify a shard folder against its index: every shard present, same size and sha256, decodable.

Decodable means what every reader requires (:mod:`dvector.shards.reader`): a complete tar whose
samples have finite mels of the index's mel bands and speaker indices within its speaker table.

A ``.tar`` in the folder that the index does not list is reported too (``unlisted``), as a warning:
nothing that reads the folder through its index reads it, so the data checked is not damaged by it,
but a pattern or glob over the folder (``shard-*.tar``) would read it as well, and it often means a
leftover of another build or parts built after the index was written (``dvector index`` again).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dvector.files import sha256_file
from dvector.shards.format import ShardInfo
from dvector.shards.index import index_checks, read_index
from dvector.shards.reader import SampleChecks, iter_shard


@dataclass
class CheckReport:
    shards: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (shard, what is wrong)
    unlisted: list[str] = field(default_factory=list)  # .tar files in the folder that the index does not list

    @property
    def ok(self) -> bool:
        return not self.problems


def describe_tar(path: Path, checks: SampleChecks | None = None) -> ShardInfo:
    """What a shard file holds, by reading every sample (raises on a corrupt shard or a bad sample,
    by ``checks`` where given)."""
    info = ShardInfo(name=path.name, bytes=path.stat().st_size, sha256=sha256_file(path))
    speakers = set()
    for sample in iter_shard(str(path), checks):
        info.samples += 1
        info.frames += int(sample["mel"].shape[0])
        speakers.add(int(sample["speaker_index"]))
    info.speakers = sorted(speakers)
    return info


def check_one(path: Path, expected: dict[str, Any], checks: SampleChecks | None = None) -> list[str]:
    """What is wrong with one shard compared with its index entry (empty: nothing)."""
    if not path.exists():
        return ["missing"]
    if path.stat().st_size != expected["bytes"]:
        return [f"size {path.stat().st_size} bytes, index says {expected['bytes']}"]
    try:
        info = describe_tar(path, checks)
    except Exception as exc:  # any decoding failure means a broken shard
        return [f"cannot be read: {exc}"]
    problems = []
    if info.sha256 != expected["sha256"]:
        problems.append("sha256 differs from the index")
    for name in ("samples", "frames", "speakers"):
        if getattr(info, name) != expected[name]:
            problems.append(f"{name} differ from the index")
    return problems


def check_shards(folder: str | Path, workers: int = 1, on_shard: Callable[[], None] = lambda: None) -> CheckReport:
    """Check every shard listed in ``folder/index.json`` on ``workers`` processes (0: every core)."""
    workers = workers or os.cpu_count() or 1
    folder = Path(folder)
    index = read_index(folder)
    report = CheckReport(shards=len(index["shards"]))
    entries = index["shards"]
    report.unlisted = unlisted_tars(folder, {str(e.get("name")) for e in entries})
    checks = index_checks(index)  # once: it reads the whole speaker table
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(check_one, [folder / e["name"] for e in entries], entries, [checks] * len(entries))
            for entry, problems in zip(entries, results):
                report.problems.extend((entry["name"], p) for p in problems)
                on_shard()
    else:
        for entry in entries:
            problems = check_one(folder / entry["name"], entry, checks)
            report.problems.extend((entry["name"], p) for p in problems)
            on_shard()
    return report


def unlisted_tars(folder: Path, listed: set[str]) -> list[str]:
    """The names of the ``.tar`` files in ``folder`` (not hidden: temporaries are) that are not ``listed``."""
    try:
        names = [p.name for p in folder.iterdir() if p.name.lower().endswith(".tar") and not p.name.startswith(".")]
    except OSError:
        return []
    return sorted(n for n in names if n not in listed)
