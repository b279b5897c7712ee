"""The bytes of a shard URL (or of an index.json URL), with a deadline on every read.

A local path or ``file://`` URL is a plain file. ``http(s)://`` URLs are read by curl and
``pipe:`` URLs by the shell, as webdataset's ``gopen`` reads them (the same curl options,
``GOPEN_REWRITE``, ``WDS_SECURE`` refusing ``pipe:``), with two differences: each command runs in
a process group of its own, and every read waits at most the stall timeout for its next bytes. A
server that accepts and never answers, or a command that never writes, raises :class:`StallError`
after that time instead of hanging, and the whole command (the shell and everything it started) is
killed and reaped: no zombie, no orphan left running. Other schemes go through ``gopen`` and get
the same deadline on its command's output.

The stall timeout is ``DVECTOR_STALL_TIMEOUT`` seconds (environment; it reaches DataLoader workers
and every reader alike), by default :data:`STALL_TIMEOUT_S`. It bounds the wait for *any* bytes,
not a download's length: a slow but moving transfer never stalls.

curl retries a transient failure (HTTP 408, 429, 500, 502, 503, 504, a timeout) a few times, one
second apart, only as many times as fit well within the stall timeout (:func:`curl_args`): a
server that answers 500 is reported as such (``HTTP 500 Internal Server Error``, from curl's own
error line), seconds later, not as a stall after the whole timeout. The status is kept on the
:class:`StreamError` (``http_status``), so that a caller can tell "not there" (4xx) from "broken".
"""

from __future__ import annotations

import http
import math
import os
import re
import select
import signal
import subprocess
from typing import Protocol, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset import utils as wds_utils
from webdataset.gopen import Pipe, gopen, rewrite_url

from dvector.errors import DvectorError

STALL_TIMEOUT_S = 60.0  # default: seconds without a byte before a read gives up
STALL_ENV = "DVECTOR_STALL_TIMEOUT"
CURL_ARGS = ("--connect-timeout", "30", "-f", "-sS", "-L")  # gopen's, with errors on stderr (-S); retries: curl_args
CURL_RETRIES = 2  # at most, for a transient failure (HTTP 5xx...), CURL_RETRY_DELAY_S apart
CURL_RETRY_DELAY_S = 1
_HTTP_ERROR = re.compile(rb"returned error: (\d{3})")  # curl -f's line: "The requested URL returned error: 500"
_CHUNK = 1 << 16
_CURL_EXITS = {
    6: "could not resolve the host", 7: "could not connect", 18: "the transfer ended early",
    22: "the server answered with an HTTP error (404 not found, 403, 500...)", 28: "curl's own timeout",
    35: "the TLS handshake failed", 52: "the server sent nothing", 56: "the connection broke",
}


class StreamError(OSError):
    """A URL's command failed (curl's or the ``pipe:`` command's exit status). ``http_status``: the
    HTTP status the server answered, where curl said (404, 500...); None otherwise."""

    http_status: int | None = None


class StallError(StreamError):
    """No bytes came within the stall timeout: the server or command is not answering."""


class ByteSource(Protocol):
    """What :func:`open_url` returns."""

    def read(self, n: int = -1) -> bytes: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


def stall_timeout() -> float:
    """Seconds a read waits for bytes: ``DVECTOR_STALL_TIMEOUT`` or :data:`STALL_TIMEOUT_S`."""
    text = os.environ.get(STALL_ENV, "").strip()
    if not text:
        return STALL_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise DvectorError(f"{STALL_ENV}={text!r}: give the stall timeout in seconds, a number above 0")
    return value


def set_stall_timeout(seconds: float | None) -> None:
    """Make every read of this process and the processes it starts (loader workers) wait at most
    ``seconds`` for bytes; None leaves the environment's setting (or the default)."""
    if seconds is None:
        return
    if not (seconds > 0 and math.isfinite(seconds)):
        raise DvectorError(f"the stall timeout must be a number of seconds above 0, got {seconds}")
    os.environ[STALL_ENV] = repr(float(seconds))


class FileSource:
    """A file object as a :class:`ByteSource`, without a deadline: a local file (local reads do not
    wait on a peer), or whatever else ``gopen`` gives."""

    def __init__(self, f) -> None:  # noqa: ANN001
        self.f = f

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def seekable_file(self):  # noqa: ANN201 - a binary file object, or None
        """The file itself where it can seek (a local file): tar members then read by offset."""
        try:
            return self.f if self.f.seekable() else None
        except (AttributeError, OSError, ValueError):
            return None

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.f.close()


class CommandOutput:
    """A command's standard output; each read waits at most ``stall`` seconds for bytes.

    ``own_group``: the command leads a process group of its own (started here), so that a stall
    kills everything it started. After the end of the output, :meth:`finish` waits (again at most
    ``stall``) for the exit status and raises :class:`StreamError` for a failure.
    """

    def __init__(self, proc: subprocess.Popen, what: str, stall: float, ok: Sequence[int] = (0,),
                 own_group: bool = True, curl: bool = False, tries: int = 1) -> None:
        assert proc.stdout is not None
        self.proc, self.what, self.stall, self.ok = proc, what, stall, tuple(ok)
        self.own_group, self.curl, self.tries = own_group, curl, tries
        self.fd = proc.stdout.fileno()
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    @classmethod
    def start(cls, args: str | list[str], what: str, stall: float, ok: Sequence[int] = (0,),
              curl: bool = False, tries: int = 1) -> "CommandOutput":
        """Start ``args``; curl's stderr (its one error line, with ``-sS``) is kept to say what failed."""
        proc = subprocess.Popen(args, shell=isinstance(args, str), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE if curl else None,
                                start_new_session=True)
        return cls(proc, what, stall, ok, own_group=True, curl=curl, tries=tries)

    def read(self, n: int = -1) -> bytes:
        if self.proc.stdout is None or self.proc.stdout.closed:
            return b""
        if not self.poller.poll(self.stall * 1000):
            self.close()
            raise StallError(f"no data for {self.stall:g} s from {self.what}: it stalled (the limit is "
                             f"train's --stall-timeout or {STALL_ENV}, in seconds)")
        return os.read(self.fd, n if n > 0 else _CHUNK)

    def finish(self) -> None:
        """After the end of the output: the exit status, :class:`StreamError` if it failed."""
        try:
            status = self.proc.wait(self.stall)
        except subprocess.TimeoutExpired:
            self.close()
            raise StallError(f"{self.what} closed its output but did not exit within {self.stall:g} s") from None
        errors = self._curl_errors()
        self.close()
        if status not in self.ok:
            code = _http_status(errors)
            if code is not None:
                error = StreamError(f"the server answered HTTP {code} {_phrase(code)}"
                                    + (f" ({self.tries} tries)" if self.tries > 1 and code >= 500 else ""))
                error.http_status = code
                raise error
            raise StreamError(f"{self.what} failed: {self.describe(status)}")

    def _curl_errors(self) -> bytes:
        """What curl wrote on stderr (it has exited: a line or two), or nothing for another command."""
        if not self.curl or self.proc.stderr is None or self.proc.stderr.closed:
            return b""
        try:
            return self.proc.stderr.read(1 << 16)
        except (OSError, ValueError):
            return b""

    def describe(self, status: int) -> str:
        if status < 0:
            return f"killed by signal {-status}"
        meaning = _CURL_EXITS.get(status) if self.curl else None
        return f"exit status {status}" + (f" ({meaning})" if meaning else "")

    def close(self) -> None:
        """Stop the command (its whole group) unless it has exited, reap it, close the pipe."""
        if self.proc.returncode is None and self.proc.poll() is None:
            try:
                if self.own_group:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the leader is not reaped yet: its group is ours
                else:
                    self.proc.kill()
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.returncode is None:
            self.proc.wait()  # reaped: no zombie
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


def _http_status(errors: bytes) -> int | None:
    """The HTTP status in curl's error line (``curl: (22) The requested URL returned error: 500``)."""
    found = _HTTP_ERROR.findall(errors)
    return int(found[-1]) if found else None


def _phrase(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return ""


def curl_args(stall: float) -> tuple[str, ...]:
    """curl's options for a read with stall timeout ``stall``: gopen's, with as many retries of a
    transient failure (up to :data:`CURL_RETRIES`, a second apart) as fit in a third of ``stall``.
    Retries send no bytes: more of them than the stall timeout allows would read as a stall."""
    retries = max(0, min(CURL_RETRIES, int(stall / 3 / CURL_RETRY_DELAY_S)))
    return (*CURL_ARGS, "--retry", str(retries), "--retry-delay", str(CURL_RETRY_DELAY_S),
            "--retry-max-time", str(max(1, int(stall / 3))))


def open_url(url: str, stall: float | None = None) -> ByteSource:
    """The bytes of ``url``: a local path, ``file://``, ``http(s)://``, ``pipe:CMD`` or another
    ``gopen`` scheme; reads of a command's output wait at most ``stall`` seconds (default:
    :func:`stall_timeout`)."""
    stall = stall_timeout() if stall is None else stall
    url = rewrite_url(url)
    if url.startswith("pipe:"):
        if wds_utils.enforce_security:
            raise StreamError("pipe: URLs are refused (WDS_SECURE is set)")
        return CommandOutput.start(url[5:], f"command {url[5:]!r}", stall, ok=(0, 141))
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        return FileSource(open(url2pathname(urlparse(url).path) if scheme == "file" else url, "rb"))
    if scheme in ("http", "https"):
        args = curl_args(stall)
        return CommandOutput.start(["curl", *args, url], "the server (curl)", stall, ok=(0,), curl=True,
                                   tries=1 + int(args[args.index("--retry") + 1]))
    opened = gopen(url, "rb")
    if isinstance(opened, Pipe):
        return CommandOutput(opened.proc, f"the command for {url}", stall, ok=opened.ignore_status, own_group=False)
    return FileSource(opened)


class TooLargeError(StreamError):
    """More bytes than the reader takes (an endless or wrong stream)."""


def read_url(url: str, limit: int, stall: float | None = None) -> bytes:
    """All of ``url`` (at most ``limit`` bytes, else :class:`TooLargeError`), each read bounded by the stall timeout."""
    source = open_url(url, stall)
    try:
        parts, size = [], 0
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise TooLargeError(f"larger than {limit} bytes, more than it may hold (an endless stream?)")
            parts.append(chunk)
        source.finish()
        return b"".join(parts)
    finally:
        source.close()
