"""The shard format (version 1): names, the sample encoding, and writing one shard atomically.

A shard is an uncompressed tar written with webdataset's ``TarWriter``; each utterance is a sample
of two members sharing a key: ``KEY.mel.npy`` (float16 ``(frames, n_mels)``, ``np.save``) and
``KEY.json`` (speaker, speaker_index, source, n_frames, duration_s, vad). Only those two member
types are ever decoded (:mod:`dvector.shards.reader`), never unpickled: a shard made elsewhere cannot
run code. The index beside the shards is :mod:`dvector.shards.index`'s.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import webdataset as wds

from dvector.files import atomic_write, fsync_path

FORMAT_NAME = "dvector-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SHARD_PREFIX = "shard-"
TAR_MTIME = 0  # fixed, so that the same input gives byte-identical shards
MEL_MEMBER = "mel.npy"
META_MEMBER = "json"


def shard_name(number: int) -> str:
    return f"{SHARD_PREFIX}{number:06d}.tar"


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://") or location.startswith("pipe:")


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
    info = ShardInfo(name=path.name)
    speakers: set[int] = set()
    with atomic_write(path, sync=False) as tmp:
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
    fsync_path(path.parent)
    return info
