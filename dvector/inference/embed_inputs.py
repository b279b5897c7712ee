"""Embedding many inputs at once (files, folders, shards) and the .npz files that hold the results."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

from dvector.files import finite_json, output_file
from dvector.config import DEFAULT_EXTENSIONS, normalize_extensions
from dvector.corpus import ScanResult, walk_files
from dvector.shards.locate import resolve_shards
from dvector.shards.reader import iter_shard
from dvector.inference.embedder import EmbedError, Embedder, model_identity
from dvector.errors import DvectorError

MODEL_KEY = "__model__"  # the .npz entry with the model's identity (a JSON string)
TIMES_PREFIX = "__times__/"  # per-window .npz: KEY -> (K, D) vectors, __times__/KEY -> (K, 2) seconds
RAW_PREFIX = "__fs__/"  # a key a zip member cannot hold as is: RAW_PREFIX + hex of its file-system bytes


def member_name(key: str) -> str:
    """The .npz entry of ``key``: the key itself, or, for a key that is not valid UTF-8 (a file name
    decoded with surrogate escapes, as ``os.fsdecode`` gives it) or that could be taken for one of
    the reserved ``__`` entries, ``__fs__/`` and the hex of its bytes. :func:`key_of` inverts it."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return RAW_PREFIX + os.fsencode(key).hex()
    return RAW_PREFIX + key.encode("utf-8").hex() if key.startswith("__") else key


def key_of(member: str) -> str:
    """The key stored as the .npz entry ``member`` (see :func:`member_name`)."""
    if member.startswith(RAW_PREFIX):
        return os.fsdecode(bytes.fromhex(member[len(RAW_PREFIX):]))
    return member

def _is_shard_input(text: str) -> bool:
    if text.startswith("pipe:") or "://" in text:
        return True
    if os.path.isdir(text):
        return os.path.isfile(os.path.join(text, "index.json")) and any(
            n.endswith(".tar") for n in os.listdir(text))
    return text.endswith(".tar") or ("{" in text and ".." in text)


class NothingEmbedded(DvectorError):
    """Too few inputs could be embedded to produce anything; ``skipped``: ``(input, reason)`` of those
    that failed, for the command to list before its error line."""

    def __init__(self, message: str, skipped: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.skipped = list(skipped)


@dataclass
class Item:
    key: str  # the name in the output: the path as reached from the input given, or root/source of a shard sample
    path: Path | None = None  # an audio file
    direct: bool = False  # named on the command line (a failure is an error) rather than found in a folder


@dataclass
class EmbedResult:
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (D,), or (K, D) per window
    times: dict[str, np.ndarray] = field(default_factory=dict)  # per window: key -> (K, 2) start, end seconds
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    duplicates: int = 0  # files reached twice, embedded once


def list_inputs(inputs: Sequence[str | os.PathLike[str]], extensions: Sequence[str] = DEFAULT_EXTENSIONS
                ) -> tuple[list[Item], list[str], list[tuple[str, str]]]:
    """Audio files (named, or found under folders) and shard URLs among ``inputs``, and scan problems."""
    exts = frozenset(normalize_extensions(extensions))
    items: list[Item] = []
    shard_inputs: list[str] = []
    problems: list[tuple[str, str]] = []
    if not inputs:
        raise DvectorError("give at least one audio file, folder or shard URL (or a listing: --kaldi DATA_DIR)")
    for raw in inputs:
        text = os.fspath(raw)
        if _is_shard_input(text):
            shard_inputs.append(text)
        elif os.path.isdir(text):
            found = walk_files(Path(text), exts, problems)
            if not found:
                problems.append((text, f"no audio files with extension {', '.join(sorted(exts))}"))
            for f in found:
                items.append(Item(os.path.normpath(os.path.join(text, os.path.relpath(f, text))), f))
        elif os.path.isfile(text):
            items.append(Item(os.path.normpath(text), Path(text), direct=True))
        else:
            raise DvectorError(f"{text}: no such file or folder")
    return items, shard_inputs, problems


Embedded = TypeVar("Embedded")


@dataclass(frozen=True)
class Workers:
    """Where many inputs are embedded: ``count`` local processes (1: this process; 0: every core), or
    the Dask cluster at ``dask`` (a scheduler address, or ``local:K``). Results are the same either way."""

    count: int = 1
    dask: str | None = None

    @property
    def parallel(self) -> bool:
        return bool(self.dask) or self.count != 1


JOB_FILES = 8  # inputs per job: few enough to spread a small evaluation, enough to amortise a round trip
_WORKER_EMBEDDERS: dict[tuple, Embedder] = {}  # in a worker process: the embedder of each recipe, loaded once


def _recipe(embedder: Embedder) -> tuple | None:
    """How a worker process loads the same model: ``(path, threads, sha256)``; None for a model that
    exists only in memory (an untrained twin), which is embedded in this process. A worker uses
    ``--threads`` torch threads, or one (the workers already fill the cores)."""
    if embedder.info.get("kind") not in ("checkpoint", "export") or not embedder.info.get("sha256"):
        return None
    return str(embedder.info["path"]), int(embedder.threads or 1), str(embedder.info["sha256"])


def _worker_embedder(recipe: tuple) -> Embedder:
    if recipe not in _WORKER_EMBEDDERS:
        from dvector.inference.embedder import load

        path, threads, sha256 = recipe
        embedder = load(path, threads=threads)
        if embedder.info["sha256"] != sha256:
            raise DvectorError(f"{path} changed while it was being used (its sha256 differs): rerun")
        _WORKER_EMBEDDERS.clear()
        _WORKER_EMBEDDERS[recipe] = embedder
    return _WORKER_EMBEDDERS[recipe]


def _embed_job(recipe: tuple, method: str, pairs: list[tuple[str, Any]]) -> list[tuple[str, Any, tuple[str, str]]]:
    """Run in a worker: ``method`` of the recipe's embedder on each ``(key, source)``; per input
    ``(key, result, ("", ""))`` or ``(key, None, (message, reason))`` for an input that failed."""
    embed = getattr(_worker_embedder(recipe), method)
    out = []
    with threadpool_limits(1, user_api="blas"):
        for key, source in pairs:
            try:
                out.append((key, embed(source), ("", "")))
            except DvectorError as exc:
                out.append((key, None, (str(exc), exc.reason if isinstance(exc, EmbedError) else str(exc))))
    return out


WORKER_DIED = ("its worker process died (killed, perhaps for lack of memory), also when it was embedded "
               "again alone in a fresh one")
DASK_DIED = ("the Dask workers embedding it died too often (killed, perhaps for lack of memory; "
             "distributed.scheduler.allowed-failures)")
MAX_DEATHS = 8  # local worker processes that may die in one run; then the inputs not yet embedded are skipped
GAVE_UP = f"not embedded: {MAX_DEATHS} worker processes died (killed, perhaps for lack of memory) before it came up"


def _embed_parallel(pairs: list[tuple[str, Any]], recipe: tuple, method: str, workers: Workers
                    ) -> Iterable[tuple[str, Any, tuple[str, str]]]:
    """Each pair's outcome, in input order, embedded by jobs of ``JOB_FILES`` inputs on ``workers``.

    A local worker process that dies (killed) breaks its pool: the jobs finished are kept, the
    inputs of the jobs it took with it are embedded again one by one (:func:`_embed_alone`), and a
    fresh pool goes on with the rest; after ``MAX_DEATHS`` deaths the inputs left are skipped
    (``GAVE_UP``). On Dask (which reschedules a dead worker's job itself) a job whose workers died
    too often has its inputs skipped. Such a skip is never an error: its message is ""."""
    from collections import deque
    from concurrent.futures.process import BrokenProcessPool

    from dvector.shards.cluster import executor, is_killed_worker

    chunks = [pairs[i:i + JOB_FILES] for i in range(0, len(pairs), JOB_FILES)]
    done, deaths = 0, [0]  # chunks submitted to a pool so far; worker processes lost (_embed_alone counts too)
    while done < len(chunks):
        if deaths[0] >= MAX_DEATHS:
            yield from [(key, None, ("", GAVE_UP)) for chunk in chunks[done:] for key, _ in chunk]
            return
        pending: deque = deque()
        with executor(workers.count, workers.dask) as (jobs, client):
            if jobs is None:  # one local worker: this process, as without workers
                yield from _embed_job(recipe, method, pairs)
                return
            slots = sum(client.nthreads().values()) if client is not None else getattr(jobs, "_max_workers", 1)
            window = 4 * max(1, slots)  # jobs in flight: enough to keep every worker busy, not the whole list
            try:
                while done < len(chunks) or pending:
                    while done < len(chunks) and len(pending) < window:
                        pending.append((chunks[done], jobs.submit(_embed_job, recipe, method, chunks[done])))
                        done += 1
                    chunk, job = pending[0]
                    try:
                        outcomes = job.result()
                    except BrokenProcessPool:
                        raise
                    except Exception as exc:
                        if not is_killed_worker(exc):
                            raise
                        outcomes = [(key, None, ("", DASK_DIED)) for key, _ in chunk]
                    pending.popleft()
                    yield from outcomes
            except BrokenProcessPool:  # a worker died: what is still pending is sorted out below, in fresh pools
                deaths[0] += 1
        lost = [pair for chunk, job in pending if _lost(job) for pair in chunk]
        if lost:
            warnings.warn(f"a worker process died (killed, perhaps for lack of memory): the {len(lost)} input(s) "
                          "it took with it are embedded again, one at a time")
        again = iter(_embed_alone(lost, recipe, method, deaths))
        for chunk, job in pending:  # in input order: the jobs that finished, and the lost ones done again
            yield from [next(again) for _ in chunk] if _lost(job) else job.result()


def _lost(job: Any) -> bool:
    """A job of a broken pool that did not finish (its future failed or was cancelled)."""
    return job.cancelled() or job.exception() is not None


def _embed_alone(pairs: list[tuple[str, Any]], recipe: tuple, method: str, deaths: list[int]
                 ) -> list[tuple[str, Any, tuple[str, str]]]:
    """The outcomes of inputs whose worker died, each embedded again as a job of its own in a fresh
    one-process pool: jobs finish in order there, so the first one lost is the one its worker died
    on: that input is skipped (``WORKER_DIED``), ``deaths[0]`` counts it, and a fresh pool goes on
    after it (until ``MAX_DEATHS``: then the rest are skipped, ``GAVE_UP``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    out: list[tuple[str, Any, tuple[str, str]]] = []
    while len(out) < len(pairs):
        if deaths[0] >= MAX_DEATHS:
            return out + [(key, None, ("", GAVE_UP)) for key, _ in pairs[len(out):]]
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            jobs = [pool.submit(_embed_job, recipe, method, [pair]) for pair in pairs[len(out):]]
            for pair, job in zip(pairs[len(out):], jobs):
                try:
                    out.extend(job.result())
                except BrokenProcessPool:
                    out.append((pair[0], None, ("", WORKER_DIED)))
                    deaths[0] += 1
                    break
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def embed_each(items: Iterable[tuple[str, Any]], embed: Callable[[Any], Embedded],
               strict: bool | Callable[[str], bool] = False, on_item: Callable[[str], None] | None = None,
               workers: Workers | None = None) -> tuple[dict[str, Embedded], list[tuple[str, str]]]:
    """``embed(source)`` for each ``(key, source)``, in order: the results by key, and ``(key, reason)``
    for each input that could not be embedded. Where ``strict`` holds (a bool, or a predicate of
    the key) a failure raises instead. The one loop behind ``embed``, ``eval`` and ``visualize``.

    With parallel ``workers`` and ``embed`` a method of an embedder loaded from a file, the inputs are
    embedded by worker processes (local or Dask) that load the same model; outcomes are taken in
    input order, so results, skipped inputs and the first error are those of one process. NumPy's BLAS
    runs on one thread everywhere (as in the build): the features' last bits depend on its thread
    count, and a Dask worker has one (``OMP_NUM_THREADS=1``) whatever this process has."""
    results: dict[str, Embedded] = {}
    skipped: list[tuple[str, str]] = []
    owner = getattr(embed, "__self__", None)
    recipe = _recipe(owner) if workers is not None and workers.parallel and isinstance(owner, Embedder) else None
    if recipe is not None:
        for key, value, (message, reason) in _embed_parallel(list(items), recipe, embed.__name__, workers):
            if value is not None:
                results[key] = value
            elif message and (strict(key) if callable(strict) else strict):  # "": its worker died, never an error
                raise DvectorError(message)
            else:
                skipped.append((key, reason))
            if on_item:
                on_item(key)
        return results, skipped
    with threadpool_limits(1, user_api="blas"):
        for key, source in items:
            try:
                results[key] = embed(source)
            except DvectorError as exc:
                if strict(key) if callable(strict) else strict:
                    raise
                skipped.append((key, exc.reason if isinstance(exc, EmbedError) else str(exc)))
            if on_item:
                on_item(key)
    return results, skipped


def embed_paths(embedder: Embedder, inputs: Sequence[str | os.PathLike[str]],
                extensions: Sequence[str] = DEFAULT_EXTENSIONS, per_window: bool = False,
                on_start: Callable[[int | None], None] | None = None,
                on_item: Callable[[str], None] | None = None, workers: Workers | None = None,
                listed: ScanResult | None = None) -> EmbedResult:
    """Embed every utterance reachable from ``inputs``: files, folders (recursively, by extension),
    or shard URLs / shard folders (stored mels, already VAD-trimmed: not with ``per_window``), and the
    utterances of a listing (``listed``: a Kaldi data directory's, keyed by utterance id; its
    problems are counted as skipped). Audio files and listed utterances are embedded on ``workers``
    (see :func:`embed_each`); shard samples in this process.

    Each file is embedded once, however many inputs reach it. A file named directly that cannot be
    embedded is an error; one found in a folder, a listing or a shard is skipped and listed in ``skipped``.
    """
    if inputs or listed is None:
        items, shard_inputs, problems = list_inputs(inputs, extensions)
    else:
        items, shard_inputs, problems = [], [], []
    if shard_inputs and per_window:
        raise DvectorError("--per-window needs audio files: shards hold VAD-trimmed features without real times")
    result = EmbedResult(skipped=list(problems) + list(listed.problems if listed is not None else ()))
    utterances = list(listed.utterances) if listed is not None else []
    sources = [resolve_shards(s) for s in shard_inputs]
    shard_total = 0
    for src in sources:
        if src.index is None:
            shard_total = -1
            break
        names = {u.rsplit("/", 1)[-1] for u in src.urls}
        shard_total += sum(s["samples"] for s in src.index["shards"] if s["name"] in names)
    if on_start:
        on_start(None if shard_total < 0 else len(items) + len(utterances) + shard_total)
    unique: list[Item] = []
    seen: set[str] = set()
    for item in items:
        assert item.path is not None
        real = os.path.realpath(item.path)
        if real in seen or item.key in seen:
            result.duplicates += 1
            if on_item:
                on_item(item.key)
            continue
        seen.update((real, item.key))
        unique.append(item)
    direct = {item.key for item in unique if item.direct}
    pairs: list[tuple[str, Any]] = [(item.key, item.path) for item in unique]
    for u in utterances:  # segments of one recording share its path: the key (utterance id) tells them apart
        if u.source in seen:
            result.duplicates += 1
            if on_item:
                on_item(u.source)
            continue
        seen.add(u.source)
        pairs.append((u.source, u))
    if per_window:
        windows, skipped = embed_each(pairs, embedder.per_window, strict=direct.__contains__, on_item=on_item,
                                     workers=workers)
        for key, w in windows.items():
            result.vectors[key] = w.vectors
            result.times[key] = np.stack([w.starts_s, w.ends_s], axis=1)
    else:
        result.vectors, skipped = embed_each(pairs, embedder.embed, strict=direct.__contains__, on_item=on_item,
                                             workers=workers)
    result.skipped.extend(skipped)
    for src in sources:
        for url in src.urls:
            try:
                for sample in iter_shard(url):
                    key = f"{sample.get('root', '?')}/{sample.get('source', sample['__key__'])}"
                    if key in result.vectors:
                        result.duplicates += 1
                    else:
                        result.vectors[key] = embedder.embed_mel(sample["mel"].astype(np.float32))
                    if on_item:
                        on_item(key)
            except DvectorError:
                raise
            except Exception as exc:  # a damaged or unreachable shard
                result.skipped.append((url, f"cannot read shard: {exc}"))
    return result


def save_embeddings(path: str | os.PathLike[str], result: EmbedResult, embedder: Embedder) -> Path:
    """Write ``key -> vector`` (or ``key -> (K, D)`` and ``__times__/key -> (K, 2)``) and ``__model__``."""
    out = Path(path)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    if not result.vectors:
        raise NothingEmbedded("nothing was embedded: no usable audio in the inputs", result.skipped)
    arrays: dict[str, np.ndarray] = {member_name(k): v.astype(np.float32) for k, v in result.vectors.items()}
    for k, t in result.times.items():
        arrays[TIMES_PREFIX + member_name(k)] = t.astype(np.float64)
    identity = {**model_identity(embedder), "per_window": bool(result.times)}
    arrays[MODEL_KEY] = np.array(json.dumps(finite_json(identity), sort_keys=True, allow_nan=False))
    with output_file(out, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    return out


def load_embeddings(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    """Read an embeddings .npz back: (key -> vectors, the model identity, key -> window times).

    Keys come back as they were given (file names as ``os.fsdecode`` gives them, even those that
    are not valid UTF-8), whatever entry name :func:`member_name` stored them under."""
    with np.load(path, allow_pickle=False) as z:
        info = json.loads(str(z[MODEL_KEY])) if MODEL_KEY in z.files else {}
        vectors = {key_of(k): z[k] for k in z.files if k != MODEL_KEY and not k.startswith(TIMES_PREFIX)}
        times = {key_of(k[len(TIMES_PREFIX):]): z[k] for k in z.files if k.startswith(TIMES_PREFIX)}
    return vectors, info, times
