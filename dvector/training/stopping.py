"""When training stops before its last step, decided alike on every rank: a stop signal (SIGTERM from
Slurm preemption, Kubernetes or ``timeout``; SIGINT from Ctrl-C), ``--max-minutes``, or a data loader
worker that died.

A signal only marks the run as asked to stop (:class:`StopSignals`); the step in progress finishes,
the loop saves a checkpoint at that step as the run's latest and then raises
:class:`dvector.errors.Stopped`. Further signals during that save are ignored, and the save itself is
atomic, so no signal leaves a damaged file under a final name. The loader's worker processes ignore
both signals (:func:`dvector.stream.loader.ignore_stop_signals`): one sent to the whole process group
(``timeout``, Slurm, a terminal's Ctrl-C) does not kill them under the main process's feet.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from dvector.training.distributed import Distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Within ``with StopSignals() as signals:``, SIGTERM and SIGINT set ``signals.received`` (the first
    one's number) instead of ending the process; the previous handlers come back on exit. Outside the
    main thread (where Python cannot set handlers) it does nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


@dataclass(frozen=True)
class StopReason:
    """Why the loop stops early: ``signum`` (a stop signal) or ``out_of_time`` (--max-minutes)."""

    signum: int = 0
    out_of_time: bool = False

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def stop_reason(signals: StopSignals, started: float, max_minutes: float, ddp: Distributed,
                dev: torch.device) -> StopReason | None:
    """Whether to stop after this step, the same on every rank: any rank's signal or clock stops them
    all (one small all-reduce per step under torchrun; nothing to share in a single process)."""
    late = max_minutes > 0 and time.perf_counter() - started > 60.0 * max_minutes
    flags = [signals.received or 0, int(late)]
    if ddp.world > 1:
        shared = torch.tensor(flags, device=dev if dev.type == "cuda" else torch.device("cpu"))
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        flags = [int(v) for v in shared.tolist()]
    if not flags[0] and not flags[1]:
        return None
    return StopReason(flags[0], bool(flags[1]))


_WORKER_DEATH = re.compile(r"DataLoader worker \(pid")


def worker_death(exc: BaseException) -> str | None:
    """torch's first line about a DataLoader worker that died (killed, out of memory, exited), or None
    when ``exc`` is something else."""
    text = " ".join(str(exc).split())
    found = _WORKER_DEATH.search(text) if isinstance(exc, RuntimeError) else None
    return text[found.start():].split(". ")[0].rstrip(".") if found else None
