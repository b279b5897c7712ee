"""The streaming loader: shard URLs -> rank/worker slices -> speaker-balanced GE2E batches.

Shards are written straight with ``write_shard`` (tiny mels whose channels say which utterance
and frame a row came from), except one test that builds real shards from synthetic speech.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import pickle
import tarfile
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from dvector.stream.batches import BatchSettings, WorkerState, consumer_batches, crop_batch
from dvector.stream.loader import ge2e_loader
from dvector.shards.locate import resolve_shards
from dvector.shards.reader import load_npy
from dvector.stream.samples import SampleStream
from dvector.stream.sources import Consumer, StreamPosition, shard_order
from dvector.errors import DvectorError
from dvector.stream.sampling import draw_round
from dvector.shards.format import (
    INDEX_NAME,
    encode_sample,
    shard_name,
)
from stream_helpers import N_MELS, QuietHandler, make_shards, serve

N, M, L = 4, 3, 20


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


def urls_of(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("shard-*.tar"))


def take(loader, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for mels, speakers in loader:
        out.append((mels, speakers))
        if len(out) == k:
            break
    return out


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (ma, sa), (mb, sb) in zip(a, b):
        assert torch.equal(ma, mb) and torch.equal(sa, sb)


def check_batch(mels: torch.Tensor, speakers: torch.Tensor, n: int = N, m: int = M, seg: int = L) -> None:
    assert mels.shape == (n * m, seg, N_MELS) and mels.dtype == torch.float32
    assert speakers.shape == (n * m,) and speakers.dtype == torch.int64
    groups = speakers.view(n, m)
    assert (groups == groups[:, :1]).all(), "rows j*M..j*M+M-1 are one speaker"
    assert len(set(groups[:, 0].tolist())) == n, "N distinct speakers"
    assert torch.equal(mels[:, 0, 2].long(), speakers), "each row comes from its speaker"
    for row in mels:
        assert len(set(row[:, 0].tolist())) == 1, "one utterance per row"
    for utterances in mels[:, 0, 0].view(n, m):
        assert len(set(utterances.tolist())) == m, "M distinct utterances per speaker"


# ---- batches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_hold_n_speakers_times_m_utterances_of_l_frames(shards, workers):
    loader = ge2e_loader(shards, N, M, L, workers=workers, seed=0)
    assert loader.n_mels == N_MELS
    batches = take(loader, 6)
    for mels, speakers in batches:
        check_batch(mels, speakers)
        frames = mels[:, :, 1]
        assert (frames[:, 1:] - frames[:, :-1] == 1).all(), "a crop is L consecutive frames"
    assert loader.stats.batches >= 6 and loader.stats.uses >= 6 * N * M


def test_crops_are_those_draw_round_would_make(shards):
    stream = SampleStream(urls_of(shards), Consumer(), seed=0)
    pool = [s for _, s in zip(range(60), (x for _, x in stream.samples(StreamPosition())))]
    lazy = draw_round(pool, N, M, (15, 45), np.random.default_rng(3), materialize=False)
    eager = draw_round(pool, N, M, (15, 45), np.random.default_rng(3))
    for a, b in zip(lazy, eager):
        out = np.empty((N * M, a.seg_len, N_MELS), np.float32)
        np.testing.assert_array_equal(crop_batch(pool, a, out), b.mels.astype(np.float32))


def test_consumer_batches_cast_once_and_resume_from_a_worker_state(shards):
    urls, settings = urls_of(shards), BatchSettings(N, M, L, seed=2)
    stored = list(itertools.islice(consumer_batches(urls, settings, Consumer()), 24))
    cast = [b.mels for b, _, _ in itertools.islice(consumer_batches(urls, settings, Consumer(), dtype=np.float32), 24)]
    assert stored[0][0].mels.dtype == np.float16 and cast[0].dtype == np.float32
    for (batch, _, _), mels in zip(stored, cast):
        np.testing.assert_array_equal(batch.mels.astype(np.float32), mels)
    state = WorkerState.from_dict(stored[19][1].to_dict())  # in the second round
    assert state.round == 1
    resumed = [b.mels for b, _, _ in itertools.islice(consumer_batches(urls, settings, Consumer(), state), 4)]
    for (batch, _, _), mels in zip(stored[20:], resumed):
        np.testing.assert_array_equal(batch.mels, mels)


def test_segment_length_range_is_drawn_per_batch(shards):
    lengths = {mels.shape[1] for mels, _ in take(ge2e_loader(shards, N, M, (20, 28), workers=0), 12)}
    assert len(lengths) > 1 and all(20 <= x <= 28 for x in lengths)


def test_short_clips_train_with_the_repeat_policy_and_are_counted(tmp_path):
    """A corpus of 1.5 s clips, built from synthetic speech, trains at L=160 (the clips are shorter)."""
    from dvector.shards.build import build_shards
    from dvector.config import BuildConfig
    from dvector.demo.synth import write_corpus

    write_corpus(tmp_path / "corpus", 6, 8, seed=1, duration_s=(1.5, 1.5))
    report = build_shards([str(tmp_path / "corpus")], tmp_path / "shards",
                          BuildConfig(min_shards=2, block_size=4), workers=1)
    assert report.index_written and report.utterances_ok == 48
    loader = ge2e_loader(tmp_path / "shards", 4, 3, 160, workers=0, seed=0)
    for mels, speakers in take(loader, 4):
        assert mels.shape == (12, 160, 40) and torch.isfinite(mels).all()
        assert len(set(speakers.tolist())) == 4
    stats = loader.stats
    assert stats.dropped_short == 0
    assert stats.repeated_short == stats.uses > 0, "every 1.5 s clip (< 160 frames after VAD) is tiled"
    dropping = ge2e_loader(tmp_path / "shards", 4, 3, 160, workers=0, short_policy="drop")
    with pytest.raises(DvectorError, match="cannot form a batch"):
        take(dropping, 1)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_fewer_speakers_than_n_is_a_clear_error_not_a_hang(tmp_path, workers):
    folder = make_shards(tmp_path / "few", n_speakers=3, per_speaker=12, n_shards=2)
    with pytest.raises(DvectorError, match="cannot form a batch of 4 speakers"):
        take(ge2e_loader(folder, 4, 3, L, workers=workers), 1)


def test_excluded_speakers_never_appear(shards):
    held_out = {0, 5, 7}
    seen = set()
    for _, speakers in take(ge2e_loader(shards, N, M, L, workers=0, exclude_speakers=tuple(held_out)), 20):
        seen |= set(speakers.tolist())
    assert seen and not seen & held_out


# ---- rank and worker splits -------------------------------------------------------------------


@pytest.mark.parametrize("n_shards", [1, 2, 3, 4, 5, 12])
@pytest.mark.parametrize("world, workers", [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 2)])
def test_assignments_cover_every_shard_and_block_exactly_once(n_shards, world, workers):
    order = shard_order(n_shards, seed=0, pass_=0)
    covered: dict[int, set[int]] = {k: set() for k in range(n_shards)}  # shard -> residues read
    moduli: dict[int, set[int]] = {k: set() for k in range(n_shards)}
    for rank in range(world):
        for worker in range(workers):
            mine, modulus, remainder = Consumer(rank, world, worker, workers).assignment(order)
            for k in mine:
                assert remainder not in covered[k], f"two consumers read slice {remainder} of shard {k}"
                covered[k].add(remainder)
                moduli[k].add(modulus)
    for k in range(n_shards):
        assert len(moduli[k]) == 1, f"shard {k} split two ways"
        assert covered[k] == set(range(moduli[k].pop())), f"shard {k}: blocks {covered[k]} read"


def one_pass(urls: list[str], consumer: Consumer, seed: int = 0) -> list[dict]:
    out = []
    for pos, sample in SampleStream(urls, consumer, seed).samples(StreamPosition()):
        if pos.pass_ > 0:
            break
        out.append(sample)
    return out


@pytest.mark.parametrize("n_shards, world, workers", [(4, 2, 2), (3, 2, 2), (1, 2, 2), (2, 1, 3), (1, 1, 2)])
def test_consumers_read_disjoint_slices_that_cover_the_data(tmp_path, n_shards, world, workers):
    folder = make_shards(tmp_path / "s", n_speakers=12, per_speaker=8, n_shards=n_shards, block=4)
    urls = urls_of(folder)
    everything = [s["__key__"] for u in urls for _, s in SampleStream([u], Consumer(), 0).shard_samples(u, 0, 1, 0)]
    read: dict[tuple[int, int], list[str]] = {}
    for rank in range(world):
        for worker in range(workers):
            read[rank, worker] = [s["__key__"] for s in one_pass(urls, Consumer(rank, world, worker, workers))]
    keys = [k for ks in read.values() for k in ks]
    assert len(keys) == len(set(keys)) == len(everything), "disjoint"
    assert set(keys) == set(everything), "covering"
    assert all(read.values()), "every consumer gets data"
    # Split by speaker block, never inside one: a block (one speaker, consecutive) goes to one consumer.
    owner = {k: c for c, ks in read.items() for k in ks}
    for u in urls:
        samples = [s for _, s in SampleStream([u], Consumer(), 0).shard_samples(u, 0, 1, 0)]
        for a, b in zip(samples, samples[1:]):
            if a["speaker_index"] == b["speaker_index"]:
                assert owner[a["__key__"]] == owner[b["__key__"]]


# ---- determinism and resuming -----------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches_other_seed_other_batches(shards, workers):
    a = take(ge2e_loader(shards, N, M, L, workers=workers, seed=1), 8)
    b = take(ge2e_loader(shards, N, M, L, workers=workers, seed=1), 8)
    c = take(ge2e_loader(shards, N, M, L, workers=workers, seed=2), 8)
    assert_same(a, b)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_batches_the_consumer_keeps_never_change(shards):
    """Batches come from workers in shared memory; what the consumer keeps (a view, an array, the
    batch) stays as it was while later batches arrive."""
    expected = [(m.clone(), s.clone()) for m, s in take(ge2e_loader(shards, N, M, L, workers=0, seed=3), 40)]
    keep = {3: lambda m: m[1:5], 16: lambda m: m.numpy(), 27: lambda m: m}  # a view, an array, the batch
    held = {}
    for i, (mels, speakers) in enumerate(ge2e_loader(shards, N, M, L, workers=1, seed=3, prefetch=2)):
        if i == len(expected):
            break
        assert torch.equal(mels, expected[i][0]) and torch.equal(speakers, expected[i][1])
        if i in keep:
            held[i] = keep[i](mels)
    del mels
    for i, kept in held.items():
        np.testing.assert_array_equal(np.asarray(kept), np.asarray(keep[i](expected[i][0])))


def test_rank_and_world_come_from_the_torchrun_environment(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = ge2e_loader(shards, N, M, L, workers=0)
    assert (loader.rank, loader.world) == (1, 2)
    explicit = ge2e_loader(shards, N, M, L, workers=0, rank=1, world=2)
    assert_same(take(loader, 3), take(explicit, 3))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [5, 40])  # mid first round; in a later round (a round is <= 16 batches here)
def test_restored_position_gives_the_batches_continuing_would(shards, workers, stop):
    loader = ge2e_loader(shards, N, M, L, workers=workers, seed=4)
    it = iter(loader)
    for _ in range(stop):
        next(it)
    saved = json.loads(json.dumps(loader.state_dict()))  # plain values: fits a weights_only checkpoint
    continued = [next(it) for _ in range(20)]
    del it
    fresh = ge2e_loader(shards, N, M, L, workers=workers, seed=4)
    assert fresh.load_state_dict(copy.deepcopy(saved))
    assert_same(take(fresh, 20), continued)
    if stop > 32:  # more than 16 batches per worker
        assert any(s["round"] > 0 for s in saved["states"].values())
    assert any(s["drawn"] > 0 for s in saved["states"].values())


@pytest.mark.parametrize("n_shards, rank, world", [(2, 0, 1), (1, 1, 2)])
def test_a_corpus_smaller_than_the_pool_wraps_without_repeats_and_resumes(tmp_path, n_shards, rank, world):
    """8 speakers x 6 utterances (half of that per rank when one shard is split by block) < the pool."""
    folder = make_shards(tmp_path / "small", n_speakers=8, per_speaker=6, n_shards=n_shards, block=3)
    loader = ge2e_loader(folder, N, M, L, workers=0, rank=rank, world=world, seed=5)
    it = iter(loader)
    first = [next(it) for _ in range(9)]
    saved = loader.state_dict()
    rest = [next(it) for _ in range(25)]
    for mels, speakers in first + rest:
        check_batch(mels, speakers)  # M distinct utterances: a pool never holds one twice
    fresh = ge2e_loader(folder, N, M, L, workers=0, rank=rank, world=world, seed=5)
    fresh.load_state_dict(saved)
    assert_same(take(fresh, 25), rest)
    utterances = 48 // world
    assert loader.stats.utterances <= utterances * (loader.stats.rounds + 1), "each pool holds the data once"


def test_a_position_from_other_settings_is_refused(shards):
    loader = ge2e_loader(shards, N, M, L, workers=0)
    take(loader, 2)
    saved = loader.state_dict()
    other = ge2e_loader(shards, N, M, L + 1, workers=0)
    assert not other.load_state_dict(saved)
    assert not ge2e_loader(shards, N, M, L, workers=2).load_state_dict(saved)


def test_resuming_mid_shard_starts_reading_there(shards):
    urls = urls_of(shards)
    stream = SampleStream(urls, Consumer(), 0)
    whole = [(p, s["__key__"]) for _, (p, s) in zip(range(70), stream.samples(StreamPosition()))]
    (pos, _), rest = whole[30], whole[31:]
    assert pos.sample > 0, "the position is inside a shard"
    resumed = [(p, s["__key__"]) for _, (p, s) in zip(range(len(rest)), stream.samples(pos))]
    assert resumed == rest


def test_restore_restarts_at_a_new_pass_when_the_world_changed(shards):
    """A checkpoint entry of another world size: every worker starts the pass after the last one reached."""
    a = ge2e_loader(shards, N, M, L, workers=0)
    take(a, 3)
    entry = a.checkpoint_entry()
    assert entry == {"world": 1, "ranks": [a.state_dict()]}
    message = a.restore({"world": 2, "ranks": entry["ranks"] + [None]})
    assert message is not None and "new pass (1)" in message
    assert all(s.start.pass_ == 1 and s.round == 1_000_000 and s.drawn == 0 for s in a.states.values())
    b = ge2e_loader(shards, N, M, L, workers=0)
    assert b.restore(a.checkpoint_entry()) is None  # the same world: resumes exactly
    assert_same(take(a, 4), take(b, 4))


def test_restore_resumes_exactly_from_its_own_entry(shards):
    a = ge2e_loader(shards, N, M, L, workers=0)
    take(a, 5)
    b = ge2e_loader(shards, N, M, L, workers=0)
    assert b.restore(a.checkpoint_entry()) is None and b.restore(None) is None
    assert_same(take(a, 3), take(b, 3))
    c = ge2e_loader(shards, N + 1, M, L, workers=0)  # other batch options: a new pass
    assert "new pass (1)" in c.restore(a.checkpoint_entry())


# ---- uneven shards and DDP --------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_uneven_shards_give_both_ranks_the_same_endless_stream(tmp_path, workers):
    folder = make_shards(tmp_path / "uneven", n_speakers=16, per_speaker=12, n_shards=3)
    order = shard_order(3, seed=0, pass_=0)
    assert len(Consumer(0, 2).assignment(order)[0]) != len(Consumer(1, 2).assignment(order)[0])
    steps = 40  # several passes over the smaller rank's data
    counts = []
    for rank in (0, 1):
        loader = ge2e_loader(folder, N, M, L, workers=workers, rank=rank, world=2)
        got = take(loader, steps)
        for mels, speakers in got[:3]:
            check_batch(mels, speakers)
        counts.append(len(got))
    assert counts == [steps, steps]


def _ddp_worker(rank: int, world: int, folder: str, init: str, out: str, steps: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                         timeout=timedelta(seconds=60))
    try:
        loader = ge2e_loader(folder, N, M, L, workers=0, seed=0)  # rank and world from torch.distributed
        assert (loader.rank, loader.world) == (rank, world)
        total = torch.zeros(1)
        for step, (mels, speakers) in enumerate(loader):
            if step == steps:
                break
            count = torch.ones(1)
            torch.distributed.all_reduce(count)  # every step is collective, as in DDP
            total += count
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"steps": step, "total": float(total), "speakers": speakers.tolist()}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_with_uneven_shards_step_together(tmp_path):
    folder = make_shards(tmp_path / "uneven", n_speakers=16, per_speaker=12, n_shards=3)
    steps = 25
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(folder), f"file://{tmp_path / 'rendezvous'}",
                                                   str(tmp_path), steps), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in results] == [steps, steps]
    assert [r["total"] for r in results] == [2 * steps, 2 * steps]
    assert results[0]["speakers"] != results[1]["speakers"], "ranks read different data"


# ---- faults ------------------------------------------------------------------------------------


def corrupt_copies(folder: Path) -> dict[str, Path]:
    """Good shards plus a truncated one, one with a flipped tar header and one with a flipped .npy header.

    The broken ones are copies of a shard of another corpus (keys of their own); a pool never
    holds one key twice, so copies of one shard would hide each other's samples.
    """
    make_shards(folder, n_shards=4, seed=1)
    source = make_shards(folder / "other", n_shards=3, seed=2, prefix="x", index=False)
    data = (source / shard_name(0)).read_bytes()
    bad = {"truncated": folder / "truncated.tar", "header": folder / "header.tar", "npy": folder / "npy.tar"}
    bad["truncated"].write_bytes(data[: len(data) // 2 + 100])
    flipped = bytearray(data)
    # the header of the 11th member, well inside: the checksum no longer matches
    offset = 0
    for _ in range(10):
        size = int(flipped[offset + 124:offset + 136].split(b"\0")[0] or b"0", 8)
        offset += 512 + (size + 511) // 512 * 512
    flipped[offset + 20:offset + 30] = bytes(b ^ 0x5A for b in flipped[offset + 20:offset + 30])
    bad["header"].write_bytes(bytes(flipped))
    first_npy = data.index(b"\x93NUMPY")
    broken = bytearray(data)
    broken[first_npy:first_npy + 6] = b"\x00garbl"  # the data of a member, not a header: a bad sample
    bad["npy"].write_bytes(bytes(broken))
    return bad


def drain(stream: SampleStream, shard: str) -> list[str]:
    return [s["__key__"] for _, s in stream.shard_samples(shard, 0, 1, 0)]


def test_corrupt_and_missing_shards_are_skipped_with_a_warning_naming_them(shards, tmp_path):
    bad = corrupt_copies(tmp_path / "bad")
    stream = SampleStream([], Consumer(), 0)
    good = drain(stream, str(tmp_path / "bad" / "other" / shard_name(0)))
    with pytest.warns(RuntimeWarning, match=r"truncated\.tar.*truncated"):
        keys = drain(stream, str(bad["truncated"]))
    assert 0 < len(keys) < len(good) and keys == good[:len(keys)], "samples before the damage still count"
    with pytest.warns(RuntimeWarning, match=r"header\.tar.*checksum"):
        keys = drain(stream, str(bad["header"]))
    assert 0 < len(keys) < len(good)
    with pytest.warns(RuntimeWarning, match=r"npy\.tar, sample '" + good[0]):
        keys = drain(stream, str(bad["npy"]))
    assert keys == good[1:], "one bad sample is skipped, not the shard"
    missing = str(tmp_path / "bad" / "shard-999999.tar")
    with pytest.warns(RuntimeWarning, match="shard-999999.tar"):
        assert drain(stream, missing) == []
    # through the loader: every broken shard is named, and batches still come
    urls = urls_of(tmp_path / "bad") + [str(p) for p in bad.values()] + [missing]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mels, speakers in take(ge2e_loader(urls, N, M, L, workers=0), 100):  # about two passes
            check_batch(mels, speakers)
    text = "\n".join(str(w.message) for w in caught)
    for name in ("truncated.tar", "header.tar", "npy.tar", "shard-999999.tar"):
        assert name in text


def member_ends(data: bytes) -> list[int]:
    """Offsets where each tar member (header and padded data) ends."""
    ends, offset = [], 0
    while data[offset:offset + 512].strip(b"\0"):
        size = int(data[offset + 124:offset + 136].split(b"\0")[0] or b"0", 8)
        offset += 512 + (size + 511) // 512 * 512
        ends.append(offset)
    return ends


def test_a_shard_cut_between_members_or_with_a_damaged_last_header_is_named(shards, tmp_path):
    """tarfile takes either for the end of the archive; the stream still reports it."""
    data = (shards / shard_name(0)).read_bytes()
    good = drain(SampleStream([], Consumer(), 0), str(shards / shard_name(0)))
    ends = member_ends(data)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:ends[9]])  # after the 5th sample (2 members each), no end-of-archive blocks
    with pytest.warns(RuntimeWarning, match=r"cut\.tar.*truncated"):  # the sample at the cut may lack members
        assert drain(SampleStream([], Consumer(), 0), str(cut)) == good[:4]
    zeroed = tmp_path / "zeroed.tar"  # a header zeroed in the middle: looks like the end, data follows
    zeroed.write_bytes(data[:ends[9]] + bytes(512) + data[ends[9] + 512:])
    with pytest.warns(RuntimeWarning, match=r"zeroed\.tar.*damaged tar header"):
        assert drain(SampleStream([], Consumer(), 0), str(zeroed)) == good[:4]


def test_members_in_any_order_and_extra_members_read_the_same(shards, tmp_path):
    """A shard from another writer: mel before json, other members between; positions resume alike."""
    with open(shards / shard_name(1), "rb") as f:
        raw = list(wds.tariterators.tar_file_iterator(f))
    path = tmp_path / "reordered.tar"
    with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False, keep_meta=True) as writer:
        samples: dict[str, dict] = {}
        for member in raw:
            key, suffix = member["fname"].split(".", 1)
            samples.setdefault(key, {"__key__": key})[suffix] = member["data"]
        for sample in samples.values():
            sample["txt"] = b"ignored"
            writer.write(sample)
    reordered = tmp_path / "mel-first.tar"
    with open(reordered, "wb") as stream, wds.TarWriter(stream, encoder=False) as writer:
        for sample in samples.values():
            for suffix in ("mel.npy", "txt", "json"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{suffix}")  # the tarfile under webdataset's writer
                info.size = len(sample[suffix])
                writer.tarstream.addfile(info, io.BytesIO(sample[suffix]))
    expected = drain(SampleStream([], Consumer(), 0), str(shards / shard_name(1)))
    for url in (str(path), str(reordered)):
        stream = SampleStream([url], Consumer(), 0)
        assert drain(stream, url) == expected
        whole = [(p, s["__key__"]) for p, s in stream.shard_samples(url, 0, 1, 0)]
        assert [p for p, _ in whole] == list(range(1, len(expected) + 1))
        assert [(p, s["__key__"]) for p, s in stream.shard_samples(url, 7, 1, 0)] == whole[7:]


def test_a_pipe_command_that_fails_after_its_output_is_named(shards):
    local = drain(SampleStream([], Consumer(), 0), str(shards / shard_name(2)))
    with pytest.warns(RuntimeWarning, match=r"shard pipe:cat .*exit 3"):
        keys = drain(SampleStream([], Consumer(), 0), f"pipe:cat {shards / shard_name(2)}; exit 3")
    assert keys == local[:-1], "what came before the failure counts (the last sample might be incomplete)"


@pytest.mark.parametrize("which", ["truncated", "header", "npy", "missing"])
def test_on_error_raise_stops_with_the_shard_named(shards, tmp_path, which):
    bad = corrupt_copies(tmp_path / "bad")
    target = str(tmp_path / "nowhere.tar") if which == "missing" else str(bad[which])
    with pytest.raises(DvectorError, match=Path(target).name):  # a missing one: before anything starts
        take(ge2e_loader([target], N, M, L, workers=0, on_error="raise"), 1)


def test_all_shards_broken_is_an_error_not_a_hang(tmp_path):
    urls = [str(tmp_path / f"broken-{i}.tar") for i in range(2)]
    for url in urls:
        Path(url).write_bytes(b"not a tar" * 100)
    with pytest.raises(DvectorError, match="none of the 2 shard files given is there"):  # all missing: at once
        ge2e_loader([str(tmp_path / f"gone-{i}.tar") for i in range(2)], N, M, L, workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DvectorError, match="read no usable sample"):
            take(ge2e_loader(urls, N, M, L, workers=0), 1)


class _Boom:
    """Unpickling this creates a file: proof that code from a shard ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_in_shards_never_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = np.empty(2, dtype=object)
    payload[0] = _Boom(str(marker))
    evil_npy = io.BytesIO()
    np.save(evil_npy, payload, allow_pickle=True)
    evil_pickle = pickle.dumps(_Boom(str(marker)))
    rng = np.random.default_rng(0)
    path = tmp_path / "evil.tar"
    with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False) as writer:
        for s in range(5):
            for u in range(4):
                key = f"s{s}_u{u}"
                sample = encode_sample(key, rng.standard_normal((30, N_MELS)).astype(np.float16),
                                       {"speaker_index": s})
                sample["pyd"] = evil_pickle  # extra members: never decoded
                sample["pickle"] = evil_pickle
                sample["pth"] = evil_pickle
                if (s, u) == (2, 1):
                    sample["mel.npy"] = evil_npy.getvalue()  # an object array: needs pickle to load
                writer.write(sample)
    stream = SampleStream([str(path)], Consumer(), 0)
    with pytest.warns(RuntimeWarning, match=r"evil\.tar, sample 's2_u1'.*(pickle|[Oo]bject)"):
        samples = [s for _, s in stream.shard_samples(str(path), 0, 1, 0)]
    assert len(samples) == 19 and "s2_u1" not in {s["__key__"] for s in samples}
    assert all(set(s) == {"speaker_index", "__key__", "__url__", "mel"} for s in samples)
    with pytest.raises(DvectorError, match="evil.tar"):
        [s for _, s in SampleStream([str(path)], Consumer(), 0, on_error="raise").shard_samples(str(path), 0, 1, 0)]
    assert not marker.exists(), "a shard ran code"
    with pytest.raises(ValueError):
        load_npy(evil_npy.getvalue())
    assert not marker.exists()


def test_load_npy_reads_what_np_save_writes():
    for a in (np.arange(12, dtype=np.float16).reshape(3, 4), np.ones((2, 5), ">f4"), np.zeros((1, 1), np.int16),
              np.asfortranarray(np.arange(6.0).reshape(2, 3))):
        buf = io.BytesIO()
        np.save(buf, a)
        got = load_npy(buf.getvalue())
        np.testing.assert_array_equal(got, a)
        assert got.dtype == a.dtype
    buf = io.BytesIO()
    np.save(buf, np.ones((4, 4), np.float16))
    with pytest.raises(ValueError):
        load_npy(buf.getvalue()[:-2])  # data shorter than the header says
    with pytest.raises(ValueError):
        load_npy(b"not an npy file at all")


# ---- URLs --------------------------------------------------------------------------------------


def test_sources_folder_brace_pattern_list_file_url_and_index_path(shards):
    folder = resolve_shards(shards)
    assert len(folder.urls) == 4 and folder.index is not None
    brace = resolve_shards(f"{shards}/shard-{{000000..000003}}.tar")
    assert sorted(brace.urls) == sorted(folder.urls) and brace.index is not None, "index found beside the shards"
    listed = resolve_shards([f"{shards}/shard-{{000000..000001}}.tar", str(shards / shard_name(3))])
    assert len(listed.urls) == 3
    by_index = resolve_shards(str(shards / INDEX_NAME))
    assert by_index.urls == folder.urls
    file_urls = resolve_shards(f"file://{shards}/shard-{{000000..000003}}.tar")
    assert file_urls.index is not None
    file_folder = resolve_shards(f"file://{shards}/")
    assert_same(take(ge2e_loader(file_folder.urls, N, M, L, workers=0), 3),
                take(ge2e_loader(shards, N, M, L, workers=0), 3))
    with pytest.raises(DvectorError):
        resolve_shards([])


def test_pipe_urls_read_like_local_files(shards):
    pipe = resolve_shards(f"pipe:cat {shards}/shard-{{000000..000003}}.tar")
    assert len(pipe.urls) == 4 and all(u.startswith("pipe:cat ") for u in pipe.urls) and pipe.index is None
    local = take(ge2e_loader(f"{shards}/shard-{{000000..000003}}.tar", N, M, L, workers=0), 20)
    assert_same(take(ge2e_loader(pipe.urls, N, M, L, workers=0), 20), local)
    # a failing command is a failing shard
    with pytest.warns(RuntimeWarning, match="no-such-file"):
        assert drain(SampleStream([], Consumer(), 0), f"pipe:cat {shards}/no-such-file.tar") == []


@pytest.fixture(scope="module")
def http_shards(shards):
    with serve(shards) as base:
        yield base


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_http_streaming_from_a_local_server(shards, http_shards, workers):
    base = http_shards
    brace = ge2e_loader(f"{base}/shard-{{000000..000003}}.tar", N, M, L, workers=workers, seed=0)
    assert brace.source.urls[0].startswith("http://127.0.0.1:")
    assert brace.source.index is not None and brace.n_mels == N_MELS, "index.json read from beside the shards"
    local = take(ge2e_loader(f"{shards}/shard-{{000000..000003}}.tar", N, M, L, workers=workers, seed=0), 12)
    assert_same(take(brace, 12), local)
    folder = ge2e_loader(f"{base}/", N, M, L, workers=workers, seed=0)  # the folder URL: its index lists the shards
    assert folder.source.urls == [f"{base}/{shard_name(k)}" for k in range(4)]
    for mels, speakers in take(folder, 6):
        check_batch(mels, speakers)


def test_http_missing_shard_is_skipped_with_a_warning(http_shards):
    stream = SampleStream([], Consumer(), 0)
    with pytest.warns(RuntimeWarning, match="shard-000404.tar"):
        assert drain(stream, f"{http_shards}/shard-000404.tar") == []
    with pytest.raises(DvectorError, match="shard-000404.tar"):
        drain(SampleStream([], Consumer(), 0, on_error="raise"), f"{http_shards}/shard-000404.tar")


class FlakyHandler(QuietHandler):
    """Breaks the first download of shard 1 halfway (a dropped connection), then serves it whole."""

    broken: set[str] = set()

    def do_GET(self):
        if self.path.endswith(shard_name(1)) and self.path not in FlakyHandler.broken:
            FlakyHandler.broken.add(self.path)
            data = Path(self.directory, shard_name(1)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


def test_a_dropped_download_is_opened_again_where_it_broke(shards):
    local = drain(SampleStream([], Consumer(), 0), str(shards / shard_name(1)))
    with serve(shards, FlakyHandler) as base:
        with pytest.warns(RuntimeWarning, match=r"shard-000001.tar.*opening it again at sample \d+"):
            keys = drain(SampleStream([], Consumer(), 0), f"{base}/{shard_name(1)}")
    assert keys == local


def test_file_urls_with_escaped_characters_find_their_index(tmp_path):
    """``file://`` URLs escape a space as %20: the index beside them is read from the same folder."""
    folder = make_shards(tmp_path / "a b" / "shards", n_shards=2)
    url = (folder / "shard-000000.tar").as_uri()
    assert "%20" in url
    source = resolve_shards([url])
    assert source.index is not None and source.index["shards"][0]["name"] == "shard-000000.tar"


def test_loader_workers_keep_a_fixed_mmap_threshold():
    """glibc's dynamic mmap threshold fragments a worker's heap (1.1 GB against 0.64 GB per worker in
    bench_loader); the workers fix it, where the C library is glibc."""
    import ctypes.util
    import platform

    from dvector.stream.loader import fixed_mmap_threshold

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c")
    assert fixed_mmap_threshold() is bool(glibc)
