"""Run a build: one job per shard over a process pool, resumable, splittable into parts.

Layout of an output folder::

    shard-000000.tar ...     complete shards (written under a temporary name, then renamed)
    .build/plan.json         the configuration and input digest every run and part must match
    .build/shard-000000.json what each shard holds and which files failed (written after the tar)
    index.json               written last, once every shard of the plan is complete
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from dvector.signal.audio import scan_roots
from dvector.config import BuildConfig, FeatureConfig, VadConfig
from dvector.errors import DvectorError
from dvector.shards.plan import Plan, PlannedUtterance, make_plan
from dvector.signal.process import SkipUtterance, process_file
from dvector.shards.format import (FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, shard_name, write_json_atomic,
                     write_shard)
from dvector.signal.vad import warm_up

STATE_DIR = ".build"
CHUNK_UTTERANCES = 16  # utterances per task: work is spread by utterance, not only by shard


def display_path(text: str) -> str:
    """A printable form of a path that may hold undecodable bytes (non-UTF-8 file names)."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


@dataclass
class BuildReport:
    out_dir: Path
    shards_total: int = 0
    shards_written: int = 0
    shards_skipped: int = 0  # complete from an earlier run
    utterances_ok: int = 0
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


def _state_dir(out_dir: Path) -> Path:
    return out_dir / STATE_DIR


def _sidecar(out_dir: Path, number: int) -> Path:
    return _state_dir(out_dir) / (shard_name(number)[: -len(".tar")] + ".json")


def _plan_record(plan: Plan, cfg: BuildConfig, roots: dict[str, str]) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "input_digest": plan.digest,
        "roots": roots,
        "speakers": plan.speakers,
        "shards": [shard_name(i) for i in range(len(plan.shards))],
    }


def _prepare_folder(out_dir: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Create the folder, or check that what it holds was made with the same plan.

    ``overwrite`` deletes an earlier build in the folder, whatever its configuration.
    """
    plan_file = _state_dir(out_dir) / "plan.json"
    if overwrite:
        _clear(out_dir)
    elif plan_file.exists():
        old = json.loads(plan_file.read_text())
        if old.get("config_hash") != record["config_hash"] or old.get("input_digest") != record["input_digest"]:
            what = "configuration" if old.get("config_hash") != record["config_hash"] else "input files"
            raise DvectorError(
                f"{out_dir} holds a build made with different {what}; "
                "choose another output folder, or pass --overwrite to replace it"
            )
    elif (out_dir / INDEX_NAME).exists() or any(out_dir.glob("shard-*.tar")):
        raise DvectorError(f"{out_dir} holds shards of an unknown build; pass --overwrite to replace them")
    _state_dir(out_dir).mkdir(parents=True, exist_ok=True)
    if not plan_file.exists():
        write_json_atomic(plan_file, record)


def _clear(out_dir: Path) -> None:
    for path in out_dir.glob("shard-*.tar"):
        path.unlink()
    for path in (out_dir / INDEX_NAME,):
        if path.exists():
            path.unlink()
    shutil.rmtree(_state_dir(out_dir), ignore_errors=True)


def _remove_stale_temps(out_dir: Path, numbers: Sequence[int]) -> None:
    """Delete temporary files left by a killed run, for this part's shards only."""
    for number in numbers:
        for tmp in out_dir.glob(f".{shard_name(number)}.tmp-*"):
            tmp.unlink(missing_ok=True)
        for tmp in _state_dir(out_dir).glob(f".{_sidecar(out_dir, number).name}.tmp-*"):
            tmp.unlink(missing_ok=True)


def _is_complete(out_dir: Path, number: int) -> bool:
    return (out_dir / shard_name(number)).exists() and _sidecar(out_dir, number).exists()


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
    items: list[tuple[str, str, str, int, str]], features: FeatureConfig, vad: VadConfig
) -> list[tuple[str, Any, dict[str, Any]]]:
    """Features for a chunk of (key, path, root name, speaker index, source); runs in a worker."""
    out = []
    for key, path, root_name, speaker_index, source in items:
        try:
            result = process_file(Path(path), features, vad)
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
        out.append((key, result.mel, meta))
    return out


# ---- parent side -------------------------------------------------------------------------------

def _chunks(plan: Plan, numbers: Sequence[int], roots: dict[str, str]) -> Iterator[tuple[int, list]]:
    for number in numbers:
        items = [(p.key, str(p.utterance.path), roots[p.utterance.root], p.speaker_index, p.utterance.source)
                 for p in plan.shards[number]]
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


def build_shards(
    roots: Sequence[str],
    out_dir: str | os.PathLike[str],
    cfg: BuildConfig = BuildConfig(),
    workers: int | None = None,
    part: tuple[int, int] = (1, 1),
    overwrite: bool = False,
    fail_fast: bool = False,
    progress: Progress | None = None,
) -> BuildReport:
    """Build (or finish building) the shards of ``roots`` in ``out_dir``; see the module doc."""
    started = time.perf_counter()
    progress = progress or Progress()
    out = Path(out_dir)
    scan = scan_roots(roots, cfg.extensions, cfg.merge_speakers)
    if not scan.utterances:
        raise DvectorError(f"no audio files with extensions {','.join(cfg.extensions)} under {', '.join(roots)}")
    plan = make_plan(scan, cfg)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_folder(out, _plan_record(plan, cfg, scan.root_names), overwrite)
    report = BuildReport(out_dir=out, shards_total=len(plan.shards), speakers=len(plan.speakers),
                         empty_roots=scan.empty_roots, scan_problems=scan.problems)
    i, n = part
    mine = [k for k in range(len(plan.shards)) if k % n == i - 1]
    _remove_stale_temps(out, mine)
    todo = [k for k in mine if not _is_complete(out, k)]
    report.shards_skipped = len(mine) - len(todo)
    progress.start(sum(len(plan.shards[k]) for k in todo), len(todo))
    workers = workers or os.cpu_count() or 1
    by_key = {p.key: p for k in todo for p in plan.shards[k]}
    warm_up()  # before forking: the workers inherit the loaded kernels
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) if workers > 1 else None
    try:
        current: int | None = None
        samples: list[tuple[str, np.ndarray, dict]] = []
        failures: list[dict[str, str]] = []

        def finish_shard(number: int) -> None:
            t0 = time.perf_counter()
            info = write_shard(out / shard_name(number), samples)
            write_json_atomic(_sidecar(out, number), {
                "shard": info.to_dict(), "failures": failures, "speakers": _speaker_counts(samples)})
            report.stage_s["writing"] = report.stage_s.get("writing", 0.0) + time.perf_counter() - t0
            report.shards_written += 1

        for number, items, results in _ordered_results(pool, _chunks(plan, todo, scan.root_names), cfg, 4 * workers):
            if number != current:
                if current is not None:
                    finish_shard(current)
                current, samples, failures = number, [], []
            audio_s = 0.0
            for key, mel, meta in results:
                planned: PlannedUtterance = by_key[key]
                utt = planned.utterance
                if mel is None:
                    failure = {"root": scan.root_names[utt.root], "speaker": utt.speaker, "source": utt.source,
                               "reason": meta["reason"]}
                    failures.append(failure)
                    report.failures.append(failure)
                    if fail_fast:
                        raise DvectorError(f"{display_path(str(utt.path))}: {meta['reason']} (stopped by --fail-fast)")
                    continue
                for stage, secs in meta.pop("seconds").items():
                    report.stage_s[stage] = report.stage_s.get(stage, 0.0) + secs
                meta.update(speaker=utt.speaker, speaker_index=planned.speaker_index, root=scan.root_names[utt.root],
                            source=utt.source, n_frames=int(mel.shape[0]))
                samples.append((key, mel, meta))
                audio_s += meta["duration_s"]
                report.utterances_ok += 1
                report.frames += int(mel.shape[0])
            report.audio_s += audio_s
            progress.advance(len(items), audio_s)
        if current is not None:
            finish_shard(current)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if all(_is_complete(out, k) for k in range(len(plan.shards))):
        index = write_index(out)
        report.index_written = True
        report.failures = index["failures"]
        report.few_utterance_speakers = [s["id"] for s in index["speakers"] if s["utterances"] < FEW_UTTERANCES]
    report.wall_s = time.perf_counter() - started
    return report


FEW_UTTERANCES = 10  # speakers with fewer are reported: too few for typical GE2E batches (M=10)


def collect_index(out_dir: Path) -> dict[str, Any]:
    """The index of a complete build, from its plan and per-shard records (no timing, no paths)."""
    state = _state_dir(out_dir)
    plan_file = state / "plan.json"
    if not plan_file.exists():
        raise DvectorError(f"{out_dir} has no {STATE_DIR}/plan.json: it was not made by `dvector build-shards`")
    record = json.loads(plan_file.read_text())
    shards, failures = [], []
    speaker_totals = {i: [0, 0] for i in range(len(record["speakers"]))}
    missing = []
    for number, name in enumerate(record["shards"]):
        sidecar = _sidecar(out_dir, number)
        if not (out_dir / name).exists() or not sidecar.exists():
            missing.append(name)
            continue
        data = json.loads(sidecar.read_text())
        shards.append(data["shard"])
        failures.extend(data["failures"])
        for spk, (utts, frames) in data["speakers"].items():
            speaker_totals[int(spk)][0] += utts
            speaker_totals[int(spk)][1] += frames
    if missing:
        raise DvectorError(f"{len(missing)} of {len(record['shards'])} shards are not built yet "
                           f"(first: {missing[0]}); run the remaining parts, then `dvector index {out_dir}`")
    speakers = [{"id": spk, "index": i, "utterances": speaker_totals[i][0], "frames": speaker_totals[i][1]}
                for i, spk in enumerate(record["speakers"])]
    failures.sort(key=lambda f: (f["root"], f["source"]))
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": record["config"],
        "config_hash": record["config_hash"],
        "input_digest": record["input_digest"],
        "roots": record["roots"],
        "totals": {"shards": len(shards), "utterances": sum(s["samples"] for s in shards),
                   "frames": sum(s["frames"] for s in shards), "speakers": len(speakers), "failures": len(failures)},
        "speakers": speakers,
        "shards": shards,
        "failures": failures,
    }


def write_index(out_dir: Path) -> dict[str, Any]:
    """Write ``index.json`` (atomically) from what is on disk; used at the end of a build and by `dvector index`."""
    index = collect_index(Path(out_dir))
    write_json_atomic(Path(out_dir) / INDEX_NAME, index)
    return index

