"""Reading one shard: the one sample decoder and its checks, for every reader of shards.

The stream (training), ``dvector check``, validation and embedding of shard URLs all read shards
through :func:`read_samples` (or :func:`iter_shard` on top of it), so a sample is accepted or
rejected by the same rules everywhere, and damage is reported with the shard's name.

Shards are opened by :mod:`dvector.shards.streams` (local paths, ``file://``, http(s) through
curl, ``pipe:`` commands, with a stall timeout on every read) and read member by member with
``tarfile`` in stream mode. Only ``.mel.npy`` and ``.json`` members are read, and only up to
``MAX_MEL_BYTES`` / ``MAX_META_BYTES`` (a larger member is a bad sample, passed over unread);
``.npy`` is parsed by ``numpy.lib.format`` and never unpickled, other members are passed over
unread. Samples are grouped by key here rather than by webdataset's ``group_by_keys``: deciding
member by member what to read (nothing before a resume position, no mel of another consumer's
speaker block) needs every key's position, read or not.

A sample is bad (skipped, or an error naming it) when a member is unreadable or too large, its mel
is not a 2-D array of real numbers or holds inf/NaN, its speaker_index is not an integer in
``[0, SPEAKER_INDEX_LIMIT)`` (or beyond the index's speaker table, where known), or its mel has
another number of bands than the stream's (:class:`SampleChecks`).
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from webdataset.tariterators import base_plus_ext, tarfile_samples

from dvector.shards.format import MEL_MEMBER, META_MEMBER
from dvector.shards.streams import open_url

_NO_SPEAKER = object()  # before the first sample of a shard
_KEEP = {MEL_MEMBER, META_MEMBER}  # the only members ever read into memory, let alone decoded
MAX_BAD_SAMPLES = 10  # bad samples in one shard before the rest of it is skipped as corrupt
_END_ZEROS = 1024  # a tar ends with two zero blocks
MAX_MEL_BYTES = 64 << 20  # largest .mel.npy member read (float16: 33M values, hours of frames)
MAX_META_BYTES = 1 << 20  # largest .json member read
SPEAKER_INDEX_LIMIT = 1 << 31  # a speaker_index at or above this is absurd, whatever the index says


class ShardFormatError(ValueError):
    """A shard that is not a readable tar (truncated, damaged header, failed stream)."""


class ShardBytes:
    """The byte stream of one shard as ``tarfile`` reads it (:func:`dvector.shards.streams.open_url`).

    Counts the zero bytes that end what was read, so that :meth:`check_end` can tell a complete
    archive from one cut short or stopped by a damaged header (``tarfile`` in stream mode takes
    both for the end). For a command's output (curl, ``pipe:``), everything is read before the
    command's exit status counts (:class:`dvector.shards.streams.StreamError` if it failed); a read
    that waits longer than the stall timeout raises :class:`dvector.shards.streams.StallError`.
    """

    def __init__(self, url: str, stall: float | None = None):
        self.url = url
        self.source = open_url(url, stall)
        self.zeros = 0  # zero bytes at the end of what was read
        self.ended = False

    def __str__(self) -> str:
        return self.url

    def read(self, n: int = -1) -> bytes:
        if self.ended:
            return b""
        data = self.source.read(n)
        if data:
            tail = len(data) - len(data.rstrip(b"\0"))
            self.zeros = self.zeros + tail if tail == len(data) else tail
        else:
            self.ended = True
            self.source.finish()  # at the end of the output: raises StreamError if the command failed
        return data

    def local_file(self):  # noqa: ANN201 - a binary file object, or None
        """The shard's file where it is local and can seek (None for a download or a command's output)."""
        seekable = getattr(self.source, "seekable_file", None)
        return seekable() if seekable is not None else None

    def check_end(self) -> None:
        """After tarfile saw the end: nothing but the zero blocks of a tar's end may follow."""
        rest, data = 0, False
        while chunk := self.read(1 << 16):
            rest, data = rest + len(chunk), data or bool(chunk.strip(b"\0"))
            if data and rest >= tarfile.BLOCKSIZE:
                raise ShardFormatError("a damaged tar header (bad checksum or field) ends the archive early: "
                                       "data follows it")
        if data:  # less than a header block: the file ends inside one (read by offset, it is still there)
            raise ShardFormatError("truncated: the archive ends inside a header")
        if self.zeros < _END_ZEROS:
            raise ShardFormatError("truncated: the archive lacks its end-of-archive blocks")

    def close(self) -> None:
        """Close; a command still running (the rest is not wanted) is stopped, whatever its status."""
        self.source.close()


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
    count = math.prod(shape)
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f".npy data holds {len(data) - start} bytes, its header says {shape} {dtype}")
    return np.frombuffer(data, dtype, count, start).reshape(shape, order="F" if fortran else "C")


def _all_finite(mel: np.ndarray) -> bool:
    if mel.dtype == np.dtype(np.float16):  # as stored: exponent bits all ones is inf or NaN (6x isfinite's speed)
        return not ((mel.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(mel).all())


def _check_speaker(speaker: int, max_speaker_index: int | None) -> None:
    top = SPEAKER_INDEX_LIMIT - 1 if max_speaker_index is None else min(max_speaker_index, SPEAKER_INDEX_LIMIT - 1)
    if not 0 <= speaker <= top:
        where = "the index's speaker table" if max_speaker_index is not None else "any sane speaker table"
        raise ValueError(f"speaker_index {speaker} is beyond {where} (0..{top})")


@dataclass
class SampleChecks:
    """What every sample of one stream must agree on beyond the format: its mel bands and the range of
    speaker_index. ``n_mels`` None: learned from the first good sample; ``max_speaker_index`` (the
    largest valid one, e.g. the index's speaker count - 1) None: only absurd values are refused."""

    n_mels: int | None = None
    max_speaker_index: int | None = None

    def check(self, mel: np.ndarray, speaker: int) -> None:
        _check_speaker(speaker, self.max_speaker_index)
        if self.n_mels is None:
            self.n_mels = int(mel.shape[1])
        elif mel.shape[1] != self.n_mels:
            raise ValueError(f"mel has {mel.shape[1]} bands where the stream's have {self.n_mels}: "
                             "another feature setting")


def decode_members(key: str, url: str, mel_bytes: bytes, meta: dict[str, Any],
                   checks: SampleChecks | None = None) -> dict[str, Any]:
    """The sample ``{**meta, "__key__", "__url__", "mel"}``; ValueError naming what is wrong with it."""
    mel = load_npy(mel_bytes)
    if mel.ndim != 2 or mel.shape[0] < 1 or mel.shape[1] < 1 or mel.dtype.kind not in "fiu":
        raise ValueError(f"mel is {mel.dtype} {mel.shape}, expected real numbers (frames, n_mels)")
    if mel.dtype.kind == "f" and not _all_finite(mel):
        bad = int(mel.size - np.count_nonzero(np.isfinite(mel)))
        raise ValueError(f"mel holds {bad} non-finite values (inf or NaN)")
    if checks is not None:
        checks.check(mel, meta["speaker_index"])
    else:
        _check_speaker(meta["speaker_index"], None)
    return {**meta, "__key__": key, "__url__": url, "mel": mel}


def parse_meta(data: bytes) -> dict[str, Any]:
    """A sample's metadata; ValueError for anything else (bad JSON, too deeply nested, no speaker_index)."""
    try:
        meta = json.loads(data)
    except RecursionError:  # a member of nested brackets: this sample is bad, not the rest of its shard
        raise ValueError("metadata nested too deeply to parse") from None
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
    :meth:`select` is called with every member's name and size before it is read; complete keys
    wait in ``done`` until :meth:`ready` hands them out.
    """

    def __init__(self, url: str, start: int, modulus: int, remainder: int,
                 skip_key: Callable[[str], bool] | None, exclude: frozenset[int],
                 on_bad_sample: Callable[[str, str, ValueError], None] | None, checks: SampleChecks) -> None:
        self.url, self.start, self.modulus, self.remainder = url, start, modulus, remainder
        self.skip_key, self.exclude, self.on_bad_sample = skip_key, exclude, on_bad_sample
        self.checks = checks
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

    def select(self, fname: str, size: int) -> bool:
        """Whether to read member ``fname`` of ``size`` bytes; keeps track of sample keys (called for
        every member). A member over its size limit makes its sample bad, unread."""
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
        limit = MAX_META_BYTES if suffix == META_MEMBER else MAX_MEL_BYTES if suffix == MEL_MEMBER else None
        if limit is not None and size > limit:
            key.problem = key.problem or ValueError(f"member {fname} holds {size} bytes, over the limit of {limit}")
            return False
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
                sample = decode_members(key.name, self.url, key.mel, key.meta, self.checks)
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


def _members(stream: ShardBytes, select: Callable[[str, int], bool]) -> Iterator[bytes]:
    """The data of each regular member of the tar ``stream`` that ``select(name, size)`` accepts;
    the others are passed over unread (``tarfile`` in stream mode skips their data).

    A local uncompressed tar is read by offset (``tarfile``'s random-access mode: 2-3x faster than
    its stream mode, which copies every byte through its own buffer); afterwards the stream stands
    where the archive's end blocks begin, for :meth:`ShardBytes.check_end`.
    """
    local = stream.local_file()
    if local is not None:
        try:
            tar = tarfile.open(fileobj=local, mode="r:")
        except tarfile.ReadError:  # compressed, or damaged at the start: stream mode says which
            local.seek(0)
        else:
            for info in tar:
                if info.isreg() and select(info.name, info.size):
                    member = tar.extractfile(info)
                    assert member is not None
                    yield member.read()
                tar.members = []  # keeps every header otherwise
            local.seek(tar.offset)
            return
    tar = tarfile.open(fileobj=stream, mode="r|*", bufsize=1 << 16)  # fewer, larger reads (each may poll a pipe)
    for info in tar:
        if info.isreg() and select(info.name, info.size):
            member = tar.extractfile(info)
            assert member is not None
            yield member.read()
        tar.members = []  # stream mode keeps every header otherwise


def read_samples(url: str, start: int = 0, modulus: int = 1, remainder: int = 0,
                 skip_key: Callable[[str], bool] | None = None, exclude: frozenset[int] = frozenset(),
                 on_bad_sample: Callable[[str, str, ValueError], None] | None = None, *,
                 checks: SampleChecks | None = None, stall: float | None = None,
                 ) -> Iterator[tuple[int, dict | None]]:
    """(raw position after this sample, decoded sample) of shard ``url`` from raw position ``start``;
    raises :class:`ShardFormatError` on a broken shard (truncated, damaged), and
    :class:`dvector.shards.streams.StreamError` (an OSError) on a failing URL or command, or
    :class:`~dvector.shards.streams.StallError` when no bytes come for ``stall`` seconds (default:
    ``DVECTOR_STALL_TIMEOUT`` or 60).

    A sample whose key ``skip_key`` accepts comes as ``None``, its mel neither read nor decoded;
    samples of speakers in ``exclude`` (speaker_index) are passed over without decoding. A bad
    sample goes to ``on_bad_sample(url, key, error)`` (which may raise) and is skipped; with no
    ``on_bad_sample`` it raises :class:`ShardFormatError` naming it. ``MAX_BAD_SAMPLES`` bad
    samples make the shard broken. ``modulus`` and ``remainder`` keep one consumer's speaker
    blocks (see :class:`_MemberSelector`). ``checks`` (kept across shards by the caller) holds the
    stream's mel bands and speaker range; by default a fresh one, learning bands from this shard.
    """
    checks = SampleChecks() if checks is None else checks
    selector = _MemberSelector(url, start, modulus, remainder, skip_key, exclude, on_bad_sample, checks)
    stream = ShardBytes(url, stall)
    try:
        try:
            for data in _members(stream, selector.select):
                yield from selector.ready()
                selector.take(data)
            stream.check_end()  # reads to the end: a failed command or download raises here
        except tarfile.TarError as exc:  # ReadError: "unexpected end of data", a damaged first header...
            raise ShardFormatError(f"truncated or damaged tar: {exc}") from None
        if selector.key is not None:
            selector.close(selector.key)
        yield from selector.ready()
    finally:
        stream.close()  # stopped early (pool full, error): a command still running is stopped


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


def iter_shard(url: str, checks: SampleChecks | None = None, stall: float | None = None) -> Iterator[dict[str, Any]]:
    """Every decoded sample of one shard, in order; :class:`ShardFormatError` naming the shard on a
    truncated or damaged tar, a missing file, a failing or stalled stream, or any bad sample.
    ``checks``: the mel bands and speaker range every sample must have (default: learned from the
    shard's first sample, absurd speaker indices refused)."""
    try:
        for _, sample in read_samples(url, checks=checks, stall=stall):
            yield sample
    except (ShardFormatError, OSError) as exc:  # OSError: a missing file, a failed or stalled command
        raise ShardFormatError(f"shard {url}: {exc}") from exc
