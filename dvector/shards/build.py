"""Run a build: one job per shard over a process pool, resumable, splittable into parts.

The folder's layout and records are :mod:`dvector.shards.build_folder`'s; the index written at the
end is :mod:`dvector.shards.index`'s. Work is spread over the pool by chunks of utterances, and
results come back in plan order, so each shard's tar is written whole by this process. On a Dask
cluster (``dask=``, :mod:`dvector.shards.dask_build`) each shard is one task,
:func:`~dvector.shards.shard_job.build_one_shard`, that writes it on the worker. Both make a shard's
bytes with :class:`~dvector.shards.shard_job.ShardContent` and count with
:mod:`dvector.shards.build_report`, so they agree; this module chooses between them (it imports
:mod:`dvector.shards.dask_build`, never the other way round).
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections import deque
from contextlib import ExitStack
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterator, Sequence

from threadpoolctl import threadpool_limits

from dvector.config import BuildConfig
from dvector.corpus import CorpusInputs, ScanResult, scan_inputs
from dvector.errors import DvectorError
from dvector.files import LOCK_NAME, display_path, one_writer
from dvector.shards.build_folder import is_complete, plan_record, prepare_folder, remove_stale_temps
from dvector.shards.build_report import BuildReport, Progress
from dvector.shards.dask_build import write_shards_dask
from dvector.shards.index import write_index
from dvector.shards.plan import Plan, PlannedUtterance, make_plan, segment_frames
from dvector.shards.shard_job import CHUNK_UTTERANCES, ShardContent, job_items, keep_freed_memory, process_chunk
from dvector.signal.vad import warm_up

FEW_UTTERANCES = 10  # speakers with fewer are reported: too few for typical GE2E batches (M=10)


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


# ---- parent side -------------------------------------------------------------------------------

def _chunks(plan: Plan, numbers: Sequence[int], roots: dict[str, str]) -> Iterator[tuple[int, list]]:
    for number in numbers:
        items = job_items(plan.shards[number], roots)
        for i in range(0, len(items), CHUNK_UTTERANCES):
            yield number, items[i:i + CHUNK_UTTERANCES]


def _ordered_results(pool: ProcessPoolExecutor | None, tasks: Iterator[tuple[int, list]], cfg: BuildConfig,
                     window: int) -> Iterator[tuple[int, list, list]]:
    """Results of the tasks in submission order, with at most ``window`` tasks in flight."""
    if pool is None:
        with threadpool_limits(1):
            for number, items in tasks:
                yield number, items, process_chunk(items, cfg.features, cfg.vad)
        return
    pending: deque[tuple[int, list, Future]] = deque()
    for number, items in tasks:
        pending.append((number, items, pool.submit(process_chunk, items, cfg.features, cfg.vad)))
        if len(pending) >= window:
            n, it, fut = pending.popleft()
            yield n, it, fut.result()
    while pending:
        n, it, fut = pending.popleft()
        yield n, it, fut.result()


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
    """One clear line for a write that the storage refused, with the advice that fits why: a full disk
    (make room), read-only or not ours to write (a writable folder), a file where a folder must be."""
    where = display_path(exc.filename) if exc.filename else str(out)
    resume = "shards finished before this are kept"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on the device (or over quota)"
        advice = f"{resume}: make room (or choose another --out), then rerun the same command to resume"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "the storage is read-only" if exc.errno == errno.EROFS else "permission denied"
        advice = "choose a writable folder with --out (or make this one writable, then rerun the same command)"
    elif exc.errno == errno.EISDIR:
        why, advice = "a folder is there, where a file must be", "a folder is in the way: move it, or choose another --out"
    elif exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = _in_the_way(Path(exc.filename) if exc.filename else out)
        why = f"{display_path(str(blocker))} is a file where a folder must be" if blocker else \
            (exc.strerror or str(exc))
        advice = "a file is in the way: move it, or choose another --out"
    else:
        why = exc.strerror or str(exc)
        advice = f"{resume}: rerun the same command to resume once the cause is fixed"
    return DvectorError(f"cannot write {where}: {why}; {advice}")


def _in_the_way(path: Path) -> Path | None:
    """The file (not a folder) at ``path`` or at one of its parents, where a folder must be."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate) and not candidate.is_dir():
            return candidate
    return None


def build_shards(
    roots: Sequence[str] | CorpusInputs,
    out_dir: str | os.PathLike[str],
    cfg: BuildConfig = BuildConfig(),
    workers: int | None = None,
    part: tuple[int, int] = (1, 1),
    overwrite: bool = False,
    fail_fast: bool = False,
    progress: Progress | None = None,
    dask: str | None = None,
) -> BuildReport:
    """Build (or finish building) the shards of ``roots`` (root folders, or any :class:`CorpusInputs`: Kaldi
    data directories, manifests, Lhotse manifests) in ``out_dir``: part ``i`` of ``n`` of the
    plan's shards (every shard by default), skipping those an earlier run completed; the index is
    written once every shard of the plan is complete.

    ``dask``: run the shard jobs on a Dask cluster (a scheduler address, or ``local:K``) instead of
    ``workers`` local processes (:mod:`dvector.shards.dask_build`); the shards are the same. The
    cluster is reached first: a missing extra or an unreachable scheduler is one line, at once."""
    inputs = roots if isinstance(roots, CorpusInputs) else CorpusInputs(roots=tuple(str(r) for r in roots))
    args = (inputs, out_dir, cfg, workers, part, overwrite, fail_fast, progress)
    if not dask:
        return _build(*args, client=None)
    from dvector.shards.cluster import dask_client

    with dask_client(dask) as client:
        return _build(*args, client=client)


def _build(inputs: CorpusInputs, out_dir: str | os.PathLike[str], cfg: BuildConfig, workers: int | None,
           part: tuple[int, int], overwrite: bool, fail_fast: bool, progress: Progress | None, client: Any
           ) -> BuildReport:
    """:func:`build_shards`, with the shard jobs on Dask's ``client`` where given; one build (or one
    ``--part``) writes into ``out_dir`` at a time."""
    whole = part == (1, 1)
    with ExitStack() as stack:
        try:
            stack.enter_context(one_writer(out_dir, "shard build" if whole else f"build of part {part[0]}/{part[1]}",
                                           say=lambda note: print(note, file=sys.stderr),
                                           name=LOCK_NAME if whole else f".dvector-part{part[0]}of{part[1]}.lock"))
        except OSError as exc:  # read-only, or a file in the way
            raise write_failure(Path(out_dir), exc) from exc
        return _build_locked(inputs, out_dir, cfg, workers, part, overwrite, fail_fast, progress, client)


def _build_locked(inputs: CorpusInputs, out_dir: str | os.PathLike[str], cfg: BuildConfig, workers: int | None,
                  part: tuple[int, int], overwrite: bool, fail_fast: bool, progress: Progress | None, client: Any
                  ) -> BuildReport:
    started = time.perf_counter()
    keep_freed_memory()  # this process receives and writes every utterance's features
    progress = progress or Progress()
    out = Path(out_dir)
    scan = scan_inputs(inputs, cfg.extensions, cfg.merge_speakers)
    if not scan.utterances:
        if inputs.roots and not (inputs.kaldi or inputs.manifests or inputs.lhotse):
            raise DvectorError(f"no audio files with extensions {','.join(cfg.extensions)} under {', '.join(inputs.roots)}")
        raise DvectorError(f"no utterances to read in {inputs.describe()}"
                           + (f" ({len(scan.problems)} problem(s), e.g. {scan.problems[0][0]}: {scan.problems[0][1]})"
                              if scan.problems else ""))
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
