"""Reads that stall: a server that accepts and never answers, one that stops mid-shard, a ``pipe:``
command that never writes or never exits. Every read has a deadline (``DVECTOR_STALL_TIMEOUT``,
set small here); a stalled shard is skipped and counted, a source that keeps stalling stops the
stream with a DvectorError naming it, and a stalled command is killed with everything it started.

Servers bind 127.0.0.1 and stop with the test. The stalls here never end by themselves, so the
outcome does not depend on the machine's speed; reads that must succeed get a generous timeout.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from dvector.errors import DvectorError
from dvector.shards.format import shard_name, write_shard
from dvector.shards.index import read_index
from dvector.shards.locate import resolve_shards
from dvector.shards.reader import ShardFormatError, iter_shard
from dvector.shards.streams import STALL_ENV, StallError, read_url, stall_timeout
from dvector.stream.loader import ge2e_loader
from dvector.stream.samples import SampleStream
from dvector.stream.sources import Consumer, StreamPosition

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX process groups")
N_MELS = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stall-shards")
    rng = np.random.default_rng(0)
    for k in range(2):
        samples = [(f"s{k}_{i:03d}", rng.standard_normal((30, N_MELS)).astype(np.float16),
                    {"speaker_index": i % 4}) for i in range(40)]
        write_shard(folder / shard_name(k), samples)
    return folder


@contextlib.contextmanager
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections (the kernel's backlog does) and never
    answers; closed when the test ends. Yields its base URL."""
    if shutil.which("curl") is None:
        pytest.skip("http(s) is read through curl")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def drain(stream: SampleStream, url: str) -> list[str]:
    return [s["__key__"] for _, s in stream.shard_samples(url, 0, 1, 0)]


def test_the_stall_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STALL_ENV, raising=False)
    assert stall_timeout() == 60.0
    monkeypatch.setenv(STALL_ENV, "2.5")
    assert stall_timeout() == 2.5
    for bad in ("0", "-1", "soon", "nan", "inf"):
        monkeypatch.setenv(STALL_ENV, bad)
        with pytest.raises(DvectorError, match=STALL_ENV):
            stall_timeout()


def test_an_index_on_a_server_that_never_answers_is_a_clear_error_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STALL_ENV, "1")
    with silent_server() as base:
        with pytest.raises(DvectorError, match=rf"cannot read {base}/index.json: no data for 1 s .*stalled"):
            read_index(f"{base}/")
        # a folder URL, and shards given by pattern (their index is looked for beside them)
        for source in (f"{base}/", f"{base}/shard-{{000000..000003}}.tar"):
            with pytest.raises(DvectorError, match="index.json.*stalled"):
                resolve_shards(source)
        with pytest.raises(DvectorError, match="stalled"):
            ge2e_loader(f"{base}/shard-{{000000..000003}}.tar", 2, 2, 10, workers=0)


def test_a_shard_on_a_server_that_never_answers_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STALL_ENV, "1")
    with silent_server() as base:
        url = f"{base}/{shard_name(0)}"
        with pytest.raises(ShardFormatError, match=rf"shard {url}: no data for 1 s .*stalled"):
            list(iter_shard(url))
        stream = SampleStream([url], Consumer(), 0)
        with pytest.warns(RuntimeWarning, match=rf"skipping the rest of shard {url}: StallError"):
            assert drain(stream, url) == []
        assert stream.bad_shards == 1


def test_shards_that_all_stall_stop_the_stream_instead_of_looping(monkeypatch: pytest.MonkeyPatch,
                                                                  shards: Path) -> None:
    monkeypatch.setenv(STALL_ENV, "1")
    with silent_server() as base:
        urls = [f"{base}/{shard_name(k)}" for k in range(4)]
        stream = SampleStream(urls, Consumer(), 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(DvectorError, match=r"2 reads in a row stalled.*not answering"):
                next(stream.samples(StreamPosition()))
        assert stream.bad_shards == 1  # the first stalled shard was skipped; the second stopped it
    # pipe: commands through the loader (no index to fetch first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DvectorError, match=r"sleep 100.*not answering"):
            next(iter(ge2e_loader(["pipe:sleep 100", "pipe:sleep 101"], 2, 2, 10, workers=0)))


def test_a_good_shard_between_stalls_keeps_the_stream_going(monkeypatch: pytest.MonkeyPatch, shards: Path) -> None:
    monkeypatch.setenv(STALL_ENV, "3")  # generous: the good shard must never stall
    good = str(shards / shard_name(0))
    stream = SampleStream(["pipe:sleep 100", good, "pipe:sleep 101"], Consumer(), 0)
    with pytest.warns(RuntimeWarning, match="sleep 100"):
        assert drain(stream, "pipe:sleep 100") == []
    assert len(drain(stream, good)) == 40
    with pytest.warns(RuntimeWarning, match="sleep 101"):
        assert drain(stream, "pipe:sleep 101") == []  # one stall since the last sample: skipped, not fatal
    assert (stream.bad_shards, stream.bad_samples) == (2, 0)


class StallOnceHandler(http.server.SimpleHTTPRequestHandler):
    """Sends half of shard 1 on its first request, then holds the connection without a byte more
    until the test ends; every later request is served whole."""

    stalled: set[str] = set()
    release = threading.Event()

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass

    def do_GET(self) -> None:
        if self.path.endswith(shard_name(1)) and self.path not in StallOnceHandler.stalled:
            StallOnceHandler.stalled.add(self.path)
            data = Path(self.directory, shard_name(1)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            StallOnceHandler.release.wait(120)  # bounded, released at the end of the test
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve(folder: Path, handler: type):
    if shutil.which("curl") is None:
        pytest.skip("http(s) is read through curl")
    handler.release.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_download_that_stalls_midway_is_opened_again_where_it_stopped(monkeypatch: pytest.MonkeyPatch,
                                                                      shards: Path) -> None:
    monkeypatch.setenv(STALL_ENV, "3")
    local = drain(SampleStream([], Consumer(), 0), str(shards / shard_name(1)))
    with serve(shards, StallOnceHandler) as base:
        stream = SampleStream([], Consumer(), 0)
        with pytest.warns(RuntimeWarning, match=r"shard-000001.tar: StallError: .*opening it again at sample \d+"):
            keys = drain(stream, f"{base}/{shard_name(1)}")
    assert keys == local and stream.bad_shards == 0


class StallAfterHalfHandler(StallOnceHandler):
    """Every request of shard 1 stalls after half of it."""

    def do_GET(self) -> None:
        StallOnceHandler.stalled.clear()
        super().do_GET()


def test_a_server_that_dies_midway_stops_the_stream_after_two_stalls(monkeypatch: pytest.MonkeyPatch,
                                                                   shards: Path) -> None:
    monkeypatch.setenv(STALL_ENV, "2")
    with serve(shards, StallAfterHalfHandler) as base:
        url = f"{base}/{shard_name(1)}"
        stream = SampleStream([url], Consumer(), 0)
        got = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(DvectorError, match=rf"shard {url}: .*2 reads in a row stalled"):
                for _, sample in stream.shard_samples(url, 0, 1, 0):
                    got.append(sample["__key__"])
    assert 0 < len(got) < 40, "what came before the stall counts"


def group_alive(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that still run (zombies excluded)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


def own_zombies() -> list[int]:
    """This process's children that exited and were never reaped."""
    zombies = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                zombies.append(int(entry.name))
    return zombies


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("command", ["sleep 100", "cat /dev/zero | head -c 0; sleep 100", "sleep 100 | cat"])
def test_a_stalled_command_is_killed_with_all_it_started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         command: str) -> None:
    monkeypatch.setenv(STALL_ENV, "1")
    pidfile = tmp_path / "pid"
    url = f"pipe:echo $$ > {pidfile}; {command}"
    with pytest.raises(ShardFormatError, match=r"shard pipe:echo .*no data for 1 s from command .*stalled"):
        list(iter_shard(url))
    pgid = int(pidfile.read_text())
    deadline = time.monotonic() + 30  # SIGKILL is delivered at once; dying takes a moment under load
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_alive(pgid) == [], "the command's processes still run"
    assert pgid not in own_zombies(), "the command was not reaped"


def test_a_command_that_closes_its_output_but_never_exits_is_stopped(monkeypatch: pytest.MonkeyPatch,
                                                                     shards: Path) -> None:
    monkeypatch.setenv(STALL_ENV, "1")
    url = f"pipe:cat {shards / shard_name(0)}; exec >&-; sleep 100"
    with pytest.raises(ShardFormatError, match="closed its output but did not exit within 1 s"):
        list(iter_shard(url))
    with pytest.raises(StallError):
        read_url("pipe:exec >&-; sleep 100", 1 << 20)
    assert read_url(f"pipe:cat {shards / shard_name(0)}", 1 << 30) == (shards / shard_name(0)).read_bytes()


def test_train_with_a_server_that_never_answers_ends_with_one_error_line(tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    """The issue's case through the command line: `dvector train URL/` against a server that accepts
    and never answers ends with one `error:` line naming the index, bounded by --stall-timeout."""
    from dvector.cli import main

    monkeypatch.delenv(STALL_ENV, raising=False)
    with silent_server() as base:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", f"{base}/shards/", str(tmp_path / "run"), "-n", "2", "-m", "2", "--model", "tiny",
                  "-w", "0", "--stall-timeout", "1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "index.json" in err and "stalled" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_stall_timeout_option_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from dvector.shards.streams import set_stall_timeout

    monkeypatch.delenv(STALL_ENV, raising=False)
    set_stall_timeout(None)
    assert stall_timeout() == 60.0
    set_stall_timeout(2.5)
    assert stall_timeout() == 2.5
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(DvectorError, match="stall timeout"):
            set_stall_timeout(bad)
