"""The shard format (version 1): write one shard atomically, read samples back, read/write the index.

A shard is an uncompressed tar written with webdataset's ``TarWriter``; each utterance is a sample
of two members sharing a key: ``KEY.mel.npy`` (float16 ``(frames, n_mels)``, ``np.save``) and
``KEY.json`` (speaker, speaker_index, source, n_frames, duration_s, vad). Only those two member
types are ever decoded, ``.npy`` with ``allow_pickle=False``: a shard made elsewhere cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import webdataset as wds
from webdataset.tariterators import tarfile_samples

from dvector.errors import DvectorError

FORMAT_NAME = "dvector-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SHARD_PREFIX = "shard-"
TAR_MTIME = 0  # fixed, so that the same input gives byte-identical shards
MEL_MEMBER = "mel.npy"
META_MEMBER = "json"


def shard_name(number: int) -> str:
    return f"{SHARD_PREFIX}{number:06d}.tar"


def temp_name(path: Path) -> Path:
    """Where a file is written before its atomic rename: hidden, and unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@dataclass
class ShardInfo:
    name: str
    samples: int = 0
    frames: int = 0
    bytes: int = 0
    sha256: str = ""
    speakers: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_sample(key: str, mel: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """A webdataset sample dict of bytes for one utterance."""
    assert "." not in key, f"sample keys hold no dots: {key!r}"
    assert mel.ndim == 2 and mel.dtype == np.float16, f"mel must be float16 (frames, n_mels), got {mel.dtype} {mel.shape}"
    buf = io.BytesIO()
    np.save(buf, mel, allow_pickle=False)
    text = json.dumps(meta, sort_keys=True, ensure_ascii=True)
    return {"__key__": key, MEL_MEMBER: buf.getvalue(), META_MEMBER: text.encode("ascii")}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only stream that hashes what passes through it (saves reading the shard again)."""

    def __init__(self, stream: Any):
        self.stream, self.digest, self.bytes = stream, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


def write_shard(path: Path, samples: Iterable[tuple[str, np.ndarray, dict[str, Any]]]) -> ShardInfo:
    """Write ``(key, mel, meta)`` samples to ``path`` atomically and describe what was written."""
    tmp = temp_name(path)
    info = ShardInfo(name=path.name)
    speakers: set[int] = set()
    try:
        with open(tmp, "wb") as stream:
            hashing = _HashingWriter(stream)
            with wds.TarWriter(hashing, encoder=False, mtime=TAR_MTIME) as writer:
                for key, mel, meta in samples:
                    writer.write(encode_sample(key, mel, meta))
                    info.samples += 1
                    info.frames += int(mel.shape[0])
                    speakers.add(int(meta["speaker_index"]))
            stream.flush()
            os.fsync(stream.fileno())
        info.bytes = tmp.stat().st_size
        assert info.bytes == hashing.bytes, f"wrote {hashing.bytes} bytes but the file has {info.bytes}"
        info.sha256 = hashing.digest.hexdigest()
        info.speakers = sorted(speakers)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return info


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = temp_name(path)
    try:
        with open(tmp, "w", encoding="ascii") as f:
            json.dump(data, f, indent=1, sort_keys=True, ensure_ascii=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Turn a raw webdataset sample (bytes) into ``{"__key__", "mel", **meta}``; ValueError if invalid.

    Members other than ``mel.npy`` and ``json`` are ignored, never decoded.
    """
    key = raw.get("__key__", "?")
    if MEL_MEMBER not in raw or META_MEMBER not in raw:
        raise ValueError(f"sample {key!r} lacks {MEL_MEMBER} or {META_MEMBER}")
    try:
        mel = np.load(io.BytesIO(raw[MEL_MEMBER]), allow_pickle=False)
    except (EOFError, OSError) as exc:  # an empty or cut member; np.load raises ValueError for the rest
        raise ValueError(f"sample {key!r}: cannot read {MEL_MEMBER}: {exc}") from exc
    if mel.ndim != 2 or mel.shape[0] < 1:
        raise ValueError(f"sample {key!r}: mel has shape {mel.shape}, expected (frames, n_mels)")
    meta = json.loads(raw[META_MEMBER])
    if not isinstance(meta, dict) or "speaker_index" not in meta:
        raise ValueError(f"sample {key!r}: metadata lacks speaker_index")
    return {**meta, "__key__": key, "__url__": raw.get("__url__"), "mel": mel}


def iter_raw_samples(url: str, handler: Callable[[Exception], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard URL (a path, ``file://``, ``http(s)://`` or ``pipe:``), via webdataset.

    ``handler`` decides on errors like webdataset's handlers: return True to skip and go on.
    """
    kwargs = {} if handler is None else {"handler": handler}
    return tarfile_samples([{"url": url}], **kwargs)


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard; raises on any corrupt member or truncated tar."""
    for raw in iter_raw_samples(url):
        yield decode_sample(raw)


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://") or location.startswith("pipe:")


def read_index(location: str | os.PathLike[str]) -> dict[str, Any]:
    """The index of a shard folder (a local path, or a URL of the folder or of index.json itself)."""
    loc = str(location)
    target = loc if loc.endswith(".json") else loc.rstrip("/") + "/" + INDEX_NAME
    try:
        if is_remote(target):
            with wds.gopen(target, "rb") as f:
                data = json.load(f)
        else:
            path = Path(target[len("file://"):] if target.startswith("file://") else target)
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
    except FileNotFoundError as exc:
        raise DvectorError(f"no {INDEX_NAME} at {target}: build shards with `dvector build-shards`, or rebuild it with `dvector index DIR`") from exc
    except (OSError, ValueError) as exc:
        raise DvectorError(f"cannot read {target}: {exc}") from exc
    check_index(data, target)
    return data


def check_index(data: Any, where: str) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise DvectorError(f"{where} is not a dvector shard index")
    if data.get("version") != FORMAT_VERSION:
        raise DvectorError(f"{where} has shard format version {data.get('version')}; this dvector reads version {FORMAT_VERSION}")
