"""Shard URLs -> per-rank, per-worker sample streams -> speaker-balanced GE2E batches -> DataLoader.

Every pass over the data has a global shard order derived from ``(seed, pass)``. Ranks, then
DataLoader workers, take disjoint slices of it (``order[rank::world][worker::workers]``); where
there are fewer shards than consumers, consumers read the same shards but keep disjoint speaker
blocks instead. Each worker streams forever: it reads a bounded pool of samples, draws batches
from it (:func:`dvector.sampling.draw_round`), and reads the next pool. A worker's position is
(round, stream position where the round's pool began, batches drawn from it): small, and enough
to resume exactly, re-reading at most one pool.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from .errors import DvectorError
from .sampling import DEFAULT_MIN_FRAMES, SamplingStats, SegLen, SegmentSpec, draw_round
from .shards import INDEX_NAME, decode_sample, iter_raw_samples, read_index

log = logging.getLogger(__name__)


# ---- where the shards are ----------------------------------------------------------------------

@dataclass
class ShardSource:
    urls: list[str]
    index: dict[str, Any] | None  # the build's index.json, where one was found


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def resolve_shards(source: str | os.PathLike[str] | Sequence[str], index: str | None = None) -> ShardSource:
    """Shard URLs from a folder (with index.json), a brace pattern, a URL list, or one URL.

    ``index`` names an index.json explicitly; otherwise it is looked for beside the shards.
    """
    if isinstance(source, (list, tuple)):
        urls = [u for s in source for u in expand_urls(str(s))]
    else:
        text = os.fspath(source)
        if os.path.isdir(text) or text.endswith("/") and not text.startswith("pipe:"):
            idx = read_index(index or text)
            base = text.rstrip("/")
            return ShardSource([f"{base}/{s['name']}" for s in idx["shards"]], idx)
        urls = expand_urls(text)
    if not urls:
        raise DvectorError(f"no shards in {source!r}")
    found = None
    if index is not None:
        found = read_index(index)
    else:
        candidate = _parent(urls[0]) + "/" + INDEX_NAME
        if not candidate.startswith("pipe:") and ("://" not in candidate and os.path.exists(candidate)):
            found = read_index(candidate)
    return ShardSource(list(urls), found)


# ---- one consumer's stream of samples -----------------------------------------------------------

@dataclass(frozen=True)
class Consumer:
    """Which slice of the data one (rank, worker) reads."""

    rank: int = 0
    world: int = 1
    worker: int = 0
    workers: int = 1

    def assignment(self, order: Sequence[int]) -> tuple[list[int], int, int]:
        """(shards to read, block modulus, block remainder) for this consumer."""
        order = list(order)
        if len(order) >= self.world:
            mine = order[self.rank::self.world]
            if len(mine) >= self.workers:
                return mine[self.worker::self.workers], 1, 0
            return mine, self.workers, self.worker
        return order, self.world * self.workers, self.rank * self.workers + self.worker


@dataclass
class StreamPosition:
    pass_: int = 0  # pass over the data
    shard: int = 0  # position in this consumer's shard list of the pass
    sample: int = 0  # raw samples already consumed in that shard


def shard_order(n_shards: int, seed: int, pass_: int) -> list[int]:
    return np.random.default_rng([seed, pass_, 0x5EED]).permutation(n_shards).tolist()


class SampleStream:
    """Endless decoded samples of one consumer, from a position; skips broken shards with a warning."""

    def __init__(self, urls: Sequence[str], consumer: Consumer, seed: int, on_error: str = "warn"):
        if on_error not in ("warn", "raise"):
            raise DvectorError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        self.urls, self.consumer, self.seed, self.on_error = list(urls), consumer, seed, on_error

    def _fail(self, url: str, exc: BaseException) -> None:
        message = f"shard {url}: {type(exc).__name__}: {exc}"
        if self.on_error == "raise":
            raise DvectorError(message) from exc
        warnings.warn(f"skipping the rest of {message}", RuntimeWarning, stacklevel=2)

    def _shard_samples(self, url: str, start: int, modulus: int, remainder: int) -> Iterator[tuple[int, dict]]:
        """(raw position after this sample, decoded sample) of one shard from raw position ``start``."""
        block, last_speaker, position = -1, None, 0
        try:
            for raw in iter_raw_samples(url):
                position += 1
                if modulus > 1 or position <= start:
                    meta = json.loads(raw.get("json", b"{}"))
                    speaker = meta.get("speaker_index")
                    if speaker != last_speaker:
                        block, last_speaker = block + 1, speaker
                if position <= start or (modulus > 1 and block % modulus != remainder):
                    continue
                yield position, decode_sample(raw)
        except Exception as exc:  # truncated tar, bad member, failing URL
            self._fail(url, exc)

    def samples(self, start: StreamPosition) -> Iterator[tuple[StreamPosition, dict]]:
        """(position after the sample, sample) pairs from ``start`` on, forever."""
        pos = StreamPosition(**asdict(start))
        empty_passes = 0
        while True:
            mine, modulus, remainder = self.consumer.assignment(shard_order(len(self.urls), self.seed, pos.pass_))
            got_any = False
            while pos.shard < len(mine):
                url = self.urls[mine[pos.shard]]
                for raw_pos, sample in self._shard_samples(url, pos.sample, modulus, remainder):
                    got_any = True
                    pos.sample = raw_pos
                    yield StreamPosition(pos.pass_, pos.shard, pos.sample), sample
                pos.shard, pos.sample = pos.shard + 1, 0
            empty_passes = 0 if got_any else empty_passes + 1
            if empty_passes >= 2:
                raise DvectorError(f"consumer {self.consumer} read no usable sample in a whole pass over "
                                   f"{len(self.urls)} shard(s): are they all broken or unreachable?")
            pos = StreamPosition(pos.pass_ + 1, 0, 0)


# ---- batches of one consumer --------------------------------------------------------------------

@dataclass
class BatchSettings:
    n_speakers: int = 64
    n_utterances: int = 10
    seg_len: SegLen = 160
    pool_size: int = 0  # utterances per pool (0: 8 x N x M)
    max_uses: int = 2
    short_policy: str = "repeat"
    min_frames: int = DEFAULT_MIN_FRAMES
    seed: int = 0
    on_error: str = "warn"
    exclude_speakers: tuple[int, ...] = ()  # speaker indices never drawn (held out for validation)

    @property
    def pool(self) -> int:
        return self.pool_size or 8 * self.n_speakers * self.n_utterances

    def shape_key(self) -> dict[str, Any]:
        """What shapes the batch stream: a saved position only applies with the same settings."""
        spec = SegmentSpec.parse(self.seg_len)
        return {"n_speakers": self.n_speakers, "n_utterances": self.n_utterances, "seg_len": [spec.lo, spec.hi],
                "pool": self.pool, "max_uses": self.max_uses, "short_policy": self.short_policy,
                "min_frames": self.min_frames, "seed": self.seed, "exclude_speakers": list(self.exclude_speakers)}


@dataclass
class WorkerState:
    round: int = 0
    start: StreamPosition = field(default_factory=StreamPosition)  # where this round's pool began
    drawn: int = 0  # batches already drawn from this round

    def to_dict(self) -> dict[str, int]:
        return {"round": self.round, "pass": self.start.pass_, "shard": self.start.shard,
                "sample": self.start.sample, "drawn": self.drawn}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "WorkerState":
        return cls(int(d["round"]), StreamPosition(int(d["pass"]), int(d["shard"]), int(d["sample"])), int(d["drawn"]))


def _difference(a: SamplingStats, b: SamplingStats) -> SamplingStats:
    return SamplingStats(**{k: v - getattr(b, k) for k, v in a.to_dict().items()})


def consumer_batches(urls: Sequence[str], settings: BatchSettings, consumer: Consumer,
                     state: WorkerState | None = None) -> Iterator[tuple[Any, WorkerState, SamplingStats]]:
    """Endless (batch, state after it, stats of it) for one consumer, resuming from ``state``."""
    state = WorkerState.from_dict(state.to_dict()) if state else WorkerState()
    stream = SampleStream(urls, consumer, settings.seed, settings.on_error)
    carry = SamplingStats()
    excluded = frozenset(settings.exclude_speakers)
    while True:
        pool: list[dict] = []
        seen: set[str] = set()
        next_start = state.start
        for pos, sample in stream.samples(state.start):
            next_start = pos
            if excluded and int(sample["speaker_index"]) in excluded:
                continue
            if sample["__key__"] in seen:  # the pool wrapped around a small corpus
                if pos.pass_ > state.start.pass_ + 1:
                    break
                continue
            seen.add(sample["__key__"])
            pool.append(sample)
            if len(pool) >= settings.pool:
                break
        rng = np.random.default_rng([settings.seed, consumer.rank, consumer.worker, state.round])
        stats = SamplingStats()  # draw_round updates it as the round goes
        reported = SamplingStats()  # what earlier batches of the round already reported
        drawn_before = state.drawn
        produced = 0
        for batch in draw_round(pool, settings.n_speakers, settings.n_utterances, settings.seg_len, rng,
                                settings.max_uses, settings.short_policy, settings.min_frames, stats,
                                skip=drawn_before):
            produced += 1
            state.drawn = drawn_before + produced
            delta = _difference(stats, reported) + carry
            reported, carry = SamplingStats(**stats.to_dict()), SamplingStats()
            yield batch, WorkerState.from_dict(state.to_dict()), delta
        carry += _difference(stats, reported)  # end-of-round counts ride on the next batch
        if drawn_before + produced == 0:
            speakers = len({s["speaker_index"] for s in pool})
            raise DvectorError(
                f"cannot form a batch of {settings.n_speakers} speakers x {settings.n_utterances} utterances: "
                f"this process's share of the data holds {len(pool)} usable utterances of {speakers} speakers "
                f"(consumer {consumer}); lower -n/-m, use fewer workers, or add data")
        state = WorkerState(state.round + 1, next_start, 0)


# ---- torch DataLoader ---------------------------------------------------------------------------

def distributed_rank_world() -> tuple[int, int]:
    """Rank and world size from torch.distributed, else the torchrun environment, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class GE2EDataset(IterableDataset):
    """Endless GE2E batches of this rank; each DataLoader worker streams its own slice."""

    def __init__(self, urls: Sequence[str], settings: BatchSettings, rank: int, world: int, workers: int,
                 states: dict[int, WorkerState] | None = None, rotation: int = 0):
        super().__init__()
        self.urls, self.settings, self.rank, self.world = list(urls), settings, rank, world
        self.workers, self.states, self.rotation = max(1, workers), states or {}, rotation

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, int, dict, dict]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.workers  # the DataLoader always starts at worker 0
        consumer = Consumer(self.rank, self.world, worker, self.workers)
        for batch, state, stats in consumer_batches(self.urls, self.settings, consumer, self.states.get(worker)):
            yield batch.mels, batch.speaker_index, worker, state.to_dict(), stats.to_dict()


class GE2ELoader:
    """Iterable of ``(mels, speakers)``: mels ``(N*M, L, n_mels)`` tensor, speakers ``(N*M,)`` int64.

    Endless; count steps yourself. ``state_dict()``/``load_state_dict()`` save and restore the
    position of every worker of this rank; ``stats`` adds up what sampling dropped, tiled and used.
    """

    def __init__(self, source: ShardSource, settings: BatchSettings, workers: int = 2, rank: int | None = None,
                 world: int | None = None, dtype: torch.dtype = torch.float32, pin_memory: bool = False,
                 prefetch: int = 4):
        r, w = distributed_rank_world()
        self.source, self.settings = source, settings
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.workers, self.dtype, self.pin_memory, self.prefetch = workers, dtype, pin_memory, prefetch
        self.states: dict[int, WorkerState] = {}
        self.next_worker = 0
        self.stats = SamplingStats()
        self.n_mels = source.index["config"]["features"]["n_mels"] if source.index else None

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.shape_key(), "rank": self.rank, "world": self.world,
                "workers": self.workers, "next_worker": self.next_worker,
                "states": {str(k): v.to_dict() for k, v in self.states.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore a position; False (and a fresh start) when the batch settings, world or workers differ."""
        same = (state.get("settings") == self.settings.shape_key() and state.get("world") == self.world
                and state.get("workers") == self.workers)
        if not same:
            log.warning("data stream: batch settings, world size or workers changed; starting a new stream")
            self.states, self.next_worker = {}, 0
            return False
        self.states = {int(k): WorkerState.from_dict(v) for k, v in state["states"].items()}
        self.next_worker = int(state["next_worker"])
        return True

    def restart_at_new_pass(self) -> None:
        """Start a deterministic new stream after the last pass any worker reached."""
        last = max((s.start.pass_ for s in self.states.values()), default=-1)
        self.states = {k: WorkerState(round=10**6 * (last + 1), start=StreamPosition(last + 1, 0, 0))
                       for k in range(max(1, self.workers))}
        self.next_worker = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = max(0, self.workers)
        dataset = GE2EDataset(self.source.urls, self.settings, self.rank, self.world, workers,
                              dict(self.states), rotation=self.next_worker)
        if workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                                      prefetch_factor=self.prefetch, persistent_workers=False,
                                      multiprocessing_context="fork" if os.name == "posix" else None))
        for mels, speakers, worker, state, stats in batches:
            self.states[int(worker)] = WorkerState.from_dict(state)
            self.next_worker = (int(worker) + 1) % max(1, workers)
            self.stats += SamplingStats(**stats)
            mels = torch.as_tensor(mels)
            yield mels.to(self.dtype), torch.as_tensor(speakers)


def ge2e_loader(shards: str | os.PathLike[str] | Sequence[str], n_speakers: int = 64, n_utterances: int = 10,
                seg_len: SegLen = 160, workers: int = 2, seed: int = 0, index: str | None = None,
                **options: Any) -> GE2ELoader:
    """Speaker-balanced GE2E batches streamed from shards; see :class:`GE2ELoader`.

    ``shards``: a folder with index.json, a brace pattern, a list of URLs, or ``file://``,
    ``http(s)://`` and ``pipe:`` URLs. ``options``: :class:`BatchSettings` fields (pool_size,
    max_uses, short_policy, min_frames, on_error) and GE2ELoader's (rank, world, dtype, pin_memory).
    """
    loader_keys = {"rank", "world", "dtype", "pin_memory", "prefetch"}
    loader_opts = {k: v for k, v in options.items() if k in loader_keys}
    settings = BatchSettings(n_speakers=n_speakers, n_utterances=n_utterances, seg_len=seg_len, seed=seed,
                             **{k: v for k, v in options.items() if k not in loader_keys})
    return GE2ELoader(resolve_shards(shards, index), settings, workers=workers, **loader_opts)
