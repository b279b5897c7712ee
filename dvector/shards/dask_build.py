"""A build's shard jobs on a Dask cluster (``build-shards --dask``): one task per shard of the plan.

Each task is :func:`dvector.shards.shard_job.build_one_shard`: it processes its shard's utterances
and writes the tar and its ``.build/`` record on the worker, through the same
:class:`~dvector.shards.shard_job.ShardContent` as a local build, so the bytes are the same by
construction. A task that raises is retried; a task whose worker dies (killed, out of memory,
preempted) is rescheduled on another worker by the scheduler, and its rerun writes the same bytes:
a shard's tar appears under its final name only when complete.
The output folder must be shared storage, seen at the same path by this process and every worker:
checked at the start with a probe file each way under ``DIR/.build``. Called by
:func:`dvector.shards.build.build_shards` (which chooses local or Dask); this module imports only
the modules below both (``shard_job``, ``build_report``, ``build_folder``, ``cluster``), never ``build``.
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any, Sequence

from dvector.config import VERSION, BuildConfig
from dvector.corpus import ScanResult
from dvector.errors import DvectorError
from dvector.shards.build_folder import remove_stale_temps, state_dir
from dvector.shards.build_report import BuildReport, Progress, ShardTally
from dvector.shards.cluster import RETRIES, dask_executor, is_killed_worker
from dvector.shards.format import shard_name
from dvector.shards.plan import Plan
from dvector.shards.shard_job import build_one_shard

WAIT_FOR_WORKERS_S = 120  # a cluster that has no worker yet (adaptive, starting) gets this long


def write_shards_dask(client: Any, out: Path, plan: Plan, scan: ScanResult, todo: Sequence[int], cfg: BuildConfig,
                      fail_fast: bool, progress: Progress, report: BuildReport) -> None:
    """Write the ``todo`` shards of ``plan`` as tasks on Dask's ``client`` (see
    :func:`dvector.shards.cluster.dask_client`), counting them in ``report`` as they finish."""
    out = out.resolve()
    try:
        client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
    except TimeoutError:
        raise DvectorError(f"--dask {client.scheduler.address}: no worker joined within {WAIT_FOR_WORKERS_S} s") from None
    check_shared(client, out, list(scan.root_names))
    jobs = dask_executor(client)
    futures = {jobs.submit(build_one_shard, out, k, plan.shards[k], scan.root_names, cfg, fail_fast): k for k in todo}
    try:
        for future in as_completed(futures):
            number = futures[future]
            result = _result(future, number, report)
            result.absorb(report)
            progress.advance(len(plan.shards[number]), result.audio_s)
    finally:
        for future in futures:
            future.cancel()
    remove_stale_temps(out, todo)  # temporary files of tasks whose worker died (every task has finished)


def _result(future: Any, number: int, report: BuildReport) -> ShardTally:
    """A finished shard task's counts; a failed one as one line (the shards finished are kept)."""
    name = shard_name(number)
    kept = f"the {report.shards_written} shard(s) finished in this run are kept: rerun the same command to resume"
    try:
        result = future.result()
    except Exception as exc:
        if is_killed_worker(exc):
            raise DvectorError(f"{name}: the workers running it died too often (killed, perhaps for lack of memory; "
                               f"Dask's distributed.scheduler.allowed-failures); {kept}") from None
        raise DvectorError(f"{name}: failed on a Dask worker after {RETRIES} retries ({type(exc).__name__}: "
                           f"{exc}); {kept}") from None
    if isinstance(result, str):  # --fail-fast: the first unusable file, nothing written for this shard
        raise DvectorError(result)
    return result


def _probe(folder: str, token: str, roots: list[str]) -> dict[str, Any]:
    """Run on each worker: does it see this process's probe file, can it write its own, and does it
    see the input roots?"""
    here = Path(folder)
    try:
        seen = (here / f".probe-{token}").read_text() == token
    except OSError:
        seen = False
    wrote, error = "", ""
    if seen:
        name = f".probe-{token}-{uuid.uuid4().hex}"
        try:
            (here / name).write_text(token)
            wrote = name
        except OSError as exc:
            error = exc.strerror or str(exc)
    return {"seen": seen, "wrote": wrote, "error": error, "version": VERSION,
            "missing_roots": [r for r in roots if not os.path.isdir(r)]}


def check_shared(client: Any, out: Path, roots: list[str]) -> None:
    """One clear error unless every worker sees ``out`` (both ways: each reads this process's probe
    file and writes one this process reads), sees the input ``roots``, and runs this dvector version."""
    here = state_dir(out)
    token = uuid.uuid4().hex
    mine = here / f".probe-{token}"
    mine.write_text(token)
    written: list[Path] = [mine]
    shared = "the output folder must be shared storage, mounted at the same path on every worker"
    try:
        try:
            answers = client.run(_probe, str(here), token, [os.path.abspath(r) for r in roots])
        except Exception as exc:
            raise DvectorError(f"--dask: a worker could not run dvector ({type(exc).__name__}: {exc}); install "
                               f"dvector {VERSION} on every worker") from None
        for worker, answer in sorted(answers.items()):
            if answer["wrote"]:
                written.append(here / answer["wrote"])
            if answer["version"] != VERSION:
                raise DvectorError(f"--dask: worker {worker} runs dvector {answer['version']}, this is {VERSION}: "
                                   "install the same version everywhere (the shards must be identical)")
            if not answer["seen"]:
                raise DvectorError(f"--dask: worker {worker} cannot see {out}: {shared}")
            if not answer["wrote"]:
                raise DvectorError(f"--dask: worker {worker} cannot write {here} ({answer['error']}): {shared}")
            if not (here / answer["wrote"]).exists():
                raise DvectorError(f"--dask: a file worker {worker} wrote in {out} is not visible here: {shared}")
            if answer["missing_roots"]:
                raise DvectorError(f"--dask: worker {worker} cannot see the input folder {answer['missing_roots'][0]}: "
                                   "the inputs must be shared too, at the same path")
    finally:
        for path in written:
            path.unlink(missing_ok=True)
