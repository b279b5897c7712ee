"""build-shards on a Dask cluster (``--dask``): the same bytes as a local build, a shard whose worker
dies midway redone, resume and parts across local and Dask runs, the shared-storage check, and one
clear line without the extra. One small LocalCluster (2 processes, 1 thread each) serves the module."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from build_helpers import SMALL_ARGS, SMALL_CFG, load_index, snapshot
from dvector.errors import DvectorError
from dvector.shards.build import build_shards, parse_part
from dvector.shards.cluster import parse_address

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster() -> str:
    """A LocalCluster's scheduler address: builds connect to it as to a remote cluster."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as local:
        yield local.scheduler_address


def test_dask_build_equals_local_build(messy_build: SimpleNamespace, cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "dask"
    report = build_shards(messy_build.corpus.roots, out, messy_build.cfg, dask=cluster)
    assert snapshot(out) == snapshot(messy_build.out)  # every shard and the index, byte for byte
    assert load_index(out)["totals"]["failures"] > 0  # the bad files are reported as in a local build
    local = messy_build.report
    assert (report.shards_written, report.utterances_ok, report.samples_ok, report.frames) == (
        local.shards_written, local.utterances_ok, local.samples_ok, local.frames)
    assert report.failures == local.failures and report.index_written
    assert [p.name for p in (out / ".build").iterdir() if p.name.startswith(".")] == []  # no probe or temp left


class KillFirstAttempt(distributed.WorkerPlugin):
    """Makes the worker process that first writes ``shard`` exit after one sample of it: the tar is
    half-written under its temporary name when the process dies. ``marker`` records that it happened
    (created exclusively, so exactly one attempt dies, whichever worker runs it)."""

    def __init__(self, shard: str, marker: str) -> None:
        self.shard, self.marker = shard, marker

    def setup(self, worker) -> None:  # noqa: ANN001
        import dvector.shards.shard_job as shard_job  # where a shard's tar is written, on any worker

        write = shard_job.write_shard
        shard, marker = self.shard, self.marker

        def dying_write(path, samples):  # noqa: ANN001, ANN202
            if path.name != shard:
                return write(path, samples)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return write(path, samples)

            def then_die():  # noqa: ANN202
                for number, sample in enumerate(samples):
                    if number == 1:
                        os._exit(1)
                    yield sample

            return write(path, then_die())

        shard_job.write_shard = dying_write


def test_shard_whose_worker_died_is_redone(synth_build: SimpleNamespace, tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.CRITICAL) as local, distributed.Client(local) as client:
        client.register_plugin(KillFirstAttempt("shard-000001.tar", str(marker)))
        out = tmp_path / "dask"
        report = build_shards(synth_build.corpus.roots, out, SMALL_CFG, dask=local.scheduler_address)
    assert marker.exists()  # a worker did die inside the shard
    assert snapshot(out) == snapshot(synth_build.out)
    assert report.shards_written == synth_build.report.shards_written
    leftovers = [p for p in [*out.iterdir(), *(out / ".build").iterdir()] if ".tmp-" in p.name or ".probe" in p.name]
    assert leftovers == []  # the dead attempt's temporary tar was cleared


def test_parts_and_resume_across_local_and_dask(synth_build: SimpleNamespace, cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    first = build_shards(synth_build.corpus.roots, out, SMALL_CFG, part=parse_part("1/2"), dask=cluster)
    assert first.shards_written == 2 and not first.index_written
    second = build_shards(synth_build.corpus.roots, out, SMALL_CFG, part=parse_part("2/2"), workers=1)
    assert second.shards_written == 2 and second.index_written
    assert snapshot(out) == snapshot(synth_build.out)
    (out / "index.json").unlink()
    (out / "shard-000002.tar").unlink()
    again = build_shards(synth_build.corpus.roots, out, SMALL_CFG, dask=cluster)
    assert (again.shards_written, again.shards_skipped) == (1, 3)
    assert snapshot(out) == snapshot(synth_build.out)


def test_cli_build_with_dask(synth_build: SimpleNamespace, cluster: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    from dvector.cli import main

    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as info:
        main(["build-shards", "-o", str(out), "--dask", cluster, *SMALL_ARGS, *synth_build.corpus.roots])
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())
    assert (info.value.code or 0) == 0, text
    assert "4 written, 0 already complete" in text and "index written" in text
    assert snapshot(out) == snapshot(synth_build.out)


def test_output_folder_not_shared_is_one_clear_error(synth_build: SimpleNamespace, tmp_path: Path) -> None:
    """A worker that sees another folder at the output's path (not shared storage) stops the build."""
    from dvector.shards.dask_build import _probe, check_shared

    out = tmp_path / "out"
    (out / ".build").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere" / ".build"
    elsewhere.mkdir(parents=True)
    client = SimpleNamespace(run=lambda fn, folder, token, roots: {"tcp://10.0.0.7:4321": _probe(
        str(elsewhere), token, roots)})
    with pytest.raises(DvectorError, match=r"worker tcp://10\.0\.0\.7:4321 cannot see .*out.*shared storage"):
        check_shared(client, out, synth_build.corpus.roots)
    assert list((out / ".build").iterdir()) == []  # the probe file is removed
    client = SimpleNamespace(run=lambda fn, folder, token, roots: {"tcp://w:1": _probe(
        folder, token, [str(tmp_path / "not-there")])})
    with pytest.raises(DvectorError, match="cannot see the input folder .*not-there"):
        check_shared(client, out, [])


def test_without_the_extra_one_line_names_it(synth_build: SimpleNamespace, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(DvectorError, match=r"pip install 'dvector\[dask\]'"):
        build_shards(synth_build.corpus.roots, tmp_path / "x", SMALL_CFG, dask="local:2")
    assert not (tmp_path / "x").exists()  # refused before anything was scanned or written


@pytest.mark.parametrize("text,expected", [("local:3", ("local", 3)), ("tcp://head:8786", ("tcp://head:8786", 0))])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["local:0", "local:x", ""])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(DvectorError, match="--dask"):
        parse_address(text)



def test_fail_fast_on_dask_stops_with_the_file(messy_build: SimpleNamespace, cluster: str, tmp_path: Path) -> None:
    with pytest.raises(DvectorError, match=r"stopped by --fail-fast"):
        build_shards(messy_build.corpus.roots, tmp_path / "x", messy_build.cfg, fail_fast=True, dask=cluster)
