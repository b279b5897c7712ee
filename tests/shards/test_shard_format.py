"""Tests for dvector.shards.format: the shard format, atomic writes, safe decoding and the index reader."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from build_helpers import read_back
from dvector.errors import DvectorError
from dvector.files import sha256_file, temp_name, write_json_atomic
from dvector.shards.format import FORMAT_NAME, FORMAT_VERSION, encode_sample, shard_name, write_shard
from dvector.shards.index import read_index
from dvector.shards.reader import decode_sample, iter_raw_samples, iter_shard


def make_samples(n: int, seed: int = 0) -> list[tuple[str, np.ndarray, dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frames = int(rng.integers(5, 40))
        mel = rng.standard_normal((frames, 8)).astype(np.float16)
        meta = {"speaker": f"root/spk{i % 3}", "speaker_index": i % 3, "source": f"spk{i % 3}/u{i}.wav",
                "n_frames": frames, "duration_s": frames / 100, "vad": 0.9}
        out.append((f"s{i % 3:06d}u{i:09d}", mel, meta))
    return out


def test_shard_name() -> None:
    assert shard_name(0) == "shard-000000.tar" and shard_name(123456) == "shard-123456.tar"


def test_write_shard_round_trip(tmp_path: Path) -> None:
    samples = make_samples(7)
    info = write_shard(tmp_path / shard_name(3), samples)
    path = tmp_path / shard_name(3)
    assert info.name == path.name and info.samples == 7
    assert info.frames == sum(m.shape[0] for _, m, _ in samples)
    assert info.bytes == path.stat().st_size and info.sha256 == sha256_file(path)
    assert info.speakers == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file is left behind
    back = list(iter_shard(str(path)))
    assert [s["__key__"] for s in back] == [k for k, _, _ in samples]
    for got, (key, mel, meta) in zip(back, samples):
        assert got["mel"].dtype == np.float16
        np.testing.assert_array_equal(got["mel"], mel)
        assert {k: got[k] for k in meta} == meta
    # plain webdataset reads the same
    plain = read_back(tmp_path)
    assert [s["key"] for s in plain] == [k for k, _, _ in samples]


def test_shard_is_a_plain_deterministic_tar(tmp_path: Path) -> None:
    samples = make_samples(4)
    write_shard(tmp_path / "a.tar", samples)
    write_shard(tmp_path / "b.tar", samples)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:  # uncompressed POSIX tar
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{k}.{ext}" for k, _, _ in samples for ext in ("json", "mel.npy")]
        assert all(m.mtime == 0 and m.isfile() for m in members)
        npy = tar.extractfile(f"{samples[0][0]}.mel.npy").read()
        np.testing.assert_array_equal(np.load(io.BytesIO(npy), allow_pickle=False), samples[0][1])
        meta = json.loads(tar.extractfile(f"{samples[0][0]}.json").read())
        assert meta == samples[0][2]


def test_no_partial_file_under_the_final_name(tmp_path: Path) -> None:
    final = tmp_path / shard_name(0)
    seen = []

    def samples():
        for s in make_samples(5):
            seen.append(final.exists())
            assert temp_name(final).exists()  # the data goes to the temporary file meanwhile
            yield s

    write_shard(final, samples())
    assert seen == [False] * 5 and final.exists() and not temp_name(final).exists()


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / shard_name(1)

    def samples():
        yield from make_samples(3)
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        write_shard(final, samples())
    assert os.listdir(tmp_path) == []


def test_temp_names_are_hidden_and_per_process(tmp_path: Path) -> None:
    tmp = temp_name(tmp_path / "shard-000001.tar")
    assert tmp.name.startswith(".shard-000001.tar.tmp-") and str(os.getpid()) in tmp.name
    assert not tmp.name.endswith(".tar")


def test_encode_sample_refuses_bad_input() -> None:
    mel = np.zeros((3, 4), np.float16)
    with pytest.raises(AssertionError):
        encode_sample("a.b", mel, {"speaker_index": 0})
    with pytest.raises(AssertionError):
        encode_sample("ab", mel.astype(np.float32), {"speaker_index": 0})
    sample = encode_sample("ab", mel, {"speaker_index": 0, "source": "caf\u00e9"})
    assert sample["json"].isascii()


def test_decode_sample_never_unpickles() -> None:
    evil = io.BytesIO()
    np.save(evil, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    raw = {"__key__": "k", "mel.npy": evil.getvalue(), "json": b'{"speaker_index": 0}'}
    with pytest.raises(ValueError):
        decode_sample(raw)
    good = encode_sample("k", np.ones((2, 3), np.float16), {"speaker_index": 0})
    good["pyd"] = pickle.dumps(object())  # an unknown member is ignored, never decoded
    good["pickle"] = b"\x80garbage that would fail to unpickle"
    out = decode_sample(good)
    assert set(out) == {"__key__", "__url__", "mel", "speaker_index"}


@pytest.mark.parametrize("raw", [
    {"__key__": "k", "json": b'{"speaker_index": 0}'},
    {"__key__": "k", "mel.npy": b"", "json": b'{"speaker_index": 0}'},
    {"__key__": "k", "mel.npy": None, "json": b"[1, 2]"},
    {"__key__": "k", "mel.npy": None, "json": b'{"speaker": "x"}'},
    {"__key__": "k", "mel.npy": "1d", "json": b'{"speaker_index": 0}'},
])
def test_decode_sample_rejects_invalid(raw: dict) -> None:
    if raw.get("mel.npy") is None and "mel.npy" in raw:
        raw["mel.npy"] = encode_sample("k", np.ones((2, 3), np.float16), {"speaker_index": 0})["mel.npy"]
    elif raw.get("mel.npy") == "1d":
        buf = io.BytesIO()
        np.save(buf, np.ones(5, np.float16))
        raw["mel.npy"] = buf.getvalue()
    with pytest.raises(ValueError):
        decode_sample(raw)


def test_iter_shard_raises_on_truncated_tar(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.tar", make_samples(6))
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(Exception):
        list(iter_shard(str(tmp_path / "cut.tar")))
    skipped = []
    got = list(iter_raw_samples(str(tmp_path / "cut.tar"), handler=lambda exc: skipped.append(exc) or True))
    assert len(got) < 6 and skipped


def test_write_json_atomic(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "x.json", {"b": 1, "a": ["\u00e9"]})
    text = (tmp_path / "x.json").read_text(encoding="ascii")
    assert json.loads(text) == {"a": ["\u00e9"], "b": 1} and text.index('"a"') < text.index('"b"')
    assert os.listdir(tmp_path) == ["x.json"]


def test_read_index_errors(tmp_path: Path) -> None:
    with pytest.raises(DvectorError, match="dvector index"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DvectorError, match="cannot read"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DvectorError, match="not a dvector shard index"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION + 1}))
    with pytest.raises(DvectorError, match="version"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "shards": []}))
    assert read_index(tmp_path)["shards"] == []
    assert read_index(f"file://{tmp_path}/index.json")["version"] == FORMAT_VERSION
    assert read_index(str(tmp_path) + "/")["format"] == FORMAT_NAME
