"""Speaker-balanced GE2E batches of one consumer (rank, DataLoader worker), without torch's DataLoader.

Each consumer streams forever (:mod:`dvector.stream.samples`): it reads a bounded pool of samples,
draws batches from it (:func:`dvector.stream.sampling.draw_round`), and reads the next pool. A
consumer's position is (round, stream position where the round's pool began, batches drawn from
it): small, and enough to resume exactly, re-reading at most one pool. Between pools the shard
stream stays open, so that a remote shard is downloaded once per pass.

A pool holds ``8 x N x M`` utterances by default, and reads on (keeping only what speakers short
of M usable utterances need) until N speakers have M, for up to one pass over the consumer's
data. Where the consumer's own slice of the data cannot form a batch even so (a small corpus over
many ranks and workers), it reads every shard instead and keeps every K-th batch of that shared
stream (K consumers in all: each keeps its own residue, so consumers that share from the same
point draw disjoint batches); only when the whole data cannot form a batch is it an error. Its
stats count its own batches (``batches``, ``uses``, ``repeated_short``) and the pools it reads.

Batches are built in their final dtype (float32) straight into the buffer the caller allocates
(shared memory in a DataLoader worker), and the float16 -> float32 cast is torch's (several times
numpy's speed).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator, Sequence

import numpy as np
import torch

from dvector.augment import AugmentPlan, Augmenter, RowInfo
from dvector.errors import DvectorError
from dvector.stream.samples import SampleStream
from dvector.stream.sampling import (DEFAULT_MIN_FRAMES, Batch, SamplingStats, SegLen, SegmentSpec, crop_rows,
                                     draw_round, shortest_usable)
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
    n_mels: int | None = None  # mel bands every sample must have (None: those of the first good one)
    max_speaker_index: int | None = None  # the largest valid speaker_index (None: any sane one)
    augment: AugmentPlan | None = None  # online augmentation of the crops (None: none)

    @property
    def pool(self) -> int:
        """Utterances per pool."""
        return self.pool_size or 8 * self.n_speakers * self.n_utterances

    def shape_key(self) -> dict[str, Any]:
        """What shapes the batch stream: a saved position only applies with the same settings
        (``n_mels`` and ``max_speaker_index`` only refuse bad samples, so they are not part of it)."""
        spec = SegmentSpec.parse(self.seg_len)
        return {"n_speakers": self.n_speakers, "n_utterances": self.n_utterances, "seg_len": [spec.lo, spec.hi],
                "pool": self.pool, "max_uses": self.max_uses, "short_policy": self.short_policy,
                "min_frames": self.min_frames, "seed": self.seed, "exclude_speakers": list(self.exclude_speakers)}


@dataclass
class WorkerState:
    """A consumer's position: the round, where its pool began in the stream, batches drawn from it.

    ``shared``: the consumer reads every shard (its own slice cannot form a batch); ``start`` is
    then a position in the stream of all shards, and ``before`` counts the batches drawn from that
    stream before this round (batch ``before + j`` of the shared stream is consumer ``slot``'s
    when ``(before + j) % slots == slot``). ``drawn`` counts every batch drawn from the round.
    ``damage``: the damaged samples and shards the consumer counted already (:attr:`SampleStream.damage`),
    so that a resumed stream does not count them again.
    """

    round: int = 0
    start: StreamPosition = field(default_factory=StreamPosition)  # where this round's pool began
    drawn: int = 0  # batches already drawn from this round
    shared: bool = False
    before: int = 0
    damage: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as saved in checkpoints (``damage`` only where there is some)."""
        out: dict[str, Any] = {"round": self.round, "pass": self.start.pass_, "shard": self.start.shard,
                               "sample": self.start.sample, "drawn": self.drawn, "shared": int(self.shared),
                               "before": self.before}
        if self.damage:
            out["damage"] = list(self.damage)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorkerState":
        """The inverse of :meth:`to_dict` (positions saved before ``shared`` existed read as own slices)."""
        return cls(int(d["round"]), StreamPosition(int(d["pass"]), int(d["shard"]), int(d["sample"])), int(d["drawn"]),
                   bool(d.get("shared", 0)), int(d.get("before", 0)), tuple(str(x) for x in d.get("damage", ())))


def _damage(stream: SampleStream) -> tuple[str, ...]:
    """What ``stream`` counted as damaged so far, as a state records it (sorted: the same every time)."""
    return tuple(sorted(stream.damage)) if stream.damage else ()


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
               settings: BatchSettings) -> tuple[list[dict], StreamPosition]:
    """Read the pool of a round that begins at ``start``: ``settings.pool`` samples, each key once,
    and on until N speakers have M usable utterances each, where the data has them.

    Past the pool's size only usable utterances of speakers that still lack M are kept, so a pool
    outgrows its size by less than M per speaker. ``samples`` stays open for the next pool. Stops
    when the stream has gone round the consumer's data (into the second pass after ``start``'s):
    a pool never reads more than about two passes. Returns the pool and the stream position after
    it (where the next round's pool begins).
    """
    size, n_speakers, n_utterances = settings.pool, settings.n_speakers, settings.n_utterances
    shortest = shortest_usable(settings.seg_len, settings.short_policy, settings.min_frames)
    pool: list[dict] = []
    seen.clear()
    usable: dict[int, int] = {}  # usable utterances in the pool, per speaker
    ready = 0  # speakers with M of them
    next_start = start
    for pos, sample in samples:
        next_start = pos
        wrapped = pos.pass_ > start.pass_ + 1
        if sample is None or sample["__key__"] in seen:  # the pool wrapped around the consumer's data
            if wrapped:
                break
            continue
        speaker, fits = sample["speaker_index"], sample["mel"].shape[0] >= shortest
        if len(pool) >= size:  # reading on for speakers short of M utterances
            if wrapped:
                break
            if not fits or usable.get(speaker, 0) >= n_utterances:
                continue
        seen.add(sample["__key__"])
        sample["__pass__"] = pos.pass_  # augmentation draws depend on it
        pool.append(sample)
        if fits:
            usable[speaker] = usable.get(speaker, 0) + 1
            ready += usable[speaker] == n_utterances
        if len(pool) >= size and ready >= n_speakers:
            break
    return pool, next_start


def _what_a_pool_holds(settings: BatchSettings, pool: list[dict]) -> str:
    """What a pool that gives no batch holds (for the messages that say so)."""
    M = settings.n_utterances
    shortest = shortest_usable(settings.seg_len, settings.short_policy, settings.min_frames)
    usable: dict[int, int] = {}
    for s in pool:
        if s["mel"].shape[0] >= shortest:
            usable[s["speaker_index"]] = usable.get(s["speaker_index"], 0) + 1
    ready = sum(c >= M for c in usable.values())
    return (f"{ready} speakers with {M}+ usable utterances ({sum(usable.values())} usable utterances of "
            f"{len(usable)} speakers; an utterance needs {shortest}+ frames)")


class _Sink:
    """Where a consumer's batches go: buffers from ``allocate`` (or new arrays) in ``dtype``, augmented
    where asked; and the counts not handed on yet (``carry``: they ride on the next batch)."""

    def __init__(self, dtype: Any, allocate: Allocate | None, augment: AugmentPlan | None = None):
        self.dtype, self.allocate, self.scratch = dtype, allocate, {}  # scratch: crop_batch's staging buffer
        self.carry = SamplingStats()
        self.augmenter: Augmenter | None = augment.make() if augment is not None else None

    def counts(self, delta: SamplingStats) -> SamplingStats:
        """``delta`` and what was carried: the counts to hand on with a batch."""
        delta, self.carry = delta + self.carry, SamplingStats()
        return delta

    def batch(self, pool: Sequence[dict], batch: Batch) -> Batch:
        """``batch`` with its mels cropped from ``pool``."""
        first = pool[0]["mel"]
        dtype = np.dtype(self.dtype) if self.dtype is not None else first.dtype
        shape = (len(batch.pool_index), batch.seg_len, first.shape[1])  # (N*M, L, n_mels)
        out = self.allocate(shape, dtype) if self.allocate is not None else np.empty(shape, dtype)
        mels = crop_batch(pool, batch, out, self.scratch)
        if self.augmenter is not None:
            rows = [pool[p] for p in batch.pool_index.tolist()]
            info = RowInfo([s["__key__"] for s in rows], [s.get("__pass__", 0) for s in rows], batch.offset,
                           batch.speaker_index)
            work = mels if mels.dtype == np.float32 else mels.astype(np.float32)
            self.augmenter(work, info)
            if work is not mels:
                mels[...] = work
        return batch._replace(mels=mels)


class _BadCounts:
    """The stream's cumulative counts of bad samples and shards, handed out as deltas."""

    def __init__(self, stream: SampleStream):
        self.stream, self.samples, self.shards = stream, 0, 0

    def take(self) -> SamplingStats:
        """What the stream skipped since the last call."""
        samples, shards = getattr(self.stream, "bad_samples", 0), getattr(self.stream, "bad_shards", 0)
        delta = SamplingStats(bad_samples=samples - self.samples, bad_shards=shards - self.shards)
        self.samples, self.shards = samples, shards
        return delta


def _others(pool: Sequence[dict], batch: Batch) -> SamplingStats:
    """What ``draw_round`` counted for a batch that another consumer keeps."""
    short = sum(pool[p]["mel"].shape[0] < batch.seg_len for p in batch.pool_index.tolist())
    return SamplingStats(batches=1, uses=len(batch.pool_index), repeated_short=int(short))


def _rounds(urls: Sequence[str], settings: BatchSettings, consumer: Consumer, state: WorkerState,
            out: _Sink) -> Generator[tuple[Batch, WorkerState, SamplingStats], None, tuple[WorkerState, str]]:
    """One stream's rounds (the consumer's own slice, or every shard when ``state.shared``).

    Reads each pool, draws it, keeps this consumer's batches and hands the counts on. Returns
    (own slice only), once a round of the own slice gives no batch, the state where the shared
    stream begins and a note saying why.
    """
    shared = state.shared
    stream = SampleStream(urls, Consumer() if shared else consumer, settings.seed, settings.on_error,
                          settings.exclude_speakers, n_mels=settings.n_mels,
                          max_speaker_index=settings.max_speaker_index, known=state.damage,
                          counted_by=(consumer.slot, consumer.slots) if shared else None)
    bad = _BadCounts(stream)
    seen: set[str] = set()  # keys in the pool being read: a pool holds an utterance once
    samples = stream.samples(state.start, skip_key=seen.__contains__)
    while True:
        try:
            pool, next_start = _next_pool(samples, seen, state.start, settings)
        except DvectorError:  # an own slice with no sample at all (nothing broken): share instead
            if shared or consumer.slots == 1 or settings.on_error == "raise" or bad.take() != SamplingStats():
                raise
            pool, next_start = [], state.start
        if shared:
            rng = np.random.default_rng([settings.seed, 0x5EA4ED, state.start.pass_, state.start.shard,
                                         state.start.sample])  # the same on every consumer that shares
        else:
            rng = np.random.default_rng([settings.seed, consumer.rank, consumer.worker, state.round])
        stats = SamplingStats()  # draw_round updates it as the round goes
        reported = SamplingStats()  # counted already: handed on with a batch, or another consumer's
        drawn = state.drawn
        for batch in draw_round(pool, settings.n_speakers, settings.n_utterances, settings.seg_len, rng,
                                settings.max_uses, settings.short_policy, settings.min_frames, stats,
                                materialize=False, skip=drawn):
            drawn += 1
            if shared and (state.before + drawn - 1) % consumer.slots != consumer.slot:
                reported += _others(pool, batch)
                continue
            delta = out.counts(_difference(stats, reported) + bad.take())
            reported = SamplingStats(**stats.to_dict())
            after = WorkerState(state.round, state.start, drawn, shared, state.before, _damage(stream))
            yield out.batch(pool, batch), after, delta
        out.carry += _difference(stats, reported) + bad.take()  # end-of-round counts ride on the next batch
        if drawn == 0:
            holds, size = _what_a_pool_holds(settings, pool), f"{settings.n_speakers} x {settings.n_utterances}"
            if shared or consumer.slots == 1:
                where = "the data" + (" without the held-out speakers" if settings.exclude_speakers else "")
                raise DvectorError(f"cannot form a batch of {settings.n_speakers} speakers x "
                                   f"{settings.n_utterances} utterances: a whole pass over {where} gives only "
                                   f"{holds}; lower -n/-m, or add data")
            note = (f"data stream: consumer {consumer.slot} of {consumer.slots} (rank {consumer.rank}, worker "
                    f"{consumer.worker}): its slice of the shards gives only {holds}, too few for a batch of "
                    f"{size}; it reads every shard and keeps one batch in {consumer.slots} instead")
            return WorkerState(state.round + 1, StreamPosition(state.start.pass_, 0, 0), 0, True, 0,
                               _damage(stream)), note
        state = WorkerState(state.round + 1, next_start, 0, shared, state.before + drawn, _damage(stream))


def consumer_batches(urls: Sequence[str], settings: BatchSettings, consumer: Consumer,
                     state: WorkerState | None = None, *, dtype: Any = None,
                     allocate: Allocate | None = None) -> Iterator[tuple[Batch, WorkerState, SamplingStats]]:
    """Endless (batch, state after it, stats of it) for one consumer, resuming from ``state``.

    ``batch.mels`` is (N*M, L, n_mels) in ``dtype`` (default: as stored, float16), in a buffer
    from ``allocate(shape, dtype)`` where given (e.g. shared memory), else a new array.
    The shard stream stays open from one pool to the next; ``state`` records where each pool began.
    A consumer whose own slice cannot form a batch reads every shard and keeps every K-th batch
    (see the module doc); :class:`DvectorError` when the whole data cannot form one.
    """
    state = WorkerState.from_dict(state.to_dict()) if state else WorkerState()
    out = _Sink(dtype, allocate, settings.augment)
    note = None
    if not state.shared:
        state, note = yield from _rounds(urls, settings, consumer, state, out)
    shared = _rounds(urls, settings, consumer, state, out)
    first = next(shared)  # where the whole data cannot form a batch either, its error alone
    if note:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    yield first
    yield from shared
