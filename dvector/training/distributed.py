"""torchrun / DDP for training: the process group, this process's device and CPU threads, and
decisions that rank 0 makes for every rank.

Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op for a single process.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from dvector.config import TrainConfig
from dvector.errors import DvectorError

R = TypeVar("R")


@dataclass
class Distributed:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, validates and saves."""
        return self.rank == 0

    def first_on_rank0(self, work: Callable[[], R]) -> R:
        """``work()`` on rank 0, then on the other ranks (which then find what rank 0 cached):
        once per machine's shared folder instead of once per process."""
        if self.world <= 1 or not dist.is_initialized():
            return work()
        if self.main:
            try:
                return work()
            finally:
                dist.barrier()  # also after a failure: the others then fail the same way, none waits
        dist.barrier()
        return work()


def setup_distributed(device_kind: str) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def cpu_threads(cfg: TrainConfig, ddp: Distributed) -> int:
    """Torch threads per training process on CPU: ``cfg.threads``, or every core this process may
    use, shared evenly among the training processes of this machine (torchrun).

    The loader's workers get no cores of their own: they build a batch in a fraction of a step and
    then wait on a full queue, so the step's math is what needs the cores (at N=32, M=8, L=80 with
    the attentive model and 2 workers, 2 threads ran 1.7x faster than 1 on a 2-core machine). Cores
    that other busy jobs share are another matter: an LSTM step is many small parallel regions, each
    waiting for its slowest thread, so there ``--threads 1`` can be several times faster.
    """
    if cfg.threads:
        return cfg.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ddp.world))
    return max(1, cores // max(1, local_world))


def choose_device(requested: str | None, ddp: Distributed) -> torch.device:
    """The device asked for (default: CUDA when torch sees a GPU, else CPU); on CUDA, this rank's GPU."""
    kind = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DvectorError("--device cuda was asked for, but torch sees no CUDA GPU")
        torch.cuda.set_device(ddp.local_rank)
        return torch.device("cuda", ddp.local_rank)
    return torch.device(kind)


def setup_process(device: str | None, cfg: TrainConfig) -> tuple[Distributed, torch.device]:
    """Join the process group (under torchrun), pick this process's device and, on CPU, its threads."""
    ddp_probe_kind = (device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    ddp = setup_distributed(ddp_probe_kind)
    dev = choose_device(device, ddp)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg, ddp))
    return ddp, dev


def main_value(value: Any, ddp: Distributed) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank; every rank must call it at the same point."""
    if ddp.world <= 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def sum_over_ranks(counts: dict[str, int], ddp: Distributed) -> dict[str, int]:
    """Every rank's ``counts`` added up, key by key, on every rank (every rank must call it at the same point)."""
    if ddp.world <= 1:
        return dict(counts)
    gathered: list[Any] = [None] * ddp.world
    dist.all_gather_object(gathered, dict(counts))
    return {k: sum(int(g.get(k, 0)) for g in gathered) for k in sorted({k for g in gathered for k in g})}


def ends_own_process_group(fn: Callable[..., R]) -> Callable[..., R]:
    """Under torchrun, a process group the call starts is also ended by it (a process that exits
    with a live gloo group aborts with "terminate called without an active exception")."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        owns_group = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
        finished = False
        try:
            result = fn(*args, **kwargs)
            if owns_group and dist.is_initialized():
                dist.barrier()  # no rank tears down gloo while a peer still talks to it (aborts seen in CI)
            finished = True
            return result
        finally:
            if owns_group and dist.is_initialized():
                # torch's rendezvous store (private API: without it, the old behaviour, no wait)
                get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
                store = get_store() if finished and get_store is not None else None
                dist.destroy_process_group()
                if store is not None:
                    wait_for_every_rank_to_close(store, int(os.environ["WORLD_SIZE"]))

    return wrapper


def wait_for_every_rank_to_close(store: Any, world: int, timeout_s: float = 60.0) -> None:
    """After a successful run, no rank exits while a peer is still tearing its gloo group down: one rank's
    exit closes the sockets a peer's gloo threads still read, which aborted that peer ("terminate called
    without an active exception", about 1 torchrun in 10 beside two CPU hogs). The rendezvous store outlives
    the group, so each rank counts itself closed there and waits (bounded) for the others."""
    store.add("dvector/closed", 1)
    deadline = time.monotonic() + timeout_s
    while store.add("dvector/closed", 0) < world and time.monotonic() < deadline:
        time.sleep(0.05)
