"""Hostile and damaged shards through the one reader (dvector.shards.reader): non-finite mels, odd
mel widths, absurd speaker indices, oversized members, truncation; the same verdict for the stream,
`dvector check` and embedding of a shard folder.

Shards are written member by member with ``tarfile`` (not the package's writer, which may refuse
what these tests need to store).
"""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

from dvector.config import ModelConfig
from dvector.files import sha256_file, write_json_atomic
from dvector.shards.check import check_shards
from dvector.shards.format import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, shard_name
from dvector.shards.reader import (
    MAX_MEL_BYTES,
    MAX_META_BYTES,
    SampleChecks,
    ShardFormatError,
    decode_sample,
    iter_shard,
    read_samples,
)
from dvector.stream.samples import SampleStream
from dvector.stream.sources import Consumer

N_MELS = 8


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def good_mel(frames: int = 20, seed: int = 0, n_mels: int = N_MELS) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((frames, n_mels)).astype(np.float16)


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_raw(path: Path, samples: list[tuple[str, np.ndarray | bytes, dict]]) -> dict:
    """A shard of (key, mel or raw .npy bytes, meta) samples; returns its index entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, mel, meta in samples:
            add(tar, f"{key}.json", json.dumps(meta).encode())
            add(tar, f"{key}.mel.npy", mel if isinstance(mel, bytes) else npy(mel))
    mels = [m for _, m, _ in samples if isinstance(m, np.ndarray)]
    return {"name": path.name, "samples": len(samples), "frames": sum(m.shape[0] for m in mels),
            "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "speakers": sorted({int(meta["speaker_index"]) for _, _, meta in samples})}


def plain(n: int, speakers: int = 3, prefix: str = "k") -> list[tuple[str, np.ndarray, dict]]:
    return [(f"{prefix}{i:03d}", good_mel(10 + i, i), {"speaker_index": i % speakers, "source": f"u{i}.wav"})
            for i in range(n)]


def with_index(folder: Path, entries: list[dict], n_speakers: int = 3) -> Path:
    write_json_atomic(folder / INDEX_NAME, {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "config": {"features": {"n_mels": N_MELS}},
        "speakers": [{"id": f"t/s{s}", "index": s} for s in range(n_speakers)], "shards": entries, "failures": []})
    return folder


def bad_of(url: str, **kw) -> tuple[list[str], list[tuple[str, str]]]:
    """(keys read, [(key, reason)] of the bad samples) of one shard."""
    bad: list[tuple[str, str]] = []
    keys = [s["__key__"] for _, s in read_samples(url, on_bad_sample=lambda u, k, e: bad.append((k, str(e))), **kw)]
    return keys, bad


# ---- item 3: non-finite mels ---------------------------------------------------------------------

@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_a_non_finite_mel_is_a_bad_sample_everywhere(tmp_path: Path, value: float) -> None:
    samples = plain(6)
    poisoned = samples[2][1].copy()
    poisoned[3, 1] = value
    samples[2] = (samples[2][0], poisoned, samples[2][2])
    folder = tmp_path / "shards"
    entry = write_raw(folder / shard_name(0), samples)
    url = str(folder / shard_name(0))
    # the reader: that sample is bad, named with its reason; the others are read
    keys, bad = bad_of(url)
    assert keys == [k for k, _, _ in samples if k != "k002"]
    assert bad == [("k002", "mel holds 1 non-finite values (inf or NaN)")]
    with pytest.raises(ValueError, match="non-finite"):
        decode_sample({"__key__": "k002", "mel.npy": npy(poisoned), "json": b'{"speaker_index": 0}'})
    # the stream: skipped with a warning naming shard and key, and counted
    stream = SampleStream([url], Consumer(), 0)
    with pytest.warns(RuntimeWarning, match=r"shard-000000\.tar, sample 'k002'.*non-finite"):
        got = [s["__key__"] for _, s in stream.shard_samples(url, 0, 1, 0)]
    assert got == keys and (stream.bad_samples, stream.bad_shards) == (1, 0)
    # iter_shard (validation, embed) and `dvector check`: the shard is reported
    with pytest.raises(ShardFormatError, match=r"shard-000000\.tar.*k002.*non-finite"):
        list(iter_shard(url))
    report = check_shards(with_index(folder, [entry]))
    assert [(name, "non-finite" in why) for name, why in report.problems] == [(shard_name(0), True)]


def test_float32_and_other_byte_orders_are_checked_too(tmp_path: Path) -> None:
    bad = good_mel().astype(">f4")
    bad[0, 0] = np.nan
    write_raw(tmp_path / "s.tar", [("a", good_mel().astype(np.float32), {"speaker_index": 0}),
                                   ("b", bad, {"speaker_index": 0})])
    keys, problems = bad_of(str(tmp_path / "s.tar"))
    assert keys == ["a"] and [k for k, _ in problems] == ["b"]


# ---- item 9: another mel width, an absurd speaker_index -------------------------------------------

def test_a_sample_of_another_mel_width_is_skipped_and_counted(tmp_path: Path) -> None:
    samples = plain(6)
    samples[3] = ("odd", good_mel(12, 3, n_mels=N_MELS - 2), {"speaker_index": 0})
    url = str(tmp_path / "s.tar")
    write_raw(tmp_path / "s.tar", samples)
    keys, bad = bad_of(url)  # learned from the first good sample
    assert "odd" not in keys and len(keys) == 5 and bad[0][0] == "odd" and "6 bands" in bad[0][1]
    with pytest.raises(ShardFormatError, match=r"s\.tar.*'odd'.*6 bands"):
        list(iter_shard(url))
    # told by the index: an odd first sample is the one refused
    first_odd = [("odd", good_mel(12, 3, n_mels=N_MELS - 2), {"speaker_index": 0})] + plain(4)
    write_raw(tmp_path / "f.tar", first_odd)
    keys, bad = bad_of(str(tmp_path / "f.tar"), checks=SampleChecks(n_mels=N_MELS))
    assert [k for k, _ in bad] == ["odd"] and len(keys) == 4
    # a stream learns once for all its shards
    stream = SampleStream([url, str(tmp_path / "f.tar")], Consumer(), 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [s for u in (url, str(tmp_path / "f.tar")) for _, s in stream.shard_samples(u, 0, 1, 0)]
    assert {s["mel"].shape[1] for s in got} == {N_MELS} and len(got) == 9
    assert stream.bad_samples == 2 and sum("bands" in str(w.message) for w in caught) == 2


@pytest.mark.parametrize("speaker", [-1, 2**31, 2**62, 2**64, 5])
def test_an_absurd_or_unknown_speaker_index_is_a_bad_sample(tmp_path: Path, speaker: int) -> None:
    samples = plain(5)
    samples[1] = ("weird", good_mel(), {"speaker_index": speaker})
    folder = tmp_path / "shards"
    entry = write_raw(folder / shard_name(0), samples)
    url = str(folder / shard_name(0))
    keys, bad = bad_of(url, checks=SampleChecks(max_speaker_index=2))  # the index knows 3 speakers
    assert "weird" not in keys and len(keys) == 4 and bad[0][0] == "weird" and "speaker_index" in bad[0][1]
    stream = SampleStream([url], Consumer(), 0, max_speaker_index=2)
    with pytest.warns(RuntimeWarning, match=r"sample 'weird'.*speaker_index"):
        assert len(list(stream.shard_samples(url, 0, 1, 0))) == 4
    assert stream.bad_samples == 1
    if speaker != 5:  # absurd whatever the index says
        assert "weird" not in bad_of(url)[0]
    report = check_shards(with_index(folder, [entry]))  # check knows the index's 3 speakers
    assert report.problems and "speaker_index" in report.problems[0][1]


# ---- item 10: bounded members -------------------------------------------------------------------

def sparse_member_shard(path: Path, size: int) -> None:
    """A shard whose second sample's mel member claims ``size`` bytes (zeros, a sparse file)."""
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            add(tar, "a.json", b'{"speaker_index": 0}')
            add(tar, "a.mel.npy", npy(good_mel()))
            add(tar, "b.json", b'{"speaker_index": 1}')
            info = tarfile.TarInfo("b.mel.npy")
            info.size = size
            tar.addfile(info)  # header only; the data follows as a hole
            f.seek(size + (-size % 512), io.SEEK_CUR)
            add(tar, "c.json", b'{"speaker_index": 2}')
            add(tar, "c.mel.npy", npy(good_mel()))


def test_a_huge_member_is_a_bad_sample_never_read_into_memory(tmp_path: Path) -> None:
    size = MAX_MEL_BYTES + 4096
    sparse_member_shard(tmp_path / "huge.tar", size)
    tracemalloc.start()
    try:
        keys, bad = bad_of(str(tmp_path / "huge.tar"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert keys == ["a", "c"] and bad == [("b", f"member b.mel.npy holds {size} bytes, over the limit of {MAX_MEL_BYTES}")]
    assert peak < MAX_MEL_BYTES // 4, f"{peak} bytes allocated: the member was read"


def test_a_huge_json_member_is_a_bad_sample(tmp_path: Path) -> None:
    meta = {"speaker_index": 0, "pad": "x" * (MAX_META_BYTES + 1)}
    write_raw(tmp_path / "s.tar", plain(2) + [("big", good_mel(), meta)] + plain(2, prefix="z"))
    keys, bad = bad_of(str(tmp_path / "s.tar"))
    assert len(keys) == 4 and bad[0][0] == "big" and "over the limit" in bad[0][1]


# ---- item 5: truncated shards through iter_shard ---------------------------------------------------

@pytest.mark.parametrize("cut", ["half", "in the last member", "no end blocks", "one end block"])
def test_iter_shard_on_a_truncated_shard_raises_naming_it(tmp_path: Path, cut: str) -> None:
    write_raw(tmp_path / "whole.tar", plain(8))
    data = (tmp_path / "whole.tar").read_bytes()
    content = len(data.rstrip(b"\0"))  # then the end blocks and the record's zero padding (a whole tar)
    content += -content % 512
    at = {"half": content // 2, "in the last member": content - 100, "no end blocks": content,
          "one end block": content + 512}[cut]
    (tmp_path / "cut.tar").write_bytes(data[:at])
    for url in (str(tmp_path / "cut.tar"), f"pipe:cat {tmp_path / 'cut.tar'}", f"file://{tmp_path / 'cut.tar'}"):
        got = []
        with pytest.raises(ShardFormatError, match=r"shard .*cut\.tar.*(truncated|damaged)"):
            for sample in iter_shard(url):
                got.append(sample["__key__"])
        assert len(got) < 8
    with pytest.raises(ShardFormatError, match=r"shard .*nowhere\.tar"):
        list(iter_shard(str(tmp_path / "nowhere.tar")))


def test_embed_of_a_shard_folder_lists_a_truncated_shard_as_skipped(tmp_path: Path) -> None:
    from dvector.nn.model import DVector
    from dvector.inference.embed_inputs import embed_paths
    from dvector.inference.embedder import Embedder

    folder = tmp_path / "shards"
    entries = [write_raw(folder / shard_name(k), plain(8, prefix=f"s{k}_")) for k in range(2)]
    with_index(folder, entries)
    whole = (folder / shard_name(1)).read_bytes()
    (folder / shard_name(1)).write_bytes(whole[: len(whole) // 2])
    embedder = Embedder.from_model(DVector(ModelConfig.preset("tiny", n_mels=N_MELS)), seg_len=16)
    result = embed_paths(embedder, [str(folder)])
    assert len(result.vectors) >= 8 and len(result.vectors) < 16
    assert [url for url, _ in result.skipped] == [f"{folder}/{shard_name(1)}"]
    reason = result.skipped[0][1]
    assert shard_name(1) in reason and "truncated" in reason


# ---- reliability item 24: a deeply nested .json member ------------------------------------------------

def test_a_deeply_nested_json_member_is_one_bad_sample_not_the_rest_of_the_shard(tmp_path: Path) -> None:
    depth = 200_000  # far past the parser's recursion limit, well within MAX_META_BYTES
    path = tmp_path / "s.tar"
    write_raw(path, plain(5))
    with tarfile.open(tmp_path / "nested.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        with tarfile.open(path) as src:
            for i, info in enumerate(src.getmembers()):
                data = src.extractfile(info).read()
                if info.name == "k002.json":
                    data = b"[" * depth + b"]" * depth
                add(tar, info.name, data)
    url = str(tmp_path / "nested.tar")
    keys, bad = bad_of(url)
    assert keys == ["k000", "k001", "k003", "k004"]
    assert bad == [("k002", "metadata nested too deeply to parse")]
    stream = SampleStream([url], Consumer(), 0)
    with pytest.warns(RuntimeWarning, match=r"sample 'k002'.*nested too deeply"):
        assert len(list(stream.shard_samples(url, 0, 1, 0))) == 4
    assert (stream.bad_samples, stream.bad_shards) == (1, 0)
    with pytest.raises(ValueError, match="nested too deeply"):
        decode_sample({"__key__": "x", "mel.npy": npy(good_mel()), "json": b"[" * depth + b"]" * depth})
