"""Dask, when asked for: ``--dask tcp://scheduler:8786`` connects to a running cluster, ``--dask
local:K`` starts a ``LocalCluster`` of K worker processes (one thread each) for this command.

Shared by the build (one task per shard) and embedding (one task per file). ``distributed`` is an
optional extra (``dvector[dask]``), imported only here and only when ``--dask`` is given. Jobs go to
the cluster through ``Client.get_executor`` (a ``concurrent.futures`` executor, as Lhotse does for
feature extraction), so the code that waits on them is the same for local processes and Dask.
A job that raises is retried (``RETRIES``); a job whose worker dies is rescheduled by the scheduler
on another worker, up to its ``distributed.scheduler.allowed-failures`` setting (then ``KilledWorker``).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from dvector.errors import DvectorError

RETRIES = 2  # reruns of a job that raised on a worker (a lost worker's jobs are rescheduled by the scheduler)
INSTALL = "pip install 'dvector[dask]'"


def import_distributed() -> Any:
    """The ``distributed`` module, or one clear line on how to install it."""
    try:
        import distributed
    except ImportError:
        raise DvectorError(f"--dask needs Dask's distributed package: {INSTALL}") from None
    return distributed


def parse_address(address: str) -> tuple[str, int]:
    """``"local:4"`` -> ``("local", 4)``; a scheduler address -> ``(address, 0)``."""
    if address.startswith("local:") or address == "local":
        text = address.partition(":")[2] or str(os.cpu_count() or 1)
        try:
            workers = int(text)
        except ValueError:
            workers = 0
        if workers < 1:
            raise DvectorError(f"--dask {address}: local:K takes a number of worker processes K >= 1")
        return "local", workers
    if not address:
        raise DvectorError("--dask takes a scheduler address (tcp://host:8786) or local:K")
    return address, 0


@contextmanager
def dask_client(address: str) -> Iterator[Any]:
    """A ``distributed.Client`` for ``address`` (see :func:`parse_address`), closed afterwards (with its
    ``LocalCluster``, if it started one)."""
    where, workers = parse_address(address)
    distributed = import_distributed()
    if where == "local":
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=":0", silence_logs=logging.ERROR)
        client = distributed.Client(cluster)
    else:
        cluster = None
        try:
            client = distributed.Client(address, timeout="30s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise DvectorError(f"--dask {address}: cannot reach the scheduler ({exc})") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def dask_executor(client: Any) -> Executor:
    """A ``concurrent.futures`` executor on ``client``: each job retried ``RETRIES`` times if it raises."""
    return client.get_executor(retries=RETRIES, pure=False)


def is_killed_worker(exc: BaseException) -> bool:
    """True for Dask's ``KilledWorker``: a job whose workers died too often (not a bug in the job)."""
    return type(exc).__name__ == "KilledWorker"


@contextmanager
def executor(workers: int, dask: str | None, initializer: Callable[..., None] | None = None,
             initargs: tuple = ()) -> Iterator[tuple[Executor | None, Any]]:
    """``(executor, client)`` for jobs: Dask's with ``dask`` (client set), else a pool of ``workers``
    local processes (``workers`` <= 1: none, run in this process; 0: every core), client None.

    ``initializer`` prepares a local pool's processes; Dask jobs must prepare their process themselves.
    Local pools start their processes with ``spawn``: a forked child of a process that ran torch may hang.
    """
    if dask:
        with dask_client(dask) as client:
            yield dask_executor(client), client
        return
    workers = workers or os.cpu_count() or 1
    if workers <= 1:
        yield None, None
        return
    import multiprocessing

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=initargs)
    try:
        yield pool, None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
