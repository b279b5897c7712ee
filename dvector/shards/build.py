"""Run a build: one job per shard over a process pool, resumable, splittable into parts.

The folder's layout and records are :mod:`dvector.shards.build_folder`'s; the index written at the
end is :mod:`dvector.shards.index`'s. Work is spread over the pool by chunks of utterances, and
results come back in plan order, so each shard's tar is written whole by this process. On a Dask
cluster (``dask=``, :mod:`dvector.shards.dask_build`) each shard is one task, :func:`build_one_shard`,
that writes it on the worker. Both make a shard's bytes with :class:`ShardContent`, so they agree.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from dvector.config import BuildConfig, FeatureConfig, VadConfig
from dvector.corpus import ScanResult, scan_roots
from dvector.errors import DvectorError
from dvector.files import display_path, write_json_atomic
from dvector.shards.build_folder import (is_complete, plan_record, prepare_folder, remove_stale_temps,
                                         sidecar_path)
from dvector.shards.format import shard_name, write_shard
from dvector.shards.index import write_index
from dvector.shards.plan import Plan, PlannedUtterance, make_plan, segment_bounds, segment_frames, segment_key
from dvector.signal.process import SkipUtterance, process_file
from dvector.signal.vad import warm_up

CHUNK_UTTERANCES = 16  # utterances per task: work is spread by utterance, not only by shard


@dataclass
class BuildReport:
    out_dir: Path
    shards_total: int = 0
    shards_written: int = 0
    shards_skipped: int = 0  # complete from an earlier run
    utterances_ok: int = 0
    samples_ok: int = 0  # samples written: utterances_ok, or more with --split-seconds (one per segment)
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


def parse_part(text: str | None) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``; parts count from 1."""
    if not text:
        return 1, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DvectorError(f"--part takes i/n such as 3/8, got {text!r}") from None
    if n < 1 or not 1 <= i <= n:
        raise DvectorError(f"--part {text}: need 1 <= i <= n (parts count from 1; with a 0-based array id use $((ID+1))/n)")
    return i, n


# ---- worker side -------------------------------------------------------------------------------

def _init_worker() -> None:
    """One BLAS thread per worker: the workers already fill the cores, and multi-threaded BLAS on
    the small feature matrices is many times slower than one thread. Large buffers come from a
    heap that is kept, not from fresh memory maps (see ``keep_freed_memory``)."""
    threadpool_limits(1)
    keep_freed_memory()
    warm_up()


def keep_freed_memory() -> bool:
    """Ask glibc to serve large allocations from a heap it keeps instead of mapping and unmapping
    memory for each one: every utterance allocates a few arrays of megabytes, and faulting their
    pages in afresh made feature extraction twice as slow (0.51 -> 0.22 s per hour of audio).
    A no-op (False) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = mallopt(M_MMAP_THRESHOLD, 256 << 20) and mallopt(M_TRIM_THRESHOLD, 1 << 30) and mallopt(M_TOP_PAD, 64 << 20)
    return bool(ok)


def _process_chunk(
    items: list[tuple[str, str, str, int, str, float]], features: FeatureConfig, vad: VadConfig
) -> list[tuple[str, Any, dict[str, Any]]]:
    """Features for a chunk of (key, path, root name, speaker index, source, speed); runs in a worker."""
    out = []
    for key, path, root_name, speaker_index, source, speed in items:
        try:
            result = process_file(Path(path), features, vad, speed)
        except SkipUtterance as exc:
            out.append((key, None, {"reason": str(exc)}))
            continue
        except Exception as exc:  # a bug or an odd file must not stop a week-long build
            out.append((key, None, {"reason": f"unexpected error: {type(exc).__name__}: {exc}"}))
            continue
        meta = {
            "duration_s": round(result.duration_s, 4),
            "vad": round(result.vad_kept, 4),
            "input_rate": result.input_rate,
            "seconds": result.seconds,
        }
        if speed != 1.0:  # only on perturbed copies: samples as recorded are stored as before the option
            meta["speed"] = speed
        out.append((key, result.mel, meta))
    return out


FEW_UTTERANCES = 10  # speakers with fewer are reported: too few for typical GE2E batches (M=10)


# ---- parent side -------------------------------------------------------------------------------

def _chunks(plan: Plan, numbers: Sequence[int], roots: dict[str, str]) -> Iterator[tuple[int, list]]:
    for number in numbers:
        items = [(p.key, str(p.utterance.path), roots[p.utterance.root], p.speaker_index, p.utterance.source,
                  p.speed) for p in plan.shards[number]]
        for i in range(0, len(items), CHUNK_UTTERANCES):
            yield number, items[i:i + CHUNK_UTTERANCES]


def _ordered_results(pool: ProcessPoolExecutor | None, tasks: Iterator[tuple[int, list]], cfg: BuildConfig,
                     window: int) -> Iterator[tuple[int, list, list]]:
    """Results of the tasks in submission order, with at most ``window`` tasks in flight."""
    if pool is None:
        with threadpool_limits(1):
            for number, items in tasks:
                yield number, items, _process_chunk(items, cfg.features, cfg.vad)
        return
    pending: deque[tuple[int, list, Future]] = deque()
    for number, items in tasks:
        pending.append((number, items, pool.submit(_process_chunk, items, cfg.features, cfg.vad)))
        if len(pending) >= window:
            n, it, fut = pending.popleft()
            yield n, it, fut.result()
    while pending:
        n, it, fut = pending.popleft()
        yield n, it, fut.result()


def _speaker_counts(samples: list[tuple[str, np.ndarray, dict]]) -> dict[str, list[int]]:
    counts: dict[str, list[int]] = {}
    for _, mel, meta in samples:
        entry = counts.setdefault(str(meta["speaker_index"]), [0, 0])
        entry[0] += 1
        entry[1] += int(mel.shape[0])
    return counts


class ShardContent:
    """One shard's samples, failures and counts, made from its utterances' results in plan order, and
    written (tar, then record) by :meth:`write`: the one place that says what a shard's bytes are, for
    the local build (results arrive by chunks) and a shard job on a cluster (one shard per job) alike."""

    def __init__(self, root_names: dict[str, str], by_key: dict[str, PlannedUtterance], segment: int = 0,
                 fail_fast: bool = False) -> None:
        self.root_names, self.by_key, self.fail_fast = root_names, by_key, fail_fast
        self.segment = segment  # frames per segment with --split-seconds (0: each utterance is one sample)
        self.samples: list[tuple[str, np.ndarray, dict]] = []
        self.failures: list[dict[str, str]] = []
        self.tally = ShardTally()

    def add(self, results: list[tuple[str, Any, dict[str, Any]]]) -> float:
        """Take one chunk's results; returns the seconds of audio they held."""
        audio_s = 0.0
        for key, mel, meta in results:
            planned = self.by_key[key]
            utt = planned.utterance
            if mel is None:
                self._failed(planned, meta["reason"])
                continue
            for stage, secs in meta.pop("seconds").items():
                self.tally.stage_s[stage] = self.tally.stage_s.get(stage, 0.0) + secs
            meta.update(speaker=planned.speaker, speaker_index=planned.speaker_index, root=self.root_names[utt.root],
                        source=utt.source, n_frames=int(mel.shape[0]))
            self._add_samples(key, mel, meta)
            audio_s += meta["duration_s"]
            self.tally.utterances_ok += 1
            self.tally.frames += int(mel.shape[0])
        self.tally.audio_s += audio_s
        return audio_s

    def _add_samples(self, key: str, mel: np.ndarray, meta: dict[str, Any]) -> None:
        """The utterance as one sample, or (with a segment length) one sample per segment: keyed
        ``KEYg000``, ``KEYg001``... with ``segment`` and ``segments`` in their metadata (``duration_s``
        and ``vad`` stay the whole utterance's)."""
        if not self.segment:
            self.samples.append((key, mel, meta))
            self.tally.samples_ok += 1
            return
        bounds = segment_bounds(int(mel.shape[0]), self.segment)
        for number, (start, stop) in enumerate(bounds):
            part = {**meta, "n_frames": stop - start, "segment": number, "segments": len(bounds)}
            self.samples.append((segment_key(key, number), mel[start:stop], part))
        self.tally.samples_ok += len(bounds)

    def _failed(self, planned: PlannedUtterance, reason: str) -> None:
        utt = planned.utterance
        # a perturbed copy's failure names its speaker (``SPK@sp0.9``): the speed is in the id
        failure = {"root": self.root_names[utt.root], "speaker": planned.speaker, "source": utt.source,
                   "reason": reason}
        self.failures.append(failure)
        if self.fail_fast:
            raise DvectorError(f"{display_path(str(utt.path))}: {reason} (stopped by --fail-fast)")

    def write(self, out: Path, number: int) -> ShardTally:
        """Write the shard: its tar, then its record (each atomically); the shard's counts."""
        t0 = time.perf_counter()
        info = write_shard(out / shard_name(number), self.samples)
        write_json_atomic(sidecar_path(out, number), {
            "shard": info.to_dict(), "failures": self.failures, "speakers": _speaker_counts(self.samples)})
        self.tally.stage_s["writing"] = self.tally.stage_s.get("writing", 0.0) + time.perf_counter() - t0
        self.tally.failures = self.failures
        return self.tally


@dataclass
class ShardTally:
    """What writing one shard counted: added to the build's report by :meth:`absorb`."""

    utterances_ok: int = 0
    samples_ok: int = 0
    frames: int = 0
    audio_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)

    def absorb(self, report: BuildReport) -> None:
        report.shards_written += 1
        report.utterances_ok += self.utterances_ok
        report.samples_ok += self.samples_ok
        report.frames += self.frames
        report.audio_s += self.audio_s
        report.failures.extend(self.failures)
        for stage, secs in self.stage_s.items():
            report.stage_s[stage] = report.stage_s.get(stage, 0.0) + secs


class _ShardAssembler:
    """Takes results in plan order, keeps one shard's content, writes each shard as soon as results
    of the next one arrive, and counts everything in ``report``."""

    def __init__(self, out: Path, scan: ScanResult, by_key: dict[str, PlannedUtterance], report: BuildReport,
                 fail_fast: bool, segment: int = 0) -> None:
        self.out, self.scan, self.by_key, self.report, self.fail_fast = out, scan, by_key, report, fail_fast
        self.segment = segment
        self.current: int | None = None
        self.content: ShardContent | None = None

    def add(self, number: int, results: list[tuple[str, Any, dict[str, Any]]]) -> float:
        """Take one chunk's results for shard ``number``; returns the seconds of audio they held."""
        if number != self.current:
            self.finish()
            self.current = number
            self.content = ShardContent(self.scan.root_names, self.by_key, self.segment, self.fail_fast)
        assert self.content is not None
        return self.content.add(results)

    def finish(self) -> None:
        """Write the shard being assembled, if any: its tar, then its record."""
        if self.current is None or self.content is None:
            return
        self.content.write(self.out, self.current).absorb(self.report)
        self.current, self.content = None, None


def build_one_shard(out: Path, number: int, shard: list[PlannedUtterance], root_names: dict[str, str],
                    cfg: BuildConfig, fail_fast: bool = False) -> ShardTally | str:
    """A shard job for a cluster worker: process shard ``number``'s utterances in plan order, in this
    process, and write the shard and its record (atomically: a job killed midway leaves at most a
    temporary file, and its rerun writes the same bytes). Returns the shard's counts, or, with
    ``fail_fast``, the first failure's message (nothing written)."""
    _init_once()
    by_key = {p.key: p for p in shard}
    content = ShardContent(root_names, by_key, segment_frames(cfg.split_seconds, cfg.features.hop_ms), fail_fast)
    items = [(p.key, str(p.utterance.path), root_names[p.utterance.root], p.speaker_index, p.utterance.source,
              p.speed) for p in shard]
    with threadpool_limits(1):
        try:
            for i in range(0, len(items), CHUNK_UTTERANCES):
                content.add(_process_chunk(items[i:i + CHUNK_UTTERANCES], cfg.features, cfg.vad))
        except DvectorError as exc:  # --fail-fast: reported, not retried
            return str(exc)
    return content.write(out, number)


_READY = [False]


def _init_once() -> None:
    """A cluster worker's first shard job sets the process up as the local pool's initializer does."""
    if not _READY[0]:
        keep_freed_memory()
        warm_up()
        _READY[0] = True


def _write_shards(out: Path, plan: Plan, scan: ScanResult, todo: list[int], cfg: BuildConfig, workers: int,
                  fail_fast: bool, progress: Progress, report: BuildReport) -> None:
    """Process the utterances of the ``todo`` shards on ``workers`` processes and write those shards."""
    if not todo:
        return
    assembler = _ShardAssembler(out, scan, {p.key: p for k in todo for p in plan.shards[k]}, report, fail_fast,
                                segment_frames(cfg.split_seconds, cfg.features.hop_ms))
    warm_up()  # before forking: the workers inherit the loaded kernels
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) if workers > 1 else None
    try:
        for number, items, results in _ordered_results(pool, _chunks(plan, todo, scan.root_names), cfg, 4 * workers):
            progress.advance(len(items), assembler.add(number, results))
        assembler.finish()
    except BrokenProcessPool as exc:
        raise DvectorError(
            f"a build worker died (killed, perhaps for lack of memory: see `dmesg`); the {report.shards_written} "
            f"shard(s) finished in this run are kept: rerun the same command to resume"
            f"{' (with fewer --workers if memory is short)' if workers > 1 else ''}") from exc
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def write_failure(out: Path, exc: OSError) -> DvectorError:
    """One clear line for a write that the storage refused: full, read-only, or not ours to write."""
    where = display_path(exc.filename) if exc.filename else str(out)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on the device (or over quota)"
    elif exc.errno == errno.EROFS:
        why = "the storage is read-only"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied"
    else:
        why = exc.strerror or str(exc)
    return DvectorError(f"cannot write {where}: {why}; shards finished before this are kept: make room (or "
                        f"choose another --out), then rerun the same command to resume")


def build_shards(
    roots: Sequence[str],
    out_dir: str | os.PathLike[str],
    cfg: BuildConfig = BuildConfig(),
    workers: int | None = None,
    part: tuple[int, int] = (1, 1),
    overwrite: bool = False,
    fail_fast: bool = False,
    progress: Progress | None = None,
    dask: str | None = None,
) -> BuildReport:
    """Build (or finish building) the shards of ``roots`` in ``out_dir``: part ``i`` of ``n`` of the
    plan's shards (every shard by default), skipping those an earlier run completed; the index is
    written once every shard of the plan is complete.

    ``dask``: run the shard jobs on a Dask cluster (a scheduler address, or ``local:K``) instead of
    ``workers`` local processes (:mod:`dvector.shards.dask_build`); the shards are the same. The
    cluster is reached first: a missing extra or an unreachable scheduler is one line, at once."""
    args = (roots, out_dir, cfg, workers, part, overwrite, fail_fast, progress)
    if not dask:
        return _build(*args, client=None)
    from dvector.shards.cluster import dask_client

    with dask_client(dask) as client:
        return _build(*args, client=client)


def _build(roots: Sequence[str], out_dir: str | os.PathLike[str], cfg: BuildConfig, workers: int | None,
           part: tuple[int, int], overwrite: bool, fail_fast: bool, progress: Progress | None, client: Any
           ) -> BuildReport:
    """:func:`build_shards`, with the shard jobs on Dask's ``client`` where given."""
    started = time.perf_counter()
    keep_freed_memory()  # this process receives and writes every utterance's features
    progress = progress or Progress()
    out = Path(out_dir)
    scan = scan_roots(roots, cfg.extensions, cfg.merge_speakers)
    if not scan.utterances:
        raise DvectorError(f"no audio files with extensions {','.join(cfg.extensions)} under {', '.join(roots)}")
    plan = make_plan(scan, cfg)
    report = BuildReport(out_dir=out, shards_total=len(plan.shards), speakers=len(plan.speakers),
                         empty_roots=scan.empty_roots, scan_problems=scan.problems)
    try:
        out.mkdir(parents=True, exist_ok=True)
        prepare_folder(out, plan_record(plan, cfg, scan.root_names), overwrite)
        i, n = part
        mine = [k for k in range(len(plan.shards)) if k % n == i - 1]
        remove_stale_temps(out, mine)
        todo = [k for k in mine if not is_complete(out, k)]
        report.shards_skipped = len(mine) - len(todo)
        progress.start(sum(len(plan.shards[k]) for k in todo), len(todo))
        if client is not None and todo:
            from dvector.shards.dask_build import write_shards_dask

            write_shards_dask(client, out, plan, scan, todo, cfg, fail_fast, progress, report)
        else:
            _write_shards(out, plan, scan, todo, cfg, workers or os.cpu_count() or 1, fail_fast, progress, report)
        if all(is_complete(out, k) for k in range(len(plan.shards))):
            index = write_index(out)  # not rewritten when it is already up to date (read-only storage)
            report.index_written = True
            report.failures = index["failures"]
            report.few_utterance_speakers = [s["id"] for s in index["speakers"] if s["utterances"] < FEW_UTTERANCES]
    except OSError as exc:
        raise write_failure(out, exc) from exc
    report.wall_s = time.perf_counter() - started
    return report
