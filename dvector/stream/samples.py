"""One consumer's endless stream of decoded samples from shard URLs, with positions to resume from.

Which shards a consumer reads, in which order, is :mod:`dvector.stream.sources`'s; this module reads them.

Shards are opened with webdataset's ``gopen`` (local paths, ``file://``, http(s) through curl,
``pipe:`` commands) and read with its ``tar_file_iterator``. Only ``.mel.npy`` and ``.json``
members are read; ``.npy`` is parsed by ``numpy.lib.format`` and never unpickled, other members are
passed over unread. Samples are grouped by key here rather than by webdataset's
``group_by_keys``: deciding member by member what to read (nothing before a resume position,
no mel of another consumer's speaker block) needs every key's position, read or not.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from webdataset.gopen import Pipe, gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from dvector.errors import DvectorError
from dvector.shards.format import MEL_MEMBER, META_MEMBER, is_remote
from dvector.stream.sources import Consumer, StreamPosition, shard_order

_NO_SPEAKER = object()  # before the first sample of a shard
_KEEP = {MEL_MEMBER, META_MEMBER}  # the only members ever read into memory, let alone decoded
_MAX_BAD_SAMPLES = 10  # bad samples in one shard before the rest of it is skipped as corrupt
REMOTE_RETRIES = 3  # times a remote shard whose stream broke is opened again where it broke
_END_ZEROS = 1024  # a tar ends with two zero blocks


# ---- one shard's bytes ---------------------------------------------------------------------------

class ShardFormatError(ValueError):
    """A shard that is not a readable tar (truncated, damaged header, failed stream)."""


class ShardBytes:
    """The byte stream of one shard as ``tarfile`` reads it, from webdataset's ``gopen``.

    Counts the zero bytes that end what was read, so that :meth:`check_end` can tell a complete
    archive from one cut short or stopped by a damaged header (``tarfile`` in stream mode takes
    both for the end). For a command's output (curl, ``pipe:``), everything is read before the
    command's exit status counts: webdataset's ``Pipe`` raises as soon as it sees a failed command,
    losing what is still in the pipe.
    """

    def __init__(self, url: str):
        self.url = url
        self.opened = gopen(url, "rb")
        self.pipe = self.opened if isinstance(self.opened, Pipe) else None
        self.raw = self.pipe.stream if self.pipe is not None else self.opened
        self.zeros = 0  # zero bytes at the end of what was read
        self.ended = False

    def __str__(self) -> str:  # webdataset adds the stream to its error messages
        return self.url

    def read(self, n: int = -1) -> bytes:
        if self.ended:
            return b""
        data = self.raw.read(n)
        if data:
            tail = len(data) - len(data.rstrip(b"\0"))
            self.zeros = self.zeros + tail if tail == len(data) else tail
        elif self.pipe is not None:
            self.ended = True
            self.pipe.close()  # at the end of the output: raises OSError if the command failed
        return data

    def check_end(self) -> None:
        """After tarfile saw the end: nothing but the zero blocks of a tar's end may follow."""
        while chunk := self.read(1 << 16):
            if chunk.strip(b"\0"):
                raise ShardFormatError("a damaged tar header (bad checksum or field) ends the archive early: "
                                       "data follows it")
        if self.zeros < _END_ZEROS:
            raise ShardFormatError("truncated: the archive lacks its end-of-archive blocks")

    def close(self, abandon: bool = False) -> None:
        """Close; ``abandon`` (the rest is not wanted) stops a command quietly, whatever its status."""
        if self.pipe is None:
            self.opened.close()
            return
        if abandon:
            try:
                self.pipe.proc.kill()
                self.pipe.close()
            except Exception:
                pass
        else:
            self.pipe.close()


_NPY_HEADERS: dict[bytes, tuple[int, tuple[int, ...], bool, np.dtype]] = {}  # parsed .npy headers
_NPY_STARTS: list[int] = []  # their lengths (np.save pads headers to 64 bytes: in practice one or two)


def _npy_header(data: bytes) -> tuple[int, tuple[int, ...], bool, np.dtype]:
    """(data offset, shape, fortran order, dtype) of ``.npy`` bytes, parsed by ``numpy.lib.format``.

    numpy parses the header's dict with ``ast.literal_eval``, which costs more than the rest of
    reading a mel; headers are remembered (a header holds its own length, so a remembered one
    that ``data`` starts with is ``data``'s whole header).
    """
    for start in _NPY_STARTS:
        parsed = _NPY_HEADERS.get(data[:start])
        if parsed is not None:
            return parsed
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            array = np.load(io.BytesIO(data), allow_pickle=False)  # a newer format: numpy's own way
            return -1, array.shape, False, array.dtype
    except ValueError:
        raise
    except Exception as exc:  # EOFError, SyntaxError...: a bad member all the same
        raise ValueError(f"unreadable .npy: {type(exc).__name__}: {exc}") from None
    if dtype.hasobject:
        raise ValueError("an object array: it would need pickle to load")
    parsed = (f.tell(), shape, fortran, dtype)
    if len(_NPY_HEADERS) >= 4096:
        _NPY_HEADERS.clear()
    _NPY_HEADERS[data[:f.tell()]] = parsed
    if f.tell() not in _NPY_STARTS:
        _NPY_STARTS.append(f.tell())
    return parsed


def load_npy(data: bytes) -> np.ndarray:
    """An array from ``.npy`` bytes, sharing ``data``'s memory; never unpickles (object arrays and
    malformed members raise ValueError)."""
    start, shape, fortran, dtype = _npy_header(data)
    if start < 0:
        return np.load(io.BytesIO(data), allow_pickle=False)
    count = int(np.prod(shape))
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f".npy data holds {len(data) - start} bytes, its header says {shape} {dtype}")
    return np.frombuffer(data, dtype, count, start).reshape(shape, order="F" if fortran else "C")


def decode_members(key: str, url: str, mel_bytes: bytes, meta: dict[str, Any]) -> dict[str, Any]:
    mel = load_npy(mel_bytes)
    if mel.ndim != 2 or mel.shape[0] < 1 or mel.dtype.kind not in "fiu":
        raise ValueError(f"mel is {mel.dtype} {mel.shape}, expected real numbers (frames, n_mels)")
    return {**meta, "__key__": key, "__url__": url, "mel": mel}


def parse_meta(data: bytes) -> dict[str, Any]:
    meta = json.loads(data)
    if not isinstance(meta, dict) or isinstance(meta.get("speaker_index"), bool) \
            or not isinstance(meta.get("speaker_index"), int):
        raise ValueError("metadata lacks an integer speaker_index")
    return meta


@dataclass
class _Key:
    """The members of one sample key seen so far."""

    position: int  # raw position after this sample
    name: str
    skipped: bool = False  # skip_key accepted it before its mel was read
    suffixes: set[str] = field(default_factory=set)
    meta: dict[str, Any] | None = None
    mel: bytes | None = None
    problem: Exception | None = None
    keep: bool = False  # decided when the key is complete


# ---- one consumer's stream of samples -----------------------------------------------------------

class SampleStream:
    """Endless decoded samples of one consumer, from a position; skips broken shards with a warning.

    Only ``KEY.mel.npy`` and ``KEY.json`` members are read; other members are skipped unread.
    A bad sample (undecodable ``.npy``, an object array that would need pickle, bad metadata) is
    skipped with a warning naming the shard and key; a broken shard (truncated, damaged tar header,
    a failing URL or ``pipe:`` command, or more than ``_MAX_BAD_SAMPLES`` bad samples) is skipped
    from there on, with a warning naming it. ``on_error="raise"`` raises :class:`DvectorError`
    instead. Samples of speakers in ``exclude`` (speaker_index) are passed over without decoding.
    """

    def __init__(self, urls: Sequence[str], consumer: Consumer, seed: int, on_error: str = "warn",
                 exclude: Iterable[int] = ()):
        if on_error not in ("warn", "raise"):
            raise DvectorError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        self.urls, self.consumer, self.seed, self.on_error = list(urls), consumer, seed, on_error
        self.exclude = frozenset(int(s) for s in exclude)

    def _fail(self, url: str, exc: BaseException) -> None:
        message = f"shard {url}: {type(exc).__name__}: {exc}"
        if self.on_error == "raise":
            raise DvectorError(message) from exc
        warnings.warn(f"skipping the rest of {message}", RuntimeWarning, stacklevel=2)

    def _bad_sample(self, url: str, key: str, exc: BaseException) -> None:
        message = f"shard {url}, sample {key!r}: {type(exc).__name__}: {exc}"
        if self.on_error == "raise":
            raise DvectorError(message) from exc
        warnings.warn(f"skipping {message}", RuntimeWarning, stacklevel=2)

    def _shard_samples(self, url: str, start: int, modulus: int, remainder: int,
                       skip_key: Callable[[str], bool] | None = None) -> Iterator[tuple[int, dict | None]]:
        """(raw position after this sample, decoded sample) of one shard from raw position ``start``.

        A sample whose key ``skip_key`` accepts comes as ``None``, its mel neither read nor decoded.
        A remote shard whose stream breaks after giving samples is opened again and read on from
        there (up to ``REMOTE_RETRIES`` times); otherwise the rest of a broken shard is skipped with
        a warning (or :class:`DvectorError` with ``on_error="raise"``).
        """
        retries = 0
        while True:
            progressed = False
            try:
                for position, sample in self._read_shard(url, start, modulus, remainder, skip_key):
                    start, progressed = position, True
                    yield position, sample
                return
            except DvectorError:
                raise
            except Exception as exc:  # truncated tar, damaged header, failing URL or command
                if is_remote(url) and progressed and retries < REMOTE_RETRIES:
                    retries += 1
                    warnings.warn(f"shard {url}: {type(exc).__name__}: {exc}; opening it again at sample {start}",
                                  RuntimeWarning, stacklevel=2)
                    continue
                self._fail(url, exc)
                return

    def _read_shard(self, url: str, start: int, modulus: int, remainder: int,
                    skip_key: Callable[[str], bool] | None) -> Iterator[tuple[int, dict | None]]:
        """The samples of :meth:`_shard_samples`, raising on a broken shard.

        Raw positions count sample keys in tar order, whatever they hold, so that a position means
        the same thing whichever samples this consumer keeps. With ``modulus > 1`` samples are
        kept by speaker block (runs of one speaker_index): block ``b`` is kept if
        ``b % modulus == remainder``. What to read is decided member by member, in the
        ``select_files`` callback that ``tar_file_iterator`` calls before reading each member.
        """
        done: deque[_Key] = deque()  # complete keys, in order, not handed out yet
        state: dict[str, Any] = {"key": None, "block": -1, "last": _NO_SPEAKER, "reading": None}

        def wanted(speaker: Any) -> bool:
            if speaker in self.exclude:
                return False
            if modulus == 1:
                return True
            return (state["block"] + (speaker != state["last"])) % modulus == remainder

        def close(key: _Key) -> None:
            speaker = key.meta["speaker_index"] if key.meta is not None else None
            keep = key.position > start and bool(key.suffixes & _KEEP)
            if modulus > 1:
                keep = keep and wanted(speaker)
                if speaker != state["last"]:
                    state["block"], state["last"] = state["block"] + 1, speaker
            elif keep:
                keep = speaker not in self.exclude
            key.keep = keep
            done.append(key)

        def select(fname: str) -> bool:
            """Whether to read member ``fname``; keeps track of sample keys (called for every member)."""
            name, suffix = base_plus_ext(fname)
            if name is None:
                return False
            suffix = suffix.lower()
            key = state["key"]
            if key is None or name != key.name:
                if key is not None:
                    close(key)
                position = key.position + 1 if key is not None else 1
                key = state["key"] = _Key(position, name)
            if suffix in key.suffixes:
                key.problem = ValueError(f"duplicate member {fname}")
                return False
            key.suffixes.add(suffix)
            state["reading"] = suffix
            if suffix == META_MEMBER:
                return modulus > 1 or key.position > start
            if suffix != MEL_MEMBER or key.position <= start or key.problem is not None \
                    or (key.meta is not None and not wanted(key.meta["speaker_index"])):
                return False
            # skip_key reflects what the consumer holds only once it has had every earlier sample
            key.skipped = skip_key is not None and not done and skip_key(key.name)
            return not key.skipped

        bad = 0

        def ready() -> Iterator[tuple[int, dict | None]]:
            nonlocal bad
            while done:
                key = done.popleft()
                if not key.keep:
                    continue
                if key.skipped or (skip_key is not None and skip_key(key.name)):
                    yield key.position, None
                    continue
                try:
                    if key.problem is not None:
                        raise key.problem
                    if key.mel is None or key.meta is None:
                        raise ValueError(f"lacks {MEL_MEMBER} or {META_MEMBER}")
                    sample = decode_members(key.name, url, key.mel, key.meta)
                except ValueError as exc:
                    bad += 1
                    self._bad_sample(url, key.name, exc)
                    if bad >= _MAX_BAD_SAMPLES:
                        raise ShardFormatError(f"{bad} bad samples") from None
                else:
                    yield key.position, sample

        stream = ShardBytes(url)
        finished = False
        try:
            try:
                for member in tar_file_iterator(stream, select_files=select):
                    yield from ready()
                    key = state["key"]
                    if state["reading"] == META_MEMBER:
                        try:
                            key.meta = parse_meta(member["data"])
                        except ValueError as exc:
                            key.problem = exc
                    else:
                        key.mel = member["data"]
                stream.check_end()
            except tarfile.TarError as exc:  # ReadError: "unexpected end of data", a damaged first header...
                raise ShardFormatError(f"truncated or damaged tar: {exc}") from None
            if state["key"] is not None:
                close(state["key"])
            yield from ready()
            finished = True
            stream.close()  # a pipe: command or download that failed raises here
        finally:
            if not finished:  # stopped early (pool full, error): close quietly
                stream.close(abandon=True)

    def samples(self, start: StreamPosition,
                skip_key: Callable[[str], bool] | None = None) -> Iterator[tuple[StreamPosition, dict | None]]:
        """(position after the sample, sample) pairs from ``start`` on, forever; ``None`` for a sample
        whose key ``skip_key`` accepts (not decoded)."""
        pos = StreamPosition(**asdict(start))
        empty_passes = 0
        while True:
            mine, modulus, remainder = self.consumer.assignment(shard_order(len(self.urls), self.seed, pos.pass_))
            got_any = False
            while pos.shard < len(mine):
                url = self.urls[mine[pos.shard]]
                for raw_pos, sample in self._shard_samples(url, pos.sample, modulus, remainder, skip_key):
                    got_any = True
                    pos.sample = raw_pos
                    yield StreamPosition(pos.pass_, pos.shard, pos.sample), sample
                pos.shard, pos.sample = pos.shard + 1, 0
            empty_passes = 0 if got_any else empty_passes + 1
            if empty_passes >= 2:
                raise DvectorError(f"consumer {self.consumer} read no usable sample in a whole pass over "
                                   f"{len(self.urls)} shard(s): are they all broken or unreachable?")
            pos = StreamPosition(pos.pass_ + 1, 0, 0)
