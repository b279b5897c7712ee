"""Speaker-balanced GE2E batches of one consumer (rank, DataLoader worker), without torch's DataLoader.

Each consumer streams forever (:mod:`dvector.stream.samples`): it reads a bounded pool of samples,
draws batches from it (:func:`dvector.stream.sampling.draw_round`), and reads the next pool. A
consumer's position is (round, stream position where the round's pool began, batches drawn from
it): small, and enough to resume exactly, re-reading at most one pool. Between pools the shard
stream stays open, so that a remote shard is downloaded once per pass.

Batches are built in their final dtype (float32) straight into the buffer the caller allocates
(shared memory in a DataLoader worker), and the float16 -> float32 cast is torch's (several times
numpy's speed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from dvector.errors import DvectorError
from dvector.stream.samples import SampleStream
from dvector.stream.sampling import DEFAULT_MIN_FRAMES, Batch, SamplingStats, SegLen, SegmentSpec, crop_rows, draw_round
from dvector.stream.sources import Consumer, StreamPosition

__all__ = ["Allocate", "BatchSettings", "WorkerState", "consumer_batches", "crop_batch"]


@dataclass
class BatchSettings:
    """What shapes one consumer's batches: N x M x L, the pool, the short-utterance policy, the seed."""

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
        """Utterances per pool."""
        return self.pool_size or 8 * self.n_speakers * self.n_utterances

    def shape_key(self) -> dict[str, Any]:
        """What shapes the batch stream: a saved position only applies with the same settings."""
        spec = SegmentSpec.parse(self.seg_len)
        return {"n_speakers": self.n_speakers, "n_utterances": self.n_utterances, "seg_len": [spec.lo, spec.hi],
                "pool": self.pool, "max_uses": self.max_uses, "short_policy": self.short_policy,
                "min_frames": self.min_frames, "seed": self.seed, "exclude_speakers": list(self.exclude_speakers)}


@dataclass
class WorkerState:
    """A consumer's position: the round, where its pool began in the stream, batches drawn from it."""

    round: int = 0
    start: StreamPosition = field(default_factory=StreamPosition)  # where this round's pool began
    drawn: int = 0  # batches already drawn from this round

    def to_dict(self) -> dict[str, int]:
        """Plain values, as saved in checkpoints."""
        return {"round": self.round, "pass": self.start.pass_, "shard": self.start.shard,
                "sample": self.start.sample, "drawn": self.drawn}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "WorkerState":
        """The inverse of :meth:`to_dict`."""
        return cls(int(d["round"]), StreamPosition(int(d["pass"]), int(d["shard"]), int(d["sample"])), int(d["drawn"]))


def _difference(a: SamplingStats, b: SamplingStats) -> SamplingStats:
    """Counter by counter ``a - b``."""
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
    crop_rows([pool[p]["mel"] for p in batch.pool_index.tolist()], batch.offset.tolist(), L, stage)  # (N*M, L, n_mels)
    if cast:
        torch.from_numpy(out).copy_(torch.from_numpy(stage))
    return out


Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def _next_pool(samples: Iterator[tuple[StreamPosition, dict | None]], seen: set[str], start: StreamPosition,
               size: int) -> tuple[list[dict], StreamPosition]:
    """Read the pool of a round that begins at ``start``: up to ``size`` samples, each key once.

    ``samples`` stays open for the next pool. Stops early when the stream has wrapped around the
    consumer's data into a second pass (a consumer with fewer samples than a pool). Returns the
    pool and the stream position after it (where the next round's pool begins).
    """
    pool: list[dict] = []
    seen.clear()
    next_start = start
    for pos, sample in samples:
        next_start = pos
        if sample is None or sample["__key__"] in seen:  # the pool wrapped around the consumer's data
            if pos.pass_ > start.pass_ + 1:
                break
            continue
        seen.add(sample["__key__"])
        pool.append(sample)
        if len(pool) >= size:
            break
    return pool, next_start


def _too_little_data(settings: BatchSettings, pool: list[dict], consumer: Consumer) -> DvectorError:
    """The error for a pool that gives not even one batch."""
    speakers = len({s["speaker_index"] for s in pool})
    return DvectorError(
        f"cannot form a batch of {settings.n_speakers} speakers x {settings.n_utterances} utterances: "
        f"this process's share of the data holds {len(pool)} usable utterances of {speakers} speakers "
        f"(consumer {consumer}); lower -n/-m, use fewer workers, or add data")


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
        pool, next_start = _next_pool(samples, seen, state.start, settings.pool)
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
            shape = (len(batch.pool_index), batch.seg_len, pool[0]["mel"].shape[1])  # (N*M, L, n_mels)
            out = allocate(shape, out_dtype) if allocate is not None else np.empty(shape, out_dtype)
            mels = crop_batch(pool, batch, out, scratch)
            yield batch._replace(mels=mels), WorkerState.from_dict(state.to_dict()), delta
        carry += _difference(stats, reported)  # end-of-round counts ride on the next batch
        if drawn_before + produced == 0:
            raise _too_little_data(settings, pool, consumer)
        state = WorkerState(state.round + 1, next_start, 0)
