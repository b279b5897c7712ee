"""Speaker-balanced GE2E batches from one consumer's sample stream, and the torch DataLoader around them.

Each consumer (rank, DataLoader worker) streams forever (:mod:`dvector.stream.samples`): it reads a
bounded pool of samples, draws batches from it (:func:`dvector.stream.sampling.draw_round`), and reads
the next pool. A worker's position is (round, stream position where the round's pool began,
batches drawn from it): small, and enough to resume exactly, re-reading at most one pool. Between
pools the shard stream stays open, so that a remote shard is downloaded once per pass.

Batches are built in their final dtype (float32) in the worker, straight into shared memory, and
the float16 -> float32 cast is torch's (several times numpy's speed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dvector.errors import DvectorError
from dvector.stream.sampling import DEFAULT_MIN_FRAMES, Batch, SamplingStats, SegLen, SegmentSpec, draw_round
from dvector.stream.sources import Consumer, ShardSource, StreamPosition, resolve_shards, shard_order
from dvector.stream.samples import SampleStream, ShardFormatError, load_npy

__all__ = ["BatchSettings", "Consumer", "GE2EDataset", "GE2ELoader", "SampleStream", "ShardFormatError",
           "ShardSource", "StreamPosition", "WorkerState", "consumer_batches", "crop_batch",
           "distributed_rank_world", "ge2e_loader", "load_npy", "resolve_shards", "shard_order"]

log = logging.getLogger(__name__)


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


def crop_batch(pool: Sequence[dict], batch: Batch, out: np.ndarray, scratch: dict | None = None) -> np.ndarray:
    """Fill ``out`` (N*M, L, n_mels) with the crops ``batch`` names (as draw_round would), casting to its dtype.

    Crops are copied as stored, then cast in one go by torch where the dtypes differ: numpy's
    float16 -> float32 cast is ~8x slower than torch's. ``scratch`` keeps that staging buffer.
    """
    L = batch.seg_len
    assert out.shape[:2] == (len(batch.pool_index), L), f"out {out.shape} for {len(batch.pool_index)} rows of {L}"
    stored = pool[batch.pool_index[0]]["mel"].dtype.newbyteorder("=")
    cast = stored != out.dtype and out.dtype.isnative and stored.kind == "f" and out.dtype.kind == "f"
    if cast:
        scratch = {} if scratch is None else scratch
        stage = scratch.get((out.shape, stored))
        if stage is None:
            scratch.clear()  # one shape at a time (L may vary per batch)
            stage = scratch[out.shape, stored] = np.empty(out.shape, stored)
    else:
        stage = out
    ramp = None
    for r, (p, o) in enumerate(zip(batch.pool_index.tolist(), batch.offset.tolist())):
        mel = pool[p]["mel"]
        T = mel.shape[0]
        if T >= L:
            stage[r] = mel[o:o + L]
        else:  # "repeat": tile from the wrap start
            if ramp is None:
                ramp = np.arange(L, dtype=np.int64)
            stage[r] = mel[(ramp + o) % T]
    if cast:
        torch.from_numpy(out).copy_(torch.from_numpy(stage))
    return out


Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def consumer_batches(urls: Sequence[str], settings: BatchSettings, consumer: Consumer,
                     state: WorkerState | None = None, *, dtype: Any = None,
                     allocate: Allocate | None = None) -> Iterator[tuple[Batch, WorkerState, SamplingStats]]:
    """Endless (batch, state after it, stats of it) for one consumer, resuming from ``state``.

    ``batch.mels`` is (N*M, L, n_mels) in ``dtype`` (default: as stored, float16), in a buffer
    from ``allocate(shape, dtype)`` where given (e.g. shared memory), else a new array.
    The shard stream stays open from one pool to the next; ``state`` records where each pool began.
    """
    state = WorkerState.from_dict(state.to_dict()) if state else WorkerState()
    stream = SampleStream(urls, consumer, settings.seed, settings.on_error, settings.exclude_speakers)
    seen: set[str] = set()  # keys in the pool being read: a pool holds an utterance once
    scratch: dict = {}  # crop_batch's staging buffer
    samples = stream.samples(state.start, skip_key=seen.__contains__)
    carry = SamplingStats()
    while True:
        pool: list[dict] = []
        seen.clear()
        next_start = state.start
        for pos, sample in samples:
            next_start = pos
            if sample is None or sample["__key__"] in seen:  # the pool wrapped around the consumer's data
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
        out_dtype = np.dtype(dtype) if dtype is not None else (pool[0]["mel"].dtype if pool else np.float16)
        for batch in draw_round(pool, settings.n_speakers, settings.n_utterances, settings.seg_len, rng,
                                settings.max_uses, settings.short_policy, settings.min_frames, stats,
                                materialize=False, skip=drawn_before):
            produced += 1
            state.drawn = drawn_before + produced
            delta = _difference(stats, reported) + carry
            reported, carry = SamplingStats(**stats.to_dict()), SamplingStats()
            shape = (len(batch.pool_index), batch.seg_len, pool[0]["mel"].shape[1])
            out = allocate(shape, out_dtype) if allocate is not None else np.empty(shape, out_dtype)
            mels = crop_batch(pool, batch, out, scratch)
            yield batch._replace(mels=mels), WorkerState.from_dict(state.to_dict()), delta
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


_NUMPY_OF = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory, for a batch a worker sends to the main process.

    Crops are written straight into it, and it crosses to the main process as it is; a batch built
    in private memory would be written there first, then copied into shared memory by the
    DataLoader. (Reusing buffers instead saves the page faults of fresh shared memory, ~25% of the
    worker's time, but needs a count of who still holds a batch that torch only has in private API.)
    """
    return torch.empty(shape, dtype=dtype).share_memory_()


class GE2EDataset(IterableDataset):
    """Endless GE2E batches of this rank; each DataLoader worker streams its own slice.

    Yields ``(mels, speakers, worker, state, stats)``: ``mels`` a (N*M, L, n_mels) tensor of
    ``dtype`` (float16, float32 or float64; inside a DataLoader worker built in shared memory),
    ``speakers`` the (N*M,) int64 speaker ids as bytes (a tiny tensor would cost a shared-memory
    file of its own).
    """

    def __init__(self, urls: Sequence[str], settings: BatchSettings, rank: int, world: int, workers: int,
                 states: dict[int, WorkerState] | None = None, rotation: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in _NUMPY_OF:
            raise DvectorError(f"batches come as float16, float32 or float64, not {dtype}")
        self.urls, self.settings, self.rank, self.world = list(urls), settings, rank, world
        self.workers, self.states, self.rotation, self.dtype = max(1, workers), states or {}, rotation, dtype

    def __iter__(self) -> Iterator[tuple[torch.Tensor, bytes, int, dict, dict]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.workers  # the DataLoader always starts at worker 0
        consumer = Consumer(self.rank, self.world, worker, self.workers)
        last: list[torch.Tensor] = []

        def shared(shape: tuple[int, ...], np_dtype: np.dtype) -> np.ndarray:
            last[:] = [_shared_empty(shape, self.dtype)]
            return last[0].numpy()

        allocate = shared if info is not None else None  # in a worker process: build batches in shared memory

        for batch, state, stats in consumer_batches(self.urls, self.settings, consumer, self.states.get(worker),
                                                    dtype=_NUMPY_OF[self.dtype], allocate=allocate):
            mels = last.pop() if allocate is not None else torch.from_numpy(batch.mels)
            yield mels, batch.speaker_index.astype(np.int64).tobytes(), worker, state.to_dict(), stats.to_dict()


class GE2ELoader:
    """Iterable of ``(mels, speakers)``: mels ``(N*M, L, n_mels)`` tensor, speakers ``(N*M,)`` int64.

    Endless; count steps yourself. ``state_dict()``/``load_state_dict()`` save and restore the
    position of every worker of this rank; ``stats`` adds up what sampling dropped, tiled and used.
    With ``workers > 0`` batches come from DataLoader worker processes (forked), built there in
    ``dtype`` straight into shared memory.
    """

    def __init__(self, source: ShardSource, settings: BatchSettings, workers: int = 2, rank: int | None = None,
                 world: int | None = None, dtype: torch.dtype = torch.float32, pin_memory: bool = False,
                 prefetch: int = 4):
        r, w = distributed_rank_world()
        self.source, self.settings = source, settings
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.workers, self.dtype, self.pin_memory, self.prefetch = workers, dtype, pin_memory, prefetch
        # what workers build and send: the final dtype where numpy has it (no conversion here), else float32
        self.transfer_dtype = dtype if dtype in _NUMPY_OF else torch.float32
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
                              dict(self.states), rotation=self.next_worker, dtype=self.transfer_dtype)
        if workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                                      prefetch_factor=self.prefetch, persistent_workers=False,
                                      multiprocessing_context="fork" if os.name == "posix" else None))
        try:
            for mels, speakers, worker, state, stats in batches:
                self.states[int(worker)] = WorkerState.from_dict(state)
                self.next_worker = (int(worker) + 1) % max(1, workers)
                self.stats += SamplingStats(**stats)
                speakers = torch.from_numpy(np.frombuffer(speakers, dtype=np.int64).copy())
                yield mels.to(self.dtype), speakers
        finally:
            # Stop the workers now, while the DataLoader's queues are intact: left to the garbage
            # collector (an exception's traceback keeps the iterator in a cycle), shutting down
            # can find the queues finalized first and wait 5 s per worker before killing them.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def ge2e_loader(shards: str | os.PathLike[str] | Sequence[str], n_speakers: int = 64, n_utterances: int = 10,
                seg_len: SegLen = 160, workers: int = 2, seed: int = 0, index: str | None = None,
                **options: Any) -> GE2ELoader:
    """Speaker-balanced GE2E batches streamed from shards; see :class:`GE2ELoader`.

    ``shards``: a folder with index.json, a brace pattern, a list of URLs, or ``file://``,
    ``http(s)://`` and ``pipe:`` URLs. ``options``: :class:`BatchSettings` fields (pool_size,
    max_uses, short_policy, min_frames, on_error, exclude_speakers) and GE2ELoader's (rank, world,
    dtype, pin_memory, prefetch).
    """
    loader_keys = {"rank", "world", "dtype", "pin_memory", "prefetch"}
    loader_opts = {k: v for k, v in options.items() if k in loader_keys}
    settings = BatchSettings(n_speakers=n_speakers, n_utterances=n_utterances, seg_len=seg_len, seed=seed,
                             **{k: v for k, v in options.items() if k not in loader_keys})
    return GE2ELoader(resolve_shards(shards, index), settings, workers=workers, **loader_opts)
