"""Reading one shard: the one sample decoder and its checks, for every reader of shards.

The stream (training), ``dvector check``, validation and embedding of shard URLs all read shards
through :func:`read_samples` (or :func:`iter_shard` on top of it), so a sample is accepted or
rejected by the same rules everywhere, and damage is reported with the shard's name.

Shards are opened with webdataset's ``gopen`` (local paths, ``file://``, http(s) through curl,
``pipe:`` commands) and read with its ``tar_file_iterator``. Only ``.mel.npy`` and ``.json``
members are read; ``.npy`` is parsed by ``numpy.lib.format`` and never unpickled, other members are
passed over unread. Samples are grouped by key here rather than by webdataset's
``group_by_keys``: deciding member by member what to read (nothing before a resume position, no mel
of another consumer's speaker block) needs every key's position, read or not.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from webdataset.gopen import Pipe, gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator, tarfile_samples

from dvector.shards.format import MEL_MEMBER, META_MEMBER

_NO_SPEAKER = object()  # before the first sample of a shard
_KEEP = {MEL_MEMBER, META_MEMBER}  # the only members ever read into memory, let alone decoded
MAX_BAD_SAMPLES = 10  # bad samples in one shard before the rest of it is skipped as corrupt
_END_ZEROS = 1024  # a tar ends with two zero blocks


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


class _MemberSelector:
    """Follows one shard's members in tar order and decides, member by member, what to read.

    Raw positions count sample keys in tar order, whatever they hold, so that a position means
    the same thing whichever samples a consumer keeps. With ``modulus > 1`` samples are kept by
    speaker block (runs of one speaker_index): block ``b`` is kept if ``b % modulus == remainder``.
    :meth:`select` is the ``select_files`` callback that ``tar_file_iterator`` calls before reading
    each member; complete keys wait in ``done`` until :meth:`ready` hands them out.
    """

    def __init__(self, url: str, start: int, modulus: int, remainder: int,
                 skip_key: Callable[[str], bool] | None, exclude: frozenset[int],
                 on_bad_sample: Callable[[str, str, ValueError], None] | None) -> None:
        self.url, self.start, self.modulus, self.remainder = url, start, modulus, remainder
        self.skip_key, self.exclude, self.on_bad_sample = skip_key, exclude, on_bad_sample
        self.done: deque[_Key] = deque()  # complete keys, in order, not handed out yet
        self.key: _Key | None = None  # the key whose members are being read
        self.block, self.last = -1, _NO_SPEAKER  # speaker block count, and the last block's speaker
        self.reading: str | None = None  # the suffix of the member being read
        self.bad = 0

    def _wanted(self, speaker: Any) -> bool:
        if speaker in self.exclude:
            return False
        if self.modulus == 1:
            return True
        return (self.block + (speaker != self.last)) % self.modulus == self.remainder

    def close(self, key: _Key) -> None:
        """``key`` has all its members: decide whether it is kept, and queue it."""
        speaker = key.meta["speaker_index"] if key.meta is not None else None
        keep = key.position > self.start and bool(key.suffixes & _KEEP)
        if self.modulus > 1:
            keep = keep and self._wanted(speaker)
            if speaker != self.last:
                self.block, self.last = self.block + 1, speaker
        elif keep:
            keep = speaker not in self.exclude
        key.keep = keep
        self.done.append(key)

    def select(self, fname: str) -> bool:
        """Whether to read member ``fname``; keeps track of sample keys (called for every member)."""
        name, suffix = base_plus_ext(fname)
        if name is None:
            return False
        suffix = suffix.lower()
        key = self.key
        if key is None or name != key.name:
            if key is not None:
                self.close(key)
            position = key.position + 1 if key is not None else 1
            key = self.key = _Key(position, name)
        if suffix in key.suffixes:
            key.problem = ValueError(f"duplicate member {fname}")
            return False
        key.suffixes.add(suffix)
        self.reading = suffix
        if suffix == META_MEMBER:
            return self.modulus > 1 or key.position > self.start
        if suffix != MEL_MEMBER or key.position <= self.start or key.problem is not None \
                or (key.meta is not None and not self._wanted(key.meta["speaker_index"])):
            return False
        # skip_key reflects what the consumer holds only once it has had every earlier sample
        key.skipped = self.skip_key is not None and not self.done and self.skip_key(key.name)
        return not key.skipped

    def take(self, data: bytes) -> None:
        """The bytes of the member :meth:`select` just accepted."""
        assert self.key is not None, "a member was read before any key was seen"
        if self.reading == META_MEMBER:
            try:
                self.key.meta = parse_meta(data)
            except ValueError as exc:
                self.key.problem = exc
        else:
            self.key.mel = data

    def ready(self) -> Iterator[tuple[int, dict | None]]:
        """(position, sample or None) of the complete keys kept; bad samples are reported and skipped."""
        while self.done:
            key = self.done.popleft()
            if not key.keep:
                continue
            if key.skipped or (self.skip_key is not None and self.skip_key(key.name)):
                yield key.position, None
                continue
            try:
                if key.problem is not None:
                    raise key.problem
                if key.mel is None or key.meta is None:
                    raise ValueError(f"lacks {MEL_MEMBER} or {META_MEMBER}")
                sample = decode_members(key.name, self.url, key.mel, key.meta)
            except ValueError as exc:
                self._bad_sample(key, exc)
            else:
                yield key.position, sample

    def _bad_sample(self, key: _Key, exc: ValueError) -> None:
        self.bad += 1
        if self.on_bad_sample is None:
            raise ShardFormatError(f"sample {key.name!r}: {exc}") from None
        self.on_bad_sample(self.url, key.name, exc)
        if self.bad >= MAX_BAD_SAMPLES:
            raise ShardFormatError(f"{self.bad} bad samples") from None


def read_samples(url: str, start: int = 0, modulus: int = 1, remainder: int = 0,
                 skip_key: Callable[[str], bool] | None = None, exclude: frozenset[int] = frozenset(),
                 on_bad_sample: Callable[[str, str, ValueError], None] | None = None,
                 ) -> Iterator[tuple[int, dict | None]]:
    """(raw position after this sample, decoded sample) of shard ``url`` from raw position ``start``;
    raises :class:`ShardFormatError` on a broken shard (truncated, damaged, failing stream).

    A sample whose key ``skip_key`` accepts comes as ``None``, its mel neither read nor decoded;
    samples of speakers in ``exclude`` (speaker_index) are passed over without decoding. A bad
    sample goes to ``on_bad_sample(url, key, error)`` (which may raise) and is skipped; with no
    ``on_bad_sample`` it raises :class:`ShardFormatError` naming it. ``MAX_BAD_SAMPLES`` bad
    samples make the shard broken. ``modulus`` and ``remainder`` keep one consumer's speaker
    blocks (see :class:`_MemberSelector`).
    """
    selector = _MemberSelector(url, start, modulus, remainder, skip_key, exclude, on_bad_sample)
    stream = ShardBytes(url)
    finished = False
    try:
        try:
            for member in tar_file_iterator(stream, select_files=selector.select):
                yield from selector.ready()
                selector.take(member["data"])
            stream.check_end()
        except tarfile.TarError as exc:  # ReadError: "unexpected end of data", a damaged first header...
            raise ShardFormatError(f"truncated or damaged tar: {exc}") from None
        if selector.key is not None:
            selector.close(selector.key)
        yield from selector.ready()
        finished = True
        stream.close()  # a pipe: command or download that failed raises here
    finally:
        if not finished:  # stopped early (pool full, error): close quietly
            stream.close(abandon=True)


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw webdataset sample (member bytes by suffix) as ``{"__key__", "__url__", "mel", **meta}``,
    by the same checks as :func:`read_samples`; ValueError if invalid. Other members are ignored."""
    key = raw.get("__key__", "?")
    if not isinstance(raw.get(MEL_MEMBER), bytes) or not isinstance(raw.get(META_MEMBER), bytes):
        raise ValueError(f"sample {key!r} lacks {MEL_MEMBER} or {META_MEMBER}")
    try:
        return decode_members(key, raw.get("__url__"), raw[MEL_MEMBER], parse_meta(raw[META_MEMBER]))
    except ValueError as exc:
        raise ValueError(f"sample {key!r}: {exc}") from None


def iter_raw_samples(url: str, handler: Callable[[Exception], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard URL through webdataset's own reader (no checks): for tests and tools.

    ``handler`` decides on errors like webdataset's handlers: return True to skip and go on.
    """
    kwargs = {} if handler is None else {"handler": handler}
    return tarfile_samples([{"url": url}], **kwargs)


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Every decoded sample of one shard, in order; :class:`ShardFormatError` (naming the shard) on a
    truncated or damaged tar, a failing stream or any bad sample."""
    try:
        for _, sample in read_samples(url):
            yield sample
    except ShardFormatError as exc:
        raise ShardFormatError(f"shard {url}: {exc}") from None
