"""Shard URLs -> per-rank, per-worker sample streams -> speaker-balanced GE2E batches -> DataLoader.

Every pass over the data has a global shard order derived from ``(seed, pass)``. Ranks, then
DataLoader workers, take disjoint slices of it (``order[rank::world][worker::workers]``); where
there are fewer shards than consumers, consumers read the same shards but keep disjoint speaker
blocks instead. Each worker streams forever: it reads a bounded pool of samples, draws batches
from it (:func:`dvector.sampling.draw_round`), and reads the next pool. A worker's position is
(round, stream position where the round's pool began, batches drawn from it): small, and enough
to resume exactly, re-reading at most one pool. Between pools the shard stream stays open, so that
a remote shard is downloaded once per pass.

Shards are read by a small tar reader of this module rather than Python's tarfile: local shards
are memory-mapped and their ``.npy`` members become arrays without a copy; only ``.npy`` (never
with pickle) and ``.json`` members are ever read, other members are skipped unread.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import mmap
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from .errors import DvectorError
from .sampling import DEFAULT_MIN_FRAMES, Batch, SamplingStats, SegLen, SegmentSpec, draw_round
from .shards import INDEX_NAME, MEL_MEMBER, META_MEMBER, read_index

log = logging.getLogger(__name__)
_NO_SPEAKER = object()  # before the first sample of a shard
_END = object()  # after the last member of a shard


# ---- where the shards are ----------------------------------------------------------------------

@dataclass
class ShardSource:
    urls: list[str]
    index: dict[str, Any] | None  # the build's index.json, where one was found


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _index_beside(url: str) -> dict[str, Any] | None:
    """The index.json in the folder of a shard URL, where there is one (a pipe: command has no folder)."""
    if url.startswith("pipe:"):
        return None
    candidate = _parent(url) + "/" + INDEX_NAME
    if not _is_remote(candidate) and not os.path.exists(_local_path(candidate)):
        return None
    try:
        return read_index(candidate)
    except DvectorError as exc:
        if _is_remote(candidate):  # no index beside remote shards: fine, it is optional
            log.info("no usable %s beside %s: %s", INDEX_NAME, url, exc)
            return None
        raise


def resolve_shards(source: str | os.PathLike[str] | Sequence[str], index: str | None = None) -> ShardSource:
    """Shard URLs from a folder (with index.json), a brace pattern, a URL list, or one URL.

    A folder is a local directory, or a URL ending in ``/`` (``http://host/shards/``,
    ``file:///data/shards/``) whose index.json lists the shards; an index.json path or URL works
    too. ``index`` names an index.json explicitly; otherwise it is looked for beside the shards
    (local or remote; not for ``pipe:`` URLs, which have no folder).
    """
    if isinstance(source, (list, tuple)):
        urls = [u for s in source for u in expand_urls(os.fspath(s))]
    else:
        text = os.fspath(source)
        is_folder = not text.startswith("pipe:") and (
            text.endswith("/") or (not _is_remote(text) and os.path.isdir(_local_path(text))))
        if is_folder or (text.endswith("/" + INDEX_NAME) or text == INDEX_NAME) and not text.startswith("pipe:"):
            idx = read_index(index or text)
            base = _parent(text) if text.endswith(INDEX_NAME) else text.rstrip("/")
            if not idx.get("shards"):
                raise DvectorError(f"{text}: its {INDEX_NAME} lists no shards")
            return ShardSource([f"{base}/{s['name']}" for s in idx["shards"]], idx)
        urls = expand_urls(text)
    if not urls:
        raise DvectorError(f"no shards in {source!r}")
    found = read_index(index) if index is not None else _index_beside(urls[0])
    return ShardSource(list(urls), found)


# ---- one consumer's stream of samples -----------------------------------------------------------

@dataclass(frozen=True)
class Consumer:
    """Which slice of the data one (rank, worker) reads."""

    rank: int = 0
    world: int = 1
    worker: int = 0
    workers: int = 1

    def assignment(self, order: Sequence[int]) -> tuple[list[int], int, int]:
        """(shards to read, block modulus, block remainder) for this consumer."""
        order = list(order)
        if len(order) >= self.world:
            mine = order[self.rank::self.world]
            if len(mine) >= self.workers:
                return mine[self.worker::self.workers], 1, 0
            return mine, self.workers, self.worker
        return order, self.world * self.workers, self.rank * self.workers + self.worker


@dataclass
class StreamPosition:
    pass_: int = 0  # pass over the data
    shard: int = 0  # position in this consumer's shard list of the pass
    sample: int = 0  # raw samples already consumed in that shard


def shard_order(n_shards: int, seed: int, pass_: int) -> list[int]:
    return np.random.default_rng([seed, pass_, 0x5EED]).permutation(n_shards).tolist()


# ---- reading one shard: a small tar reader that decodes only what it must --------------------

_TAR_BLOCK = 512
_ZERO_BLOCK = bytes(_TAR_BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file types; directories, links and devices are skipped
_KEEP = {MEL_MEMBER, META_MEMBER}  # the only members ever read into memory, let alone decoded
_MAX_BAD_SAMPLES = 10  # bad samples in one shard before the rest of it is skipped as corrupt
REMOTE_RETRIES = 3  # times a remote shard whose stream broke is opened again where it broke
# The header np.save writes for a C-order 2-D numeric array; anything else goes through np.load.
_NPY_2D = re.compile(rb"\{'descr': '([<>|=]?[fiu][1248])', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \} *\n")


class ShardFormatError(ValueError):
    """A shard that is not a readable tar (truncated, bad header checksum, failed stream)."""


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file:"))


def _local_path(url: str) -> str:
    return url2pathname(urlparse(url).path) if url.startswith("file:") else url


class MappedFile:
    """A read-only stream over a local file: small reads (tar headers, metadata) are plain ``pread``
    calls, large ones (``.npy`` members) zero-copy memoryviews of a memory map.

    Arrays decoded from those views keep the mapping alive (it is unmapped when the last one
    goes); the pages are the page cache's, shared by all workers, never copied into the process,
    and only pages that are read (crops) are mapped in. Shards are replaced by rename, never
    rewritten in place, so a mapping stays valid.
    """

    SMALL = 4096  # reads up to this size are copied

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.size = os.fstat(self.fd).st_size
            self.map = mmap.mmap(self.fd, self.size, access=mmap.ACCESS_READ) if self.size else None
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.map) if self.map is not None else memoryview(b"")
        self.pos = 0

    def release_before(self, pos: int) -> None:
        """Drop this process's mapping of pages before ``pos`` (arrays there stay valid: a touch maps them
        back from the page cache); keeps a worker's resident size to about its pool, not its shard."""
        end = min(pos, self.size) - min(pos, self.size) % mmap.PAGESIZE
        if self.map is not None and end > 0 and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self.map.madvise(mmap.MADV_DONTNEED, 0, end)
            except (OSError, ValueError):
                pass

    def read(self, n: int = -1) -> bytes | memoryview:
        end = self.size if n < 0 else min(self.pos + n, self.size)
        if end - self.pos <= self.SMALL:
            data: bytes | memoryview = os.pread(self.fd, end - self.pos, self.pos) if end > self.pos else b""
        else:
            data = self.view[self.pos:end]
        self.pos = end
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = offset if whence == os.SEEK_SET else self.pos + offset
        return self.pos

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.view, self.map = memoryview(b""), None  # drop these references; decoded arrays keep theirs
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CommandStream:
    """The output of a command webdataset's ``gopen`` runs (``pipe:`` URLs, curl for http(s)).

    Unlike webdataset's ``Pipe``, which raises as soon as it sees the command has failed (losing
    what is still in the pipe), reads here give all the output there is; :meth:`failure` then says
    whether the command failed, and :meth:`close` raises if it did.
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.stream = pipe.stream

    def read(self, n: int = -1) -> bytes:
        return self.stream.read(n)

    def seekable(self) -> bool:
        return False

    def failure(self, wait: float = 0.0) -> str | None:
        """What went wrong with the command, if it has exited with an error status (None otherwise)."""
        try:
            status = self.pipe.proc.wait(wait) if wait else self.pipe.proc.poll()
        except Exception:  # still running
            return None
        if status is None or status in [0, *getattr(self.pipe, "ignore_status", [])]:
            return None
        args = self.pipe.proc.args
        return f"command {args if isinstance(args, str) else ' '.join(map(str, args))!r} exited with status {status}"

    def close(self) -> None:
        """Close after reading everything; raises OSError if the command failed."""
        self.stream.close()
        problem = self.failure(wait=60.0)
        if problem is not None:
            raise OSError(problem)

    def abandon(self) -> None:
        """Close early (the rest is not wanted): stop the command, whatever its status."""
        try:
            self.stream.close()
            self.pipe.proc.kill()
            self.pipe.proc.wait(10.0)
        except Exception:
            pass


def open_shard(url: str) -> Any:
    """A binary stream of one shard: a memory map for a local path or ``file://``, else the output of
    the command webdataset's ``gopen`` runs (curl for http(s), the command of a ``pipe:`` URL)."""
    if _is_remote(url):
        opened = wds.gopen(url, "rb")
        return CommandStream(opened) if hasattr(opened, "proc") and hasattr(opened, "stream") else opened
    return MappedFile(_local_path(url))


def _tar_number(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes past 8 GB
        if field[0] == 0xFF:
            raise ShardFormatError(f"negative {what} in tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardFormatError(f"bad {what} {field!r} in tar header") from None


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    records, i = {}, 0
    while i < len(data) and data[i:i + 1] != b"\0":
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1:i + length - 1].partition(b"=")
        records[key] = value
        i += length
    return records


class TarMembers:
    """Regular-file members of a tar stream, read strictly in order: ``(name, size)`` pairs.

    After a member is yielded, :meth:`read` returns its data; a member that is not read is skipped
    (``seek`` on files, read and discarded on pipes), never held in memory. A truncated stream,
    a header with a bad checksum or a missing end-of-archive block raise :class:`ShardFormatError`.
    """

    def __init__(self, stream: Any):
        self.stream = stream
        self.left = 0  # bytes of the current member (data and padding) not consumed yet
        self.unread = 0  # data bytes of the current member not read yet
        try:
            self.seekable = bool(stream.seekable())
        except (AttributeError, OSError, ValueError):
            self.seekable = False
        self.members = 0

    def _exact(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise ShardFormatError(f"truncated: member {self.members} ends {n - len(data)} bytes early")
        return data

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.seekable:
            self.stream.seek(n, os.SEEK_CUR)  # past the end: the next header read reports the truncation
            return
        while n:
            chunk = self.stream.read(min(n, 1 << 20))
            if not chunk:
                raise ShardFormatError(f"truncated: member {self.members} ends {n} bytes early")
            n -= len(chunk)

    def read(self) -> bytes:
        """The data of the member just yielded (once)."""
        assert self.unread >= 0, "read() twice for one member"
        data = self._exact(self.unread)
        self.left -= self.unread
        self.unread = -1
        return data

    def __iter__(self) -> Iterator[tuple[str, int]]:
        long_name: bytes | None = None
        pax: dict[bytes, bytes] = {}
        while True:
            self._skip(self.left)
            self.left, self.unread = 0, -1
            header = bytes(self.stream.read(_TAR_BLOCK))
            if len(header) < _TAR_BLOCK:
                raise ShardFormatError(f"truncated after {self.members} members (no end-of-archive block)")
            if header == _ZERO_BLOCK:
                return
            stored = _tar_number(header[148:156], "checksum")
            unsigned = sum(header) - sum(header[148:156]) + 8 * 32
            if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in header):  # (or signed)
                raise ShardFormatError(f"bad header checksum at member {self.members} (corrupt tar)")
            self.members += 1
            size = _tar_number(header[124:136], "size")
            flag = header[156:157]
            if flag in (b"x", b"g", b"L", b"K"):  # pax and GNU long-name headers describe the next member
                data = bytes(self._exact(size))
                self._skip(-size % _TAR_BLOCK)
                if flag == b"x":
                    pax = _pax_records(data)
                elif flag == b"L":
                    long_name = data.split(b"\0", 1)[0]
                continue
            name = header[:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            name = pax.get(b"path", long_name or name)
            if b"size" in pax:
                size = int(pax[b"size"])
            long_name, pax = None, {}
            self.left = size + (-size % _TAR_BLOCK)
            if flag not in _REGULAR:
                continue
            self.unread = size
            yield name.decode("utf-8", "replace"), size


def split_member_name(name: str) -> tuple[str | None, str]:
    """webdataset's (key, suffix): key up to the first dot of the last path part, suffix lower-cased."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def load_npy(data: bytes) -> np.ndarray:
    """A 2-D array from ``.npy`` bytes without copying; never unpickles (object arrays raise ValueError)."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not an .npy file")
    if data[6] == 1:
        start = 10 + int.from_bytes(data[8:10], "little")
        header = data[10:start]
    else:
        start = 12 + int.from_bytes(data[8:12], "little")
        header = data[12:start]
    match = _NPY_2D.fullmatch(header)
    if match is None:  # unusual but maybe valid: numpy's own parser, still without pickle
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError:
            raise
        except Exception as exc:  # EOFError, OSError, SyntaxError...: a bad member all the same
            raise ValueError(f"unreadable .npy: {type(exc).__name__}: {exc}") from None
    dtype = np.dtype(match[1].decode("ascii"))
    rows, cols = int(match[2]), int(match[3])
    if len(data) - start != rows * cols * dtype.itemsize:
        raise ValueError(f".npy data holds {len(data) - start} bytes, its header says {rows}x{cols} {dtype}")
    return np.frombuffer(data, dtype, rows * cols, start).reshape(rows, cols)


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


class SampleStream:
    """Endless decoded samples of one consumer, from a position; skips broken shards with a warning.

    Only ``KEY.mel.npy`` and ``KEY.json`` members are read; other members are skipped unread.
    A bad sample (undecodable ``.npy``, an object array that would need pickle, bad metadata) is
    skipped with a warning naming the shard and key; a broken shard (truncated, bad tar header, a
    failing URL or ``pipe:`` command, or more than ``_MAX_BAD_SAMPLES`` bad samples) is skipped
    from there on, with a warning naming it. ``on_error="raise"`` raises :class:`DvectorError`
    instead. Samples of speakers in ``exclude`` (speaker_index) are passed over without decoding.
    """

    def __init__(self, urls: Sequence[str], consumer: Consumer, seed: int, on_error: str = "warn",
                 exclude: Iterable[int] = ()):
        if on_error not in ("warn", "raise"):
            raise DvectorError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        self.urls, self.consumer, self.seed, self.on_error = list(urls), consumer, seed, on_error
        self.exclude = frozenset(int(s) for s in exclude)
        self._open: Any = None  # the shard being read

    def release_consumed(self) -> None:
        """Samples read so far are no longer held: let the memory map of the open shard go up to here."""
        if isinstance(self._open, MappedFile):
            self._open.release_before(self._open.pos)

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
            except Exception as exc:  # truncated tar, bad header, failing URL or command
                if _is_remote(url) and progressed and retries < REMOTE_RETRIES:
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
        ``b % modulus == remainder``.
        """
        position, block, last_speaker, bad = 0, -1, _NO_SPEAKER, 0
        stream = None
        try:
            stream = self._open = open_shard(url)
            members = TarMembers(stream)
            key: str | None = None
            skipping = False
            has: set[str] = set()
            meta: dict[str, Any] | None = None
            problem: Exception | None = None
            mel_bytes: bytes | None = None

            def wanted(speaker: Any) -> bool:
                if speaker in self.exclude:
                    return False
                if modulus == 1:
                    return True
                return (block + (speaker != last_speaker)) % modulus == remainder

            for name, _size in itertools.chain(members, [(None, 0)]):
                k, suffix = split_member_name(name) if name is not None else (_END, "")
                if k is None:
                    continue
                if k != key:
                    if key is not None:  # close the sample of `key`
                        position += 1
                        speaker = meta["speaker_index"] if meta is not None else None
                        keep = position > start and bool(has & _KEEP)
                        if modulus > 1:
                            keep = keep and wanted(speaker)
                            if speaker != last_speaker:
                                block, last_speaker = block + 1, speaker
                        elif keep:
                            keep = speaker not in self.exclude
                        if keep and skipping:
                            yield position, None
                        elif keep:
                            try:
                                if problem is not None:
                                    raise problem
                                if MEL_MEMBER not in has or META_MEMBER not in has:
                                    raise ValueError(f"lacks {MEL_MEMBER} or {META_MEMBER}")
                                assert meta is not None and mel_bytes is not None
                                sample = decode_members(key, url, mel_bytes, meta)
                            except ValueError as exc:
                                bad += 1
                                self._bad_sample(url, key, exc)
                                if bad >= _MAX_BAD_SAMPLES:
                                    raise ShardFormatError(f"{bad} bad samples") from None
                            else:
                                yield position, sample
                    if k is _END:
                        break
                    key, has, meta, problem, mel_bytes = k, set(), None, None, None
                    skipping = skip_key is not None and position + 1 > start and skip_key(k)
                if suffix in has:
                    problem = ValueError(f"duplicate member {name}")
                    continue
                has.add(suffix)
                if suffix == META_MEMBER and (modulus > 1 or position + 1 > start):
                    try:
                        meta = parse_meta(bytes(members.read()))
                    except ValueError as exc:
                        problem = exc
                elif suffix == MEL_MEMBER and position + 1 > start and problem is None and not skipping \
                        and (meta is None or wanted(meta["speaker_index"])):
                    mel_bytes = members.read()
            if not members.seekable:  # drain the tail, so that a pipe's command can finish cleanly
                while stream.read(1 << 16):
                    pass
            stream, closing = None, stream
            closing.close()  # a pipe: command or download that failed raises here
        except ShardFormatError as exc:  # a stream that ended early: say why, if its command failed
            problem = stream.failure(wait=10.0) if isinstance(stream, CommandStream) else None
            if problem is not None:
                raise OSError(problem) from exc
            raise
        finally:
            self._open = None
            if stream is not None:  # stopped early (pool full, error): close quietly
                try:
                    stream.abandon() if isinstance(stream, CommandStream) else stream.close()
                except Exception:
                    pass

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


# ---- batches of one consumer --------------------------------------------------------------------

@dataclass
class BatchSettings:
    n_speakers: int = 64
    n_utterances: int = 10
    seg_len: SegLen = 160
    pool_size: int = 0  # utterances per pool (0: 8 x N x M)
    max_uses: int = 2
    short_policy: str = "repeat"
    min_frames: int = DEFAULT_MIN_FRAMES
    seed: int = 0
    on_error: str = "warn"
    exclude_speakers: tuple[int, ...] = ()  # speaker indices never drawn (held out for validation)

    @property
    def pool(self) -> int:
        return self.pool_size or 8 * self.n_speakers * self.n_utterances

    def shape_key(self) -> dict[str, Any]:
        """What shapes the batch stream: a saved position only applies with the same settings."""
        spec = SegmentSpec.parse(self.seg_len)
        return {"n_speakers": self.n_speakers, "n_utterances": self.n_utterances, "seg_len": [spec.lo, spec.hi],
                "pool": self.pool, "max_uses": self.max_uses, "short_policy": self.short_policy,
                "min_frames": self.min_frames, "seed": self.seed, "exclude_speakers": list(self.exclude_speakers)}


@dataclass
class WorkerState:
    round: int = 0
    start: StreamPosition = field(default_factory=StreamPosition)  # where this round's pool began
    drawn: int = 0  # batches already drawn from this round

    def to_dict(self) -> dict[str, int]:
        return {"round": self.round, "pass": self.start.pass_, "shard": self.start.shard,
                "sample": self.start.sample, "drawn": self.drawn}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "WorkerState":
        return cls(int(d["round"]), StreamPosition(int(d["pass"]), int(d["shard"]), int(d["sample"])), int(d["drawn"]))


def _difference(a: SamplingStats, b: SamplingStats) -> SamplingStats:
    return SamplingStats(**{k: v - getattr(b, k) for k, v in a.to_dict().items()})


def crop_batch(pool: Sequence[dict], batch: Batch, out: np.ndarray, scratch: dict | None = None) -> np.ndarray:
    """Fill ``out`` (N*M, L, n_mels) with the crops ``batch`` names (as draw_round would), casting to its dtype.

    Crops are copied as stored, then cast in one go by torch where the dtypes differ: numpy's
    float16 -> float32 cast is ~8x slower than torch's. ``scratch`` keeps that staging buffer.
    """
    L = batch.seg_len
    assert out.shape[:2] == (len(batch.pool_index), L), f"out {out.shape} for {len(batch.pool_index)} rows of {L}"
    stored = pool[batch.pool_index[0]]["mel"].dtype.newbyteorder("=")
    cast = stored != out.dtype and out.dtype.isnative and stored.kind == "f" and out.dtype.kind == "f"
    if cast:
        scratch = {} if scratch is None else scratch
        stage = scratch.get((out.shape, stored))
        if stage is None:
            scratch.clear()  # one shape at a time (L may vary per batch)
            stage = scratch[out.shape, stored] = np.empty(out.shape, stored)
    else:
        stage = out
    ramp = None
    for r, (p, o) in enumerate(zip(batch.pool_index.tolist(), batch.offset.tolist())):
        mel = pool[p]["mel"]
        T = mel.shape[0]
        if T >= L:
            stage[r] = mel[o:o + L]
        else:  # "repeat": tile from the wrap start
            if ramp is None:
                ramp = np.arange(L, dtype=np.int64)
            stage[r] = mel[(ramp + o) % T]
    if cast:
        torch.from_numpy(out).copy_(torch.from_numpy(stage))
    return out


Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def consumer_batches(urls: Sequence[str], settings: BatchSettings, consumer: Consumer,
                     state: WorkerState | None = None, *, dtype: Any = None,
                     allocate: Allocate | None = None) -> Iterator[tuple[Batch, WorkerState, SamplingStats]]:
    """Endless (batch, state after it, stats of it) for one consumer, resuming from ``state``.

    ``batch.mels`` is (N*M, L, n_mels) in ``dtype`` (default: as stored, float16), in a buffer
    from ``allocate(shape, dtype)`` where given (e.g. shared memory), else a new array.
    The shard stream stays open from one pool to the next; ``state`` records where each pool began.
    """
    state = WorkerState.from_dict(state.to_dict()) if state else WorkerState()
    stream = SampleStream(urls, consumer, settings.seed, settings.on_error, settings.exclude_speakers)
    seen: set[str] = set()  # keys in the pool being read: a pool holds an utterance once
    scratch: dict = {}  # crop_batch's staging buffer
    samples = stream.samples(state.start, skip_key=seen.__contains__)
    carry = SamplingStats()
    while True:
        pool: list[dict] = []
        seen.clear()
        next_start = state.start
        stream.release_consumed()  # the last pool is gone
        for pos, sample in samples:
            next_start = pos
            if sample is None or sample["__key__"] in seen:  # the pool wrapped around the consumer's data
                if pos.pass_ > state.start.pass_ + 1:
                    break
                continue
            seen.add(sample["__key__"])
            pool.append(sample)
            if len(pool) >= settings.pool:
                break
        rng = np.random.default_rng([settings.seed, consumer.rank, consumer.worker, state.round])
        stats = SamplingStats()  # draw_round updates it as the round goes
        reported = SamplingStats()  # what earlier batches of the round already reported
        drawn_before = state.drawn
        produced = 0
        out_dtype = np.dtype(dtype) if dtype is not None else (pool[0]["mel"].dtype if pool else np.float16)
        for batch in draw_round(pool, settings.n_speakers, settings.n_utterances, settings.seg_len, rng,
                                settings.max_uses, settings.short_policy, settings.min_frames, stats,
                                materialize=False, skip=drawn_before):
            produced += 1
            state.drawn = drawn_before + produced
            delta = _difference(stats, reported) + carry
            reported, carry = SamplingStats(**stats.to_dict()), SamplingStats()
            shape = (len(batch.pool_index), batch.seg_len, pool[0]["mel"].shape[1])
            out = allocate(shape, out_dtype) if allocate is not None else np.empty(shape, out_dtype)
            mels = crop_batch(pool, batch, out, scratch)
            yield batch._replace(mels=mels), WorkerState.from_dict(state.to_dict()), delta
        carry += _difference(stats, reported)  # end-of-round counts ride on the next batch
        if drawn_before + produced == 0:
            speakers = len({s["speaker_index"] for s in pool})
            raise DvectorError(
                f"cannot form a batch of {settings.n_speakers} speakers x {settings.n_utterances} utterances: "
                f"this process's share of the data holds {len(pool)} usable utterances of {speakers} speakers "
                f"(consumer {consumer}); lower -n/-m, use fewer workers, or add data")
        state = WorkerState(state.round + 1, next_start, 0)


# ---- torch DataLoader ---------------------------------------------------------------------------

def distributed_rank_world() -> tuple[int, int]:
    """Rank and world size from torch.distributed, else the torchrun environment, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


_NUMPY_OF = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _new_shared_storage(nbytes: int) -> torch.UntypedStorage:
    try:
        return torch.UntypedStorage._new_shared(nbytes)  # straight in shared memory: no copy
    except (AttributeError, RuntimeError, TypeError):  # private API gone: the plain way
        return torch.empty(nbytes, dtype=torch.uint8).share_memory_().untyped_storage()


def _storage_users(tensor: torch.Tensor) -> int:
    """How many tensors, arrays and storage handles share ``tensor``'s memory (views and .numpy() included)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def _ring_baseline() -> int | None:
    """Users of a batch that only the loader holds (its tensor and storage handle); None if not measurable."""
    try:
        t = torch.empty(4)
        kept = t.untyped_storage()
        base = _storage_users(t)
        view, array = t[1:], t.detach().numpy()
        if _storage_users(t) != base + 2:
            return None
        del view, array
        return base if _storage_users(t) == base and kept is not None else None
    except Exception:  # the private use count is gone: no reuse, fresh buffers
        return None


RING_SLOTS = 4  # reusable batch buffers per worker beyond the DataLoader's prefetch


class BatchRing:
    """Shared-memory batch buffers that a worker reuses once the main process has let go of them.

    A fresh shared-memory buffer per batch costs more than building the batch (creating, zeroing
    and faulting in 16 MB of shared pages, then mapping them again in the main process); reused
    buffers cost nothing. ``free[worker, slot]`` (shared memory, made before the workers fork)
    says which buffers the worker may write. The main process sets a flag back only when no
    tensor, view or array of that batch is left outside the loader (the storage's use count), so
    a batch the consumer still holds is never overwritten; when no slot is free the worker simply
    takes a fresh buffer.
    """

    def __init__(self, free: torch.Tensor):
        self.free = free.numpy()  # (slots,) of this worker, shared with the main process
        self.storages: list[torch.UntypedStorage | None] = [None] * len(self.free)
        self.next = 0

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        """(slot or -1, an uninitialised (shape) tensor in shared memory)."""
        nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        for k in range(len(self.free)):
            slot = (self.next + k) % len(self.free)
            if self.free[slot]:
                self.free[slot] = 0
                self.next = slot + 1
                storage = self.storages[slot]
                if storage is None or storage.nbytes() < nbytes:
                    storage = self.storages[slot] = _new_shared_storage(nbytes)
                return slot, torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        return -1, torch.empty(0, dtype=dtype).set_(_new_shared_storage(nbytes), 0, shape)


class GE2EDataset(IterableDataset):
    """Endless GE2E batches of this rank; each DataLoader worker streams its own slice.

    Yields ``(mels, speakers, worker, state, stats, slot)``: ``mels`` a (N*M, L, n_mels) tensor
    of ``dtype`` (float16, float32 or float64; inside a DataLoader worker built in shared memory,
    in ring buffer ``slot`` of :class:`BatchRing` where ``free`` is given, else -1), ``speakers``
    the (N*M,) int64 speaker ids as bytes (a tiny tensor would cost a shared-memory file of its own).
    """

    def __init__(self, urls: Sequence[str], settings: BatchSettings, rank: int, world: int, workers: int,
                 states: dict[int, WorkerState] | None = None, rotation: int = 0,
                 dtype: torch.dtype = torch.float32, free: torch.Tensor | None = None):
        super().__init__()
        if dtype not in _NUMPY_OF:
            raise DvectorError(f"batches come as float16, float32 or float64, not {dtype}")
        self.urls, self.settings, self.rank, self.world = list(urls), settings, rank, world
        self.workers, self.states, self.rotation, self.dtype = max(1, workers), states or {}, rotation, dtype
        self.free = free

    def __iter__(self) -> Iterator[tuple[torch.Tensor, bytes, int, dict, dict, int]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.workers  # the DataLoader always starts at worker 0
        consumer = Consumer(self.rank, self.world, worker, self.workers)
        allocate: Allocate | None = None
        last: list[tuple[int, torch.Tensor]] = []
        if info is not None:  # in a worker process: build batches in shared memory
            ring = BatchRing(self.free[physical]) if self.free is not None else None

            def allocate(shape: tuple[int, ...], np_dtype: np.dtype) -> np.ndarray:
                if ring is not None:
                    slot, tensor = ring.allocate(shape, self.dtype)
                else:
                    slot = -1
                    tensor = torch.empty(0, dtype=self.dtype).set_(
                        _new_shared_storage(int(np.prod(shape)) * np.dtype(np_dtype).itemsize), 0, shape)
                last[:] = [(slot, tensor)]
                return tensor.numpy()

        for batch, state, stats in consumer_batches(self.urls, self.settings, consumer, self.states.get(worker),
                                                    dtype=_NUMPY_OF[self.dtype], allocate=allocate):
            slot, mels = last.pop() if allocate is not None else (-1, torch.from_numpy(batch.mels))
            yield mels, batch.speaker_index.astype(np.int64).tobytes(), worker, state.to_dict(), stats.to_dict(), slot


class GE2ELoader:
    """Iterable of ``(mels, speakers)``: mels ``(N*M, L, n_mels)`` tensor, speakers ``(N*M,)`` int64.

    Endless; count steps yourself. ``state_dict()``/``load_state_dict()`` save and restore the
    position of every worker of this rank; ``stats`` adds up what sampling dropped, tiled and used.

    With ``workers > 0`` batches come from DataLoader worker processes (forked), built there in
    ``dtype`` straight into shared memory. ``reuse_buffers`` lets a worker refill a batch buffer
    once nothing outside the loader references that batch any more (see :class:`BatchRing`):
    a batch you keep (or a view, or a ``.numpy()`` of it) is never overwritten.
    """

    def __init__(self, source: ShardSource, settings: BatchSettings, workers: int = 2, rank: int | None = None,
                 world: int | None = None, dtype: torch.dtype = torch.float32, pin_memory: bool = False,
                 prefetch: int = 4, reuse_buffers: bool = True):
        r, w = distributed_rank_world()
        self.source, self.settings = source, settings
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.workers, self.dtype, self.pin_memory, self.prefetch = workers, dtype, pin_memory, prefetch
        self.reuse_buffers = reuse_buffers  # workers recycle shared-memory batch buffers (see BatchRing)
        # what workers build and send: the final dtype where numpy has it (no conversion here), else float32
        self.transfer_dtype = dtype if dtype in _NUMPY_OF else torch.float32
        self.states: dict[int, WorkerState] = {}
        self.next_worker = 0
        self.stats = SamplingStats()
        self.n_mels = source.index["config"]["features"]["n_mels"] if source.index else None

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.shape_key(), "rank": self.rank, "world": self.world,
                "workers": self.workers, "next_worker": self.next_worker,
                "states": {str(k): v.to_dict() for k, v in self.states.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore a position; False (and a fresh start) when the batch settings, world or workers differ."""
        same = (state.get("settings") == self.settings.shape_key() and state.get("world") == self.world
                and state.get("workers") == self.workers)
        if not same:
            log.warning("data stream: batch settings, world size or workers changed; starting a new stream")
            self.states, self.next_worker = {}, 0
            return False
        self.states = {int(k): WorkerState.from_dict(v) for k, v in state["states"].items()}
        self.next_worker = int(state["next_worker"])
        return True

    def restart_at_new_pass(self) -> None:
        """Start a deterministic new stream after the last pass any worker reached."""
        last = max((s.start.pass_ for s in self.states.values()), default=-1)
        self.states = {k: WorkerState(round=10**6 * (last + 1), start=StreamPosition(last + 1, 0, 0))
                       for k in range(max(1, self.workers))}
        self.next_worker = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = max(0, self.workers)
        rotation = self.next_worker
        free = None
        baseline = _ring_baseline() if workers > 0 and self.reuse_buffers else None
        if baseline is not None:
            free = torch.ones(workers, self.prefetch + RING_SLOTS, dtype=torch.uint8).share_memory_()
        dataset = GE2EDataset(self.source.urls, self.settings, self.rank, self.world, workers,
                              dict(self.states), rotation=rotation, dtype=self.transfer_dtype, free=free)
        if workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                                      prefetch_factor=self.prefetch, persistent_workers=False,
                                      multiprocessing_context="fork" if os.name == "posix" else None))
        # Ring buffers handed out and not given back yet: (tensor, physical worker, slot); and a
        # handle on each buffer's storage, so that the next batch in it maps to the same memory.
        lent: list[tuple[torch.Tensor, int, int]] = []
        kept: dict[tuple[int, int], torch.UntypedStorage] = {}
        try:
            for mels, speakers, worker, state, stats, slot in batches:
                self.states[int(worker)] = WorkerState.from_dict(state)
                self.next_worker = (int(worker) + 1) % max(1, workers)
                self.stats += SamplingStats(**stats)
                if free is not None:
                    still = []
                    for tensor, w, k in lent:  # give back what the consumer no longer holds
                        if _storage_users(tensor) <= baseline:
                            free[w, k] = 1
                        else:
                            still.append((tensor, w, k))
                    lent = still
                speakers = torch.from_numpy(np.frombuffer(speakers, dtype=np.int64).copy())
                out = mels.to(self.dtype)
                if slot >= 0 and free is not None:
                    physical = (int(worker) - rotation) % workers
                    if mels.is_shared() and out.data_ptr() == mels.data_ptr():  # the consumer gets the buffer
                        kept[physical, slot] = mels.untyped_storage()
                        out = mels.detach()  # a tensor of its own, counted apart from ours
                        lent.append((mels, physical, slot))
                    else:  # the consumer got a copy (pinned or converted): the buffer is free again
                        free[physical, slot] = 1
                    del mels
                yield out, speakers
                del out
        finally:
            lent.clear()
            kept.clear()
            # Stop the workers now, while the DataLoader's queues are intact: left to the garbage
            # collector (an exception's traceback keeps the iterator in a cycle), shutting down
            # can find the queues finalized first and wait 5 s per worker before killing them.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def ge2e_loader(shards: str | os.PathLike[str] | Sequence[str], n_speakers: int = 64, n_utterances: int = 10,
                seg_len: SegLen = 160, workers: int = 2, seed: int = 0, index: str | None = None,
                **options: Any) -> GE2ELoader:
    """Speaker-balanced GE2E batches streamed from shards; see :class:`GE2ELoader`.

    ``shards``: a folder with index.json, a brace pattern, a list of URLs, or ``file://``,
    ``http(s)://`` and ``pipe:`` URLs. ``options``: :class:`BatchSettings` fields (pool_size,
    max_uses, short_policy, min_frames, on_error, exclude_speakers) and GE2ELoader's (rank, world,
    dtype, pin_memory, prefetch, reuse_buffers).
    """
    loader_keys = {"rank", "world", "dtype", "pin_memory", "prefetch", "reuse_buffers"}
    loader_opts = {k: v for k, v in options.items() if k in loader_keys}
    settings = BatchSettings(n_speakers=n_speakers, n_utterances=n_utterances, seg_len=seg_len, seed=seed,
                             **{k: v for k, v in options.items() if k not in loader_keys})
    return GE2ELoader(resolve_shards(shards, index), settings, workers=workers, **loader_opts)
