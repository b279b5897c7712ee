"""What a build counted and how it tells a progress display, whoever runs its shard jobs.

Owns :class:`BuildReport` (a run's totals), :class:`ShardTally` (what writing one shard counted,
added to the report as each shard is written) and :class:`Progress` (the display's callbacks).
Both ways of running the jobs fill them the same way: the local process pool
(:mod:`dvector.shards.build`) and a Dask cluster (:mod:`dvector.shards.dask_build`). Imports nothing
of the package: every build module may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class BuildReport:
    out_dir: Path
    shards_total: int = 0
    shards_written: int = 0
    shards_skipped: int = 0  # complete from an earlier run
    utterances_ok: int = 0
    samples_ok: int = 0  # samples written: utterances_ok, or more with --split-seconds (one per segment)
    cut_to_fit: int = 0  # utterances too long for one sample that readers take, written in pieces
    failures: list[dict[str, str]] = field(default_factory=list)
    audio_s: float = 0.0
    frames: int = 0
    wall_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    index_written: bool = False
    speakers: int = 0
    few_utterance_speakers: list[str] = field(default_factory=list)
    empty_roots: list[str] = field(default_factory=list)
    scan_problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def realtime_factor(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Progress:
    """Callbacks for a progress display; all optional."""

    start: Callable[[int, int], None] = lambda total_files, total_shards: None
    advance: Callable[[int, float], None] = lambda files, audio_s: None


@dataclass
class ShardTally:
    """What writing one shard counted: added to the build's report by :meth:`absorb`."""

    utterances_ok: int = 0
    samples_ok: int = 0
    cut_to_fit: int = 0
    frames: int = 0
    audio_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)

    def absorb(self, report: BuildReport) -> None:
        report.shards_written += 1
        report.utterances_ok += self.utterances_ok
        report.samples_ok += self.samples_ok
        report.cut_to_fit += self.cut_to_fit
        report.frames += self.frames
        report.audio_s += self.audio_s
        report.failures.extend(self.failures)
        for stage, secs in self.stage_s.items():
            report.stage_s[stage] = report.stage_s.get(stage, 0.0) + secs
