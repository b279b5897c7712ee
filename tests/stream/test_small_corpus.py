"""Small corpora over many consumers, and pools whose speaker blocks hold fewer than N speakers.

A consumer (rank, DataLoader worker) whose own slice of the shards cannot form a batch reads
every shard and keeps one batch in K (K consumers) instead of failing; only a whole corpus that
cannot form a batch is an error, one line without a worker traceback. A pool that holds fewer
than N speakers with M usable utterances reads on until it does.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dvector.errors import DvectorError
from dvector.stream.batches import BatchSettings, WorkerState, consumer_batches
from dvector.stream.loader import ge2e_loader
from dvector.stream.samples import SampleStream
from dvector.stream.sampling import SamplingStats
from dvector.stream.sources import Consumer, StreamPosition
from stream_helpers import N_MELS, make_shards

L = 20


def urls_of(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("shard-*.tar"))


def check_batch(mels: np.ndarray | torch.Tensor, speakers: np.ndarray | torch.Tensor, n: int, m: int) -> None:
    """N distinct speakers x M distinct utterances of each, every row from its speaker."""
    mels, speakers = np.asarray(mels, np.float32), np.asarray(speakers)
    assert mels.shape == (n * m, L, N_MELS)
    groups = speakers.reshape(n, m)
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == n
    assert (mels[:, 0, 2].astype(np.int64) == speakers).all(), "each row comes from its speaker"
    for utterances in mels[:, 0, 0].reshape(n, m):
        assert len(set(utterances.tolist())) == m, "M distinct utterances per speaker"


def batches_of(urls: list[str], settings: BatchSettings, consumer: Consumer, k: int,
               state: WorkerState | None = None) -> list[tuple[np.ndarray, np.ndarray, WorkerState, SamplingStats]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return [(b.mels.copy(), b.speaker_index.copy(), s, st)
                for b, s, st in itertools.islice(consumer_batches(urls, settings, consumer, state), k)]


def own_slice_speakers(urls: list[str], consumer: Consumer) -> set[int]:
    """The speakers of one consumer's slice of pass 0."""
    out = set()
    try:
        for pos, sample in SampleStream(urls, consumer, 0).samples(StreamPosition()):
            if pos.pass_ > 0:
                break
            out.add(sample["speaker_index"])
    except DvectorError as exc:  # an empty slice: no sample in two passes
        assert "no usable sample" in str(exc)
    return out


# ---- item 7a: a small corpus over many consumers --------------------------------------------------

N, M = 4, 3
WORLD, WORKERS = 2, 2


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """4 speakers x 8 utterances, one speaker per shard: one shard (one speaker) per consumer and pass."""
    return make_shards(tmp_path_factory.mktemp("small"), n_speakers=4, per_speaker=8, n_shards=4, block=8)


def test_the_fixture_has_consumers_whose_slice_cannot_form_a_batch(small):
    """The case of the issue: a consumer's slice holds fewer than N speakers (the old code failed)."""
    urls = urls_of(small)
    slices = [own_slice_speakers(urls, Consumer(r, WORLD, w, WORKERS)) for r in range(WORLD) for w in range(WORKERS)]
    assert all(len(s) == 1 for s in slices)
    assert len(set().union(*slices)) == 4


def test_consumers_whose_slice_is_too_small_share_every_shard_and_keep_every_kth_batch(small):
    urls, settings = urls_of(small), BatchSettings(N, M, L, seed=3)
    K, per = WORLD * WORKERS, 6
    with pytest.warns(RuntimeWarning, match="reads every shard and keeps one batch in 4"):
        list(itertools.islice(consumer_batches(urls, settings, Consumer(0, WORLD, 0, WORKERS)), 1))
    got = {(r, w): batches_of(urls, settings, Consumer(r, WORLD, w, WORKERS), per)
           for r in range(WORLD) for w in range(WORKERS)}
    # the shared stream is what one consumer reading everything draws: consumer k keeps k, k + K, ...
    everything = batches_of(urls, settings, Consumer(), K * per, WorkerState(shared=True))
    for (r, w), batches in got.items():
        slot = r * WORKERS + w
        assert len(batches) == per
        for i, (mels, speakers, state, _) in enumerate(batches):
            check_batch(mels, speakers, N, M)
            assert state.shared
            np.testing.assert_array_equal(mels, everything[slot + i * K][0])
            np.testing.assert_array_equal(speakers, everything[slot + i * K][1])
    firsts = {tuple(b[0][0][:, 0, 0].tolist()) for b in got.values()}
    assert len(firsts) == K, "consumers that share from the same point draw disjoint batches"


def test_a_shared_stream_resumes_exactly(small):
    urls, settings, consumer = urls_of(small), BatchSettings(N, M, L, seed=5), Consumer(1, WORLD, 1, WORKERS)
    straight = batches_of(urls, settings, consumer, 14)
    for stop in (0, 3, 7):  # right after the switch, mid-round and a later round
        saved = WorkerState.from_dict(json.loads(json.dumps(straight[stop][2].to_dict())))
        assert saved.shared
        resumed = batches_of(urls, settings, consumer, 14 - stop - 1, saved)
        for (a, sa, _, _), (b, sb, _, _) in zip(straight[stop + 1:], resumed):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(sa, sb)
    assert len({s.round for _, _, s, _ in straight}) > 1


def test_stats_of_a_shared_stream_count_this_consumers_batches_only(small):
    urls, settings = urls_of(small), BatchSettings(N, M, L, seed=3)
    batches = batches_of(urls, settings, Consumer(0, WORLD, 1, WORKERS), 9)
    total = SamplingStats()
    for *_, stats in batches:
        total += stats
    assert total.batches == 9 and total.uses == 9 * N * M


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_of_each_rank_gives_batches_from_a_small_corpus(small, workers):
    for rank in range(WORLD):
        loader = ge2e_loader(small, N, M, L, workers=workers, rank=rank, world=WORLD, seed=1)
        got = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for mels, speakers in loader:
                got.append((mels.clone(), speakers.clone()))
                if len(got) == 6:
                    break
        for mels, speakers in got:
            check_batch(mels, speakers, N, M)
        assert loader.stats.batches == 6
        saved = loader.state_dict()
        assert saved["states"] and all(s["shared"] == 1 for s in saved["states"].values())


def test_consumers_with_no_block_at_all_share_instead_of_failing(tmp_path):
    """One shard of 4 speaker blocks over 8 consumers: half of them get no block."""
    folder = make_shards(tmp_path / "one", n_speakers=4, per_speaker=6, n_shards=1, block=6)
    urls, settings = urls_of(folder), BatchSettings(2, M, L, seed=0)
    assert not own_slice_speakers(urls, Consumer(1, 2, 3, 4))
    for consumer in (Consumer(1, 2, 3, 4), Consumer(0, 2, 0, 4)):
        for mels, speakers, state, _ in batches_of(urls, settings, consumer, 3):
            check_batch(mels, speakers, 2, M)
            assert state.shared


@pytest.mark.parametrize("workers", [0, 2])
def test_too_little_data_in_the_whole_corpus_is_one_clear_line(tmp_path, workers):
    folder = make_shards(tmp_path / "few", n_speakers=3, per_speaker=8, n_shards=4, block=4)
    loader = ge2e_loader(folder, N, M, L, workers=workers, rank=1, world=WORLD, seed=0)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        with pytest.raises(DvectorError) as caught:
            next(iter(loader))
    message = str(caught.value)
    assert message.startswith("cannot form a batch of 4 speakers x 3 utterances: a whole pass over the data gives "
                              "only 3 speakers with 3+ usable utterances")
    assert "\n" not in message and "Traceback" not in message and "DataLoader worker" not in message
    assert not [w for w in warned if "reads every shard" in str(w.message)], "the error alone, no note before it"


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys, warnings
    from datetime import timedelta
    import torch
    from dvector.stream.loader import ge2e_loader
    warnings.simplefilter("ignore", RuntimeWarning)
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    folder, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        loader = ge2e_loader(folder, 4, 3, 20, workers=2, seed=0)  # rank and world from torch.distributed
        speakers = []
        for step, (mels, spk) in enumerate(loader):
            if step == steps:
                break
            count = torch.ones(1)
            torch.distributed.all_reduce(count)  # every step is collective, as in DDP
            speakers.append(sorted(set(spk.tolist())))
        with open(os.path.join(out, f"rank{loader.rank}.json"), "w") as f:
            json.dump({"steps": step, "count": float(count), "speakers": speakers}, f)
    finally:
        torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_torchrun_two_processes_on_a_small_corpus(small, tmp_path):
    script = tmp_path / "ddp_small.py"
    script.write_text(DDP_SCRIPT)
    root = str(Path(__file__).resolve().parents[2])  # the dvector these tests import, not another checkout's
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
               str(small), str(tmp_path), "5"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)  # a hang guard only
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in results] == [5, 5] and [r["count"] for r in results] == [2.0, 2.0]
    assert all(len(s) == N for r in results for s in r["speakers"])
    assert "Traceback" not in done.stderr


# ---- item 7b: a pool whose speaker blocks hold fewer than N speakers ------------------------------


@pytest.fixture(scope="module")
def big_blocks(tmp_path_factory) -> Path:
    """8 speakers of one block of 32 each: the default pool (8 x 4 x 3 = 96) holds 3 blocks, 3 speakers."""
    return make_shards(tmp_path_factory.mktemp("blocks"), n_speakers=8, per_speaker=32, n_shards=2, block=32)


def test_a_pool_reads_on_until_it_holds_n_speakers_with_m_utterances(big_blocks):
    urls, settings = urls_of(big_blocks), BatchSettings(N, M, L, seed=0)
    assert settings.pool == 96 and 96 // 32 < N
    batches = batches_of(urls, settings, Consumer(), 40)
    for mels, speakers, _, _ in batches:
        check_batch(mels, speakers, N, M)
    rounds = {}
    for _, _, state, stats in batches:
        if stats.utterances:  # the first batch of a round counts its pool
            rounds[state.round] = stats.utterances
    assert len(rounds) > 3
    # the first pool (3 whole blocks) reads M utterances of a 4th speaker; later pools begin mid-block
    assert rounds[0] == 96 + M
    assert all(96 <= size <= 96 + M * 8 for size in rounds.values()), rounds  # bounded


@pytest.mark.parametrize("workers", [0, 1])
def test_one_worker_on_big_blocks_trains_and_resumes_exactly(big_blocks, workers):
    loader = ge2e_loader(big_blocks, N, M, L, workers=workers, seed=2)
    it = iter(loader)
    for _ in range(7):
        next(it)
    saved = json.loads(json.dumps(loader.state_dict()))
    continued = [(m.clone(), s.clone()) for m, s in itertools.islice(it, 12)]
    del it
    for mels, speakers in continued:
        check_batch(mels, speakers, N, M)
    fresh = ge2e_loader(big_blocks, N, M, L, workers=workers, seed=2)
    assert fresh.load_state_dict(saved)
    resumed = [(m.clone(), s.clone()) for m, s in itertools.islice(iter(fresh), 12)]
    for (a, sa), (b, sb) in zip(continued, resumed):
        assert torch.equal(a, b) and torch.equal(sa, sb)


def test_pools_that_already_hold_n_speakers_are_unchanged(big_blocks):
    """Reading on happens only where a pool could not give a batch: a pool size that holds enough
    speakers stops at its size, as before."""
    urls = urls_of(big_blocks)
    settings = BatchSettings(N, M, L, seed=0, pool_size=5 * 32)
    for _, _, _, stats in batches_of(urls, settings, Consumer(), 10):
        assert stats.utterances in (0, 160)


def test_old_positions_without_the_shared_fields_still_load():
    state = WorkerState.from_dict({"round": 3, "pass": 1, "shard": 2, "sample": 5, "drawn": 4})
    assert not state.shared and state.before == 0 and state.round == 3 and state.drawn == 4
    assert WorkerState.from_dict(state.to_dict()) == state


def test_consumer_slots_number_every_rank_and_worker():
    slots = [Consumer(r, 2, w, 3).slot for r in range(2) for w in range(3)]
    assert slots == list(range(6)) and Consumer(1, 2, 1, 3).slots == 6
