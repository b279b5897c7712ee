"""Remote shards and indexes that fail fast or hold the wrong bytes (reliability items 17, 18, 26):
a server error is reported as what the server answered, after bounded retries (not as a stall after
the whole timeout); a remote index.json that exists but is garbage, cut short or endless is an error,
as a damaged local one is, while one that is not there (404) is not; a shard path that does not exist
is one line naming it before anything starts.

Servers bind 127.0.0.1 and stop with the test; every answer comes at once, so nothing here depends on
the machine's speed (the stall timeout is generous: it must never be reached).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dvector.errors import DvectorError
from dvector.shards import index as index_module
from dvector.shards.format import INDEX_NAME, shard_name
from dvector.shards.index import read_index
from dvector.shards.locate import resolve_shards
from dvector.shards.reader import ShardFormatError, iter_shard
from dvector.shards.streams import STALL_ENV, curl_args
from dvector.stream.samples import SampleStream
from dvector.stream.sources import Consumer
from stream_helpers import QuietHandler, make_shards, serve

PATTERN = "shard-{000000..000001}.tar"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("remote") / "shards", n_speakers=4, per_speaker=4, n_shards=2,
                       block=2, frames=(20, 30))


@pytest.fixture(autouse=True)
def generous_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STALL_ENV, "30")  # never reached: every answer here comes at once


def answering(status: int, paths: tuple[str, ...]) -> type:
    """A handler that answers ``status`` (with a small body) for the paths ending in one of ``paths``."""

    class Handler(QuietHandler):
        requests: list[str] = []

        def do_GET(self) -> None:
            if not self.path.endswith(paths):
                return super().do_GET()
            Handler.requests.append(self.path)
            body = b"something went wrong\n"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    return Handler


def serving_index(body: bytes | None, length: int | None = None) -> type:
    """A handler whose index.json is ``body`` (with Content-Length ``length``), or endless zeros-and-spaces
    when ``body`` is None; the shards are served as they are."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            if not self.path.endswith(INDEX_NAME):
                return super().do_GET()
            self.send_response(200)
            if body is not None:
                self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if body is not None:
                self.wfile.write(body)
                return
            self.close_connection = True
            chunk = b"[" + b" " * 65535
            try:
                while True:  # until the reader gives up and closes the connection
                    self.wfile.write(chunk)
            except OSError:
                pass
    return Handler


# ---- item 17: an HTTP error is what the server answered ------------------------------------------

def test_curl_retries_fit_within_the_stall_timeout() -> None:
    def retries(stall: float) -> int:
        args = curl_args(stall)
        return int(args[args.index("--retry") + 1])

    assert retries(60) == 2 and retries(6) == 2 and retries(3) == 1 and retries(1) == 0
    assert "-f" in curl_args(60) and "-sS" in curl_args(60)


@pytest.mark.parametrize("status, said", [(500, "HTTP 500 Internal Server Error (3 tries)"),
                                          (503, "HTTP 503 Service Unavailable (3 tries)"),
                                          (404, "HTTP 404 Not Found")])
def test_an_http_error_for_a_shard_says_what_the_server_answered(folder: Path, status: int, said: str) -> None:
    handler = answering(status, (shard_name(1),))
    with serve(folder, handler) as base:
        url = f"{base}/{shard_name(1)}"
        with pytest.raises(ShardFormatError, match=re.escape(f"shard {url}: the server answered {said}")) as info:
            list(iter_shard(url))
        assert "stall" not in str(info.value)
        assert len(handler.requests) == (3 if status >= 500 else 1), "bounded retries, of transient errors only"
        stream = SampleStream([url], Consumer(), 0)
        with pytest.warns(RuntimeWarning, match=re.escape(f"skipping the rest of shard {url}: StreamError: "
                                                         f"the server answered {said}")):
            assert list(stream.shard_samples(url, 0, 1, 0)) == []
        assert (stream.bad_shards, stream.stalls) == (1, 0)
        good = f"{base}/{shard_name(0)}"
        assert len(list(iter_shard(good))) > 0, "the other shard is served"


def test_an_http_error_for_the_index_is_an_error_naming_it(folder: Path) -> None:
    with serve(folder, answering(500, (INDEX_NAME,))) as base:
        for source in (f"{base}/", f"{base}/{PATTERN}"):
            with pytest.raises(DvectorError, match=rf"cannot read {base}/index.json: the server answered HTTP 500"):
                resolve_shards(source)


# ---- item 18: a remote index that exists is read as strictly as a local one ----------------------

@pytest.mark.parametrize("case", ["garbage", "truncated", "cut short", "not an index", "nested", "endless"])
def test_a_damaged_remote_index_is_an_error_not_no_index(folder: Path, case: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    whole = (folder / INDEX_NAME).read_bytes()
    body, length, said = {
        "garbage": (b"\x00\xffnot json at all", None, "cannot read"),
        "truncated": (whole[: len(whole) // 2], None, "cannot read"),  # what the server sends, whole
        "cut short": (whole[: len(whole) // 2], len(whole), "cannot read"),  # the connection ends early
        "not an index": (json.dumps({"hello": 1}).encode(), None, "is not a dvector shard index"),
        "nested": (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
        "endless": (None, None, "larger than 1048576 bytes"),
    }[case]
    monkeypatch.setattr(index_module, "MAX_INDEX_BYTES", 1 << 20)
    with serve(folder, serving_index(body, length)) as base:
        with pytest.raises(DvectorError, match=said) as info:
            resolve_shards(f"{base}/{PATTERN}")
        assert "index.json" in str(info.value)
        with pytest.raises(DvectorError, match=said):
            resolve_shards(f"{base}/")


def test_a_missing_remote_index_is_no_index(folder: Path) -> None:
    with serve(folder, answering(404, (INDEX_NAME,))) as base:
        source = resolve_shards(f"{base}/{PATTERN}")
    assert source.index is None and len(source.urls) == 2


@pytest.mark.parametrize("case", ["garbage", "nested", "huge"])
def test_a_damaged_local_index_is_the_same_error(folder: Path, tmp_path: Path, case: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "shards"
    local.mkdir()
    for name in (shard_name(0), shard_name(1)):
        (local / name).write_bytes((folder / name).read_bytes())
    monkeypatch.setattr(index_module, "MAX_INDEX_BYTES", 1 << 18)
    (local / INDEX_NAME).write_bytes({"garbage": b"{not json", "nested": b"[" * 100_000 + b"]" * 100_000,
                                      "huge": b" " * (1 << 19)}[case])
    said = {"garbage": "cannot read", "nested": "nested too deeply", "huge": "larger than 262144 bytes"}[case]
    with pytest.raises(DvectorError, match=said):
        read_index(local)
    with pytest.raises(DvectorError, match=said):
        resolve_shards(str(local / PATTERN))


# ---- item 26: a shard path that is not there --------------------------------------------------------

def test_a_missing_shard_folder_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "dir"
    for source in (str(missing), f"{missing}/", [str(missing)]):
        with pytest.raises(DvectorError, match=rf"no such shard folder or file: {missing} "
                                               rf"\(there is no folder {tmp_path / 'missing'}\)"):
            resolve_shards(source)
    with pytest.raises(DvectorError, match=rf"none of the 3 shard files given is there \(the first: "
                                           rf"{tmp_path / 'shard-000000.tar'}\)$"):
        resolve_shards(str(tmp_path / "shard-{000000..000002}.tar"))


def test_train_on_a_missing_folder_names_it_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dvector.cli import main

    missing = tmp_path / "missing" / "dir"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(missing), str(tmp_path / "run"), "-n", "2", "-m", "2", "--model", "tiny", "-w", "0"])
    assert exit_info.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("error:") == 1 and f"no such shard folder or file: {missing}" in err, err
    assert "Consumer" not in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
