"""The torch DataLoader around one rank's GE2E batches (:mod:`dvector.stream.batches`), and the
format of the loader's saved position in a checkpoint, which only this module reads and writes.

Each DataLoader worker is a consumer of its own slice of the rank's data; batches are built in the
worker straight into shared memory. A checkpoint holds ``{"world": W, "ranks": [...]}``: the
position of every rank (:meth:`GE2ELoader.checkpoint_entry`), restored by
:meth:`GE2ELoader.restore`, which starts a fresh pass when the position no longer applies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dvector.augment import AugmentPlan
from dvector.config import AugmentConfig, FeatureConfig
from dvector.errors import DvectorError
from dvector.stream.batches import BatchSettings, WorkerState, consumer_batches
from dvector.stream.sampling import SamplingStats, SegLen
from dvector.stream import ShardSource, index_checks, resolve_shards
from dvector.stream.sources import Consumer, StreamPosition

__all__ = ["GE2EDataset", "GE2ELoader", "distributed_rank_world", "ge2e_loader"]

log = logging.getLogger(__name__)


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
    file of its own). In a DataLoader worker, a :class:`DvectorError` ends the stream with
    ``(None, message, worker, None, None)``: torch would wrap it in the worker's traceback.
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
        """This worker's endless batches (in a DataLoader worker: built in shared memory)."""
        info = get_worker_info()
        if info is not None:
            fixed_mmap_threshold()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.workers  # the DataLoader always starts at worker 0
        consumer = Consumer(self.rank, self.world, worker, self.workers)
        last: list[torch.Tensor] = []

        def shared(shape: tuple[int, ...], np_dtype: np.dtype) -> np.ndarray:
            last[:] = [_shared_empty(shape, self.dtype)]
            return last[0].numpy()

        allocate = shared if info is not None else None  # in a worker process: build batches in shared memory

        batches = consumer_batches(self.urls, self.settings, consumer, self.states.get(worker),
                                   dtype=_NUMPY_OF[self.dtype], allocate=allocate)
        try:
            for batch, state, stats in batches:
                mels = last.pop() if allocate is not None else torch.from_numpy(batch.mels)
                yield mels, batch.speaker_index.astype(np.int64).tobytes(), worker, state.to_dict(), stats.to_dict()
        except DvectorError as exc:
            if info is None:
                raise
            yield None, str(exc), worker, None, None  # raised as it is by the loader: no worker traceback


MMAP_THRESHOLD = 128 * 1024  # bytes: glibc's initial value, kept fixed


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM and SIGINT: a signal sent to the whole process group (``timeout``,
    Slurm, Ctrl-C) is the main process's to handle (training saves a checkpoint, then stops its workers);
    torch's own handler would end the worker first. A worker whose parent is gone still exits (torch
    watches for that)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def fixed_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at 128 KiB in a loader worker (True where it was set).

    glibc raises the threshold to the size of each big block freed (a batch's temporaries: MBs);
    after that the pool's samples (tens of KB each, long-lived) and the short-lived blocks share the
    heap and fragment it. Measured in bench_loader: peak RSS per worker 1.1 GB without this, 0.64 GB
    with it, at the same batches/s. Elsewhere (not glibc) nothing happens.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _checked_against(settings: BatchSettings, index: dict[str, Any] | None) -> BatchSettings:
    """``settings`` with the mel bands and speaker range of ``index`` where they are not set."""
    checks = index_checks(index)
    n_mels, top = checks.n_mels, checks.max_speaker_index
    return replace(settings, n_mels=settings.n_mels if settings.n_mels is not None else n_mels,
                   max_speaker_index=settings.max_speaker_index if settings.max_speaker_index is not None else top)


class GE2ELoader:
    """Iterable of ``(mels, speakers)``: mels ``(N*M, L, n_mels)`` tensor, speakers ``(N*M,)`` int64.

    Endless; count steps yourself. ``state_dict()``/``load_state_dict()`` save and restore the
    position of every worker of this rank; ``checkpoint_entry()``/``restore()`` those of every
    rank, as a checkpoint holds them; ``stats`` adds up what sampling dropped, tiled and used.
    With ``workers > 0`` batches come from DataLoader worker processes (forked), built there in
    ``dtype`` straight into shared memory.
    """

    def __init__(self, source: ShardSource, settings: BatchSettings, workers: int = 2, rank: int | None = None,
                 world: int | None = None, dtype: torch.dtype = torch.float32, pin_memory: bool = False,
                 prefetch: int = 4):
        r, w = distributed_rank_world()
        self.source, self.settings = source, _checked_against(settings, source.index)
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.workers, self.dtype, self.pin_memory, self.prefetch = workers, dtype, pin_memory, prefetch
        # what workers build and send: the final dtype where numpy has it (no conversion here), else float32
        self.transfer_dtype = dtype if dtype in _NUMPY_OF else torch.float32
        self.states: dict[int, WorkerState] = {}
        self.next_worker = 0
        self.stats = SamplingStats()
        self.n_mels = self.settings.n_mels  # from the index, where it says

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (plain values): its batch settings, world, workers and every worker's state."""
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

    def restart_at_pass(self, pass_: int, damage: Sequence[str] = ()) -> None:
        """Start every worker of this rank at the beginning of pass ``pass_`` (a deterministic new stream);
        ``damage``: what was counted as damaged already (not counted again)."""
        known = tuple(sorted(set(damage)))
        self.states = {k: WorkerState(round=1_000_000 * pass_, start=StreamPosition(pass_, 0, 0), damage=known)
                       for k in range(max(1, self.workers))}
        self.next_worker = 0

    def checkpoint_entry(self) -> dict[str, Any]:
        """This loader's entry of a checkpoint: ``{"world": W, "ranks": [state_dict() of rank 0..W-1]}``.

        With several ranks it gathers every rank's position (``all_gather_object``): every rank
        must call it at the same step.
        """
        states: list[Any] = [self.state_dict()]
        if self.world > 1:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise DvectorError(f"a loader of rank {self.rank} of {self.world} needs the torch.distributed "
                                   "process group to gather every rank's position")
            states = [None] * self.world
            torch.distributed.all_gather_object(states, self.state_dict())
        return {"world": self.world, "ranks": states}

    def restore(self, saved: dict[str, Any] | None) -> str | None:
        """Put the stream where a checkpoint's entry (:meth:`checkpoint_entry`) left it.

        Returns None when it resumes exactly (or ``saved`` is empty). When the batch settings, the
        world size or the workers changed, every worker starts the pass after the last pass any
        rank or worker reached, so every rank starts the same pass (and, if the world size changed,
        nobody silently re-reads pass 0); returns a message saying so.
        """
        if not saved:
            return None
        ranks = saved.get("ranks") or []
        if saved.get("world") == self.world and self.rank < len(ranks) and self.load_state_dict(ranks[self.rank]):
            return None
        passes = [int(s["pass"]) for r in ranks if r for s in r.get("states", {}).values()]
        new_pass = max(passes, default=-1) + 1
        damage = [str(d) for r in ranks if r for s in r.get("states", {}).values() for d in s.get("damage", ())]
        self.restart_at_pass(new_pass, damage)
        return (f"batch options, world size or workers changed since the checkpoint: "
                f"the data stream restarts at a new pass ({new_pass})")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless ``(mels, speakers)`` from where the saved position says; updates it batch by batch."""
        workers = max(0, self.workers)
        dataset = GE2EDataset(self.source.urls, self.settings, self.rank, self.world, workers,
                              dict(self.states), rotation=self.next_worker, dtype=self.transfer_dtype)
        if workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                                      prefetch_factor=self.prefetch, persistent_workers=False,
                                      multiprocessing_context="fork" if os.name == "posix" else None,
                                      worker_init_fn=ignore_stop_signals))
        try:
            for mels, speakers, worker, state, stats in batches:
                if mels is None:  # a worker's DvectorError (see GE2EDataset)
                    raise DvectorError(speakers)
                self.states[int(worker)] = WorkerState.from_dict(state)
                self.next_worker = (int(worker) + 1) % max(1, workers)
                self.stats += SamplingStats(**stats)
                speakers = torch.from_numpy(np.frombuffer(speakers, dtype=np.int64).copy())
                yield mels.to(self.dtype), speakers
        except (ConnectionError, EOFError, OSError) as exc:  # a worker killed while a batch came over
            if workers == 0:
                raise
            pids = ", ".join(str(w.pid) for w in getattr(batches, "_workers", []))
            raise RuntimeError(f"DataLoader worker (pid(s) {pids}) exited unexpectedly while sending a batch "
                               f"({type(exc).__name__}: {exc})") from exc
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
    max_uses, short_policy, min_frames, on_error, exclude_speakers), ``augment`` (kinds as ``--augment``
    takes them, an :class:`~dvector.config.AugmentConfig` or an AugmentPlan) and GE2ELoader's (rank,
    world, dtype, pin_memory, prefetch).
    """
    loader_keys = {"rank", "world", "dtype", "pin_memory", "prefetch"}
    loader_opts = {k: v for k, v in options.items() if k in loader_keys}
    source = resolve_shards(shards, index)
    augment = options.pop("augment", None)
    if augment is not None and not isinstance(augment, AugmentPlan):  # kinds ("noise,reverb", "all") or a config
        config = augment if isinstance(augment, AugmentConfig) else AugmentConfig(kinds=augment)
        augment = AugmentPlan.prepare(config, shard_features(source), seed,
                                      Path(tempfile.gettempdir()) / "dvector-augment")  # cached by content
    settings = BatchSettings(n_speakers=n_speakers, n_utterances=n_utterances, seg_len=seg_len, seed=seed,
                             augment=augment, **{k: v for k, v in options.items() if k not in loader_keys})
    return GE2ELoader(source, settings, workers=workers, **loader_opts)


def shard_features(source: ShardSource, n_mels: int | None = None) -> FeatureConfig:
    """The feature settings the shards' index records (the defaults with ``n_mels`` where there is none)."""
    if source.index is not None and "features" in source.index.get("config", {}):
        return FeatureConfig.from_dict(source.index["config"]["features"])
    return FeatureConfig(n_mels=n_mels) if n_mels else FeatureConfig()
