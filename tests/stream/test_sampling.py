"""Tests for dvector.stream.sampling: speaker-balanced GE2E batches drawn from a pool of samples."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvector.config import parse_seg_len
from dvector.errors import DvectorError
from dvector.stream.sampling import (
    DEFAULT_MIN_FRAMES,
    Batch,
    SamplingStats,
    SegmentSpec,
    crop,
    crop_rows,
    draw_round,
    pair_cooccurrence,
    pair_cooccurrence_ratio,
)

N_MELS = 3  # channel 0: utterance id (pool position), 1: frame number, 2: noise; exact in float16


def make_pool(
    seed: int,
    n_blocks: int = 40,
    n_speakers: int = 25,
    block: tuple[int, int] = (8, 16),
    frames: tuple[int, int] = (60, 120),
) -> list[dict]:
    """Speaker blocks as a shard stream delivers them; a speaker may come back in a later block."""
    rng = np.random.default_rng(seed)
    samples: list[dict] = []
    for _ in range(n_blocks):
        spk = int(rng.integers(n_speakers)) * 7 + 1000  # global ids: sparse, not 0..S-1
        for _ in range(int(rng.integers(block[0], block[1] + 1))):
            T = int(rng.integers(frames[0], frames[1] + 1))
            uid = len(samples)
            assert uid < 2048 and T < 2048, "ids and frame numbers must stay exact in float16"
            mel = np.empty((T, N_MELS), dtype=np.float16)
            mel[:, 0] = uid
            mel[:, 1] = np.arange(T)
            mel[:, 2] = rng.standard_normal(T)
            samples.append({"mel": mel, "speaker_index": spk, "speaker": f"spk{spk}"})
    return samples


@pytest.fixture(scope="module")
def pool() -> list[dict]:
    return make_pool(0)


def draw(samples, N=4, M=5, L=40, seed=0, **kw) -> list[Batch]:
    return list(draw_round(samples, N, M, L, np.random.default_rng(seed), **kw))


def expected_rows(samples, batch: Batch) -> np.ndarray:
    """Rebuild every row of a batch from its pool index and offset, wrapping short utterances."""
    rows = []
    for i, o in zip(batch.pool_index, batch.offset):
        mel = samples[i]["mel"]
        rows.append(mel[(o + np.arange(batch.seg_len)) % len(mel)])
    return np.stack(rows)


def check_invariants(samples, batches, N, M, max_uses) -> np.ndarray:
    """Shape, distinctness, ordering and use-count invariants; returns uses per pool position."""
    uses = np.zeros(len(samples), dtype=np.int64)
    for b in batches:
        assert b.speaker_index.shape == (N * M,) and b.speaker_index.dtype == np.int64
        per_spk = b.speaker_index.reshape(N, M)
        assert np.all(per_spk == per_spk[:, :1]), "rows must be speaker-major"
        assert len(np.unique(per_spk[:, 0])) == N, "N distinct speakers"
        assert len(np.unique(b.pool_index)) == N * M, "an utterance twice in one batch"
        assert all(samples[i]["speaker_index"] == s for i, s in zip(b.pool_index, b.speaker_index))
        uses[b.pool_index] += 1
    assert uses.max(initial=0) <= max_uses
    return uses


# --- shapes, ordering, content -------------------------------------------------------------


def test_batch_shapes_and_dtypes(pool):
    batches = draw(pool, N=4, M=5, L=40)
    assert len(batches) > 5
    for b in batches:
        assert b.mels.shape == (20, 40, N_MELS) and b.mels.dtype == np.float16
        assert b.speaker_index.shape == (20,) and b.speaker_index.dtype == np.int64
        assert b.pool_index.shape == b.offset.shape == (20,)
        assert b.seg_len == 40


def test_distinct_speakers_and_utterances_speaker_major(pool):
    N, M = 5, 4
    batches = draw(pool, N=N, M=M, L=30)
    check_invariants(pool, batches, N, M, max_uses=2)
    for b in batches:
        ids = b.mels[:, 0, 0].astype(np.int64)  # the utterance id written into the frames
        assert np.array_equal(ids, b.pool_index)
        assert len(np.unique(ids)) == N * M
        speakers = np.array([pool[i]["speaker_index"] for i in ids]).reshape(N, M)
        assert np.all(speakers == speakers[:, :1]) and len(np.unique(speakers[:, 0])) == N


def test_crops_are_contiguous_slices_of_the_source(pool):
    for b in draw(pool, N=4, M=5, L=50, seed=3):
        assert np.all(b.mels[:, :, 0] == b.mels[:, :1, 0]), "one utterance per row"
        frames = b.mels[:, :, 1].astype(np.int64)
        assert np.all(np.diff(frames, axis=1) == 1), "consecutive frames"
        assert np.array_equal(frames[:, 0], b.offset)
        np.testing.assert_array_equal(b.mels, expected_rows(pool, b))


def test_offsets_vary_between_uses():
    samples = make_pool(1, n_blocks=12, n_speakers=6, block=(10, 10), frames=(400, 400))
    offsets: dict[int, list[int]] = {}
    for b in draw(samples, N=3, M=5, L=40, max_uses=4, materialize=False):
        for i, o in zip(b.pool_index.tolist(), b.offset.tolist()):
            offsets.setdefault(i, []).append(o)
    reused = [v for v in offsets.values() if len(v) > 1]
    assert reused and sum(len(set(v)) > 1 for v in reused) > 0.9 * len(reused)


# --- use limits and the end of a round -------------------------------------------------------


@pytest.mark.parametrize("max_uses", [1, 2, 3])
def test_max_uses_and_round_end(pool, max_uses):
    N, M = 4, 5
    stats = SamplingStats()
    batches = draw(pool, N=N, M=M, max_uses=max_uses, stats=stats, materialize=False)
    uses = check_invariants(pool, batches, N, M, max_uses)
    # The round ended because fewer than N speakers still had M utterances with uses left.
    speakers = np.array([s["speaker_index"] for s in pool])
    live = {s: int(np.sum((speakers == s) & (uses < max_uses))) for s in np.unique(speakers)}
    assert sum(v >= M for v in live.values()) < N
    assert stats.batches == len(batches) and stats.rounds == 1
    assert stats.uses == len(batches) * N * M == uses.sum()
    assert stats.utterances == len(pool) and stats.dropped_short == 0
    assert stats.unused == int(np.sum(uses == 0))
    assert stats.leftover_uses == len(pool) * max_uses - uses.sum()


def test_little_data_is_wasted():
    # 64 speakers x 30 utterances x 2 uses = 6 appearances each = exactly 24 batches of N=16.
    samples = [
        {"mel": np.zeros((50, 2), np.float16), "speaker_index": s} for s in range(64) for _ in range(30)
    ]
    leftover = []
    for seed in range(20):
        stats = SamplingStats()
        draw(samples, N=16, M=10, L=20, seed=seed, stats=stats, materialize=False)
        leftover.append(stats.leftover_uses / (64 * 30 * 2))
    # Weights = remaining uses squared lose the last batch in ~1 round of 10 (0.4 % of the data);
    # weights = remaining uses (not squared) lose it in most rounds (~3.3 %).
    assert np.mean(leftover) < 0.015


def test_pool_with_too_few_speakers_gives_no_batch():
    samples = make_pool(2, n_blocks=3, n_speakers=3, block=(10, 10))
    n_spk = len({s["speaker_index"] for s in samples})
    stats = SamplingStats()
    assert draw(samples, N=n_spk + 1, M=2, stats=stats) == []
    assert stats.batches == 0 and stats.unused == len(samples) and stats.rounds == 1


def test_empty_pool():
    stats = SamplingStats()
    assert draw([], stats=stats) == []
    assert stats == SamplingStats(rounds=1)


# --- determinism and fast-forward ------------------------------------------------------------


def test_same_seed_same_batches_other_seed_differs(pool):
    a, b, c = draw(pool, seed=7), draw(pool, seed=7), draw(pool, seed=8)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.mels, y.mels)
        np.testing.assert_array_equal(x.pool_index, y.pool_index)
        np.testing.assert_array_equal(x.offset, y.offset)
    assert any(not np.array_equal(x.pool_index, z.pool_index) for x, z in zip(a, c))


@pytest.mark.parametrize("seg_len", [40, (20, 60)])
def test_materialize_false_consumes_rng_identically(pool, seg_len):
    rng_full, rng_lazy = np.random.default_rng(11), np.random.default_rng(11)
    full = list(draw_round(pool, 4, 5, seg_len, rng_full))
    lazy = list(draw_round(pool, 4, 5, seg_len, rng_lazy, materialize=False))
    assert len(full) == len(lazy) > 3
    for x, y in zip(full, lazy):
        assert y.mels is None and x.seg_len == y.seg_len
        np.testing.assert_array_equal(x.speaker_index, y.speaker_index)
        np.testing.assert_array_equal(x.pool_index, y.pool_index)
        np.testing.assert_array_equal(x.offset, y.offset)
    assert rng_full.random() == rng_lazy.random(), "the generators must end in the same state"


@pytest.mark.parametrize("k", [0, 1, 4])
def test_skip_resumes_mid_round(pool, k):
    full = draw(pool, L=(30, 50), seed=5)
    stats = SamplingStats()
    tail = draw(pool, L=(30, 50), seed=5, skip=k, stats=stats)
    assert len(tail) == len(full) - k
    for x, y in zip(full[k:], tail):
        assert x.seg_len == y.seg_len
        np.testing.assert_array_equal(x.mels, y.mels)
        np.testing.assert_array_equal(x.speaker_index, y.speaker_index)
    assert stats.batches == len(full), "skipped batches still count in the round's stats"


def test_skip_past_the_end(pool):
    assert draw(pool, skip=10_000) == []


# --- short utterances ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_pool() -> list[dict]:
    # Lengths 5..90 frames: below min_frames (20), shorter than L (60), and long enough.
    return make_pool(3, n_blocks=40, n_speakers=12, block=(10, 14), frames=(5, 90))


def test_repeat_policy_tiles_short_utterances(short_pool):
    L = 60
    lengths = np.array([len(s["mel"]) for s in short_pool])
    stats = SamplingStats()
    batches = draw(short_pool, N=4, M=4, L=L, stats=stats)
    assert batches
    n_repeated = 0
    for b in batches:
        np.testing.assert_array_equal(b.mels, expected_rows(short_pool, b))
        T = lengths[b.pool_index]
        assert np.all(T >= DEFAULT_MIN_FRAMES)
        short = T < L
        n_repeated += int(short.sum())
        assert np.all(b.offset[short] < T[short]) and np.all(b.offset[~short] <= T[~short] - L)
        for row, t in zip(b.mels[short], T[short]):
            frames = row[:, 1].astype(np.int64)
            assert np.array_equal(frames[t:], frames[:-t]), "a short row repeats with period T"
    assert n_repeated > 0 and stats.repeated_short == n_repeated
    assert stats.dropped_short == int(np.sum(lengths < DEFAULT_MIN_FRAMES)) > 0


def test_drop_policy_never_uses_short_utterances(short_pool):
    lengths = np.array([len(s["mel"]) for s in short_pool])
    stats = SamplingStats()
    batches = draw(short_pool, N=3, M=3, L=(50, 60), short_policy="drop", stats=stats)
    assert batches
    for b in batches:
        assert np.all(lengths[b.pool_index] >= 60), "drop: shorter than the longest L"
    assert stats.repeated_short == 0
    assert stats.dropped_short == int(np.sum(lengths < 60))


@pytest.mark.parametrize("policy", ["repeat", "drop"])
def test_min_frames_always_drops(short_pool, policy):
    lengths = np.array([len(s["mel"]) for s in short_pool])
    stats = SamplingStats()
    batches = draw(short_pool, N=3, M=3, L=10, short_policy=policy, min_frames=40, stats=stats)
    assert batches
    assert all(np.all(lengths[b.pool_index] >= 40) for b in batches)
    assert stats.dropped_short == int(np.sum(lengths < 40))
    assert stats.repeated_short == 0  # L=10 <= every kept utterance


# --- segment lengths -------------------------------------------------------------------------


def test_seg_len_range_drawn_per_batch(pool):
    batches = draw(pool, L=(20, 50), seed=2)
    lens = [b.seg_len for b in batches]
    assert all(20 <= L <= 50 for L in lens) and len(set(lens)) > 1
    for b in batches:
        assert b.mels.shape[1] == b.seg_len
        np.testing.assert_array_equal(b.mels, expected_rows(pool, b))


def test_segment_spec_parse_and_draw():
    assert SegmentSpec.parse(160) == SegmentSpec(160, 160)
    assert SegmentSpec.parse((140, 180)) == SegmentSpec.parse([140, 180]) == SegmentSpec(140, 180)
    spec = SegmentSpec(140, 180)
    assert SegmentSpec.parse(spec) is spec
    rng = np.random.default_rng(0)
    assert {spec.draw(rng) for _ in range(500)} == set(range(140, 181))
    state = rng.bit_generator.state
    assert SegmentSpec(7, 7).draw(rng) == 7 and rng.bit_generator.state == state, "fixed L draws nothing"


@pytest.mark.parametrize(
    "seg_len, expected",
    [("160", (160, 160)), ("140-180", (140, 180)), (160, (160, 160)), ((140, 180), (140, 180)),
     ([140, 180], (140, 180)), (np.int64(40), (40, 40)), ((np.int32(20), np.int64(30)), (20, 30))],
    ids=repr,
)
def test_one_seg_len_parser_for_strings_ints_and_pairs(seg_len, expected):
    assert parse_seg_len(seg_len) == expected and all(type(v) is int for v in parse_seg_len(seg_len))
    assert SegmentSpec.parse(seg_len) == SegmentSpec(*expected)


@pytest.mark.parametrize(
    "seg_len, words",
    [("0", ">= 1 frame"), ("180-140", "lo <= hi"), ("abc", "like 160"), ("1-2-3", "like 160"), ((1, 2, 3), "(lo, hi)"),
     (12.5, "whole frames"), ((10, 20.0), "whole frames"), (True, "whole frames"), (None, "whole frames")],
    ids=repr,
)
def test_seg_len_parser_says_what_is_wrong(seg_len, words):
    for parse in (parse_seg_len, SegmentSpec.parse):
        with pytest.raises(DvectorError, match="seg_len.*" + words.replace("(", r"\(").replace(")", r"\)")):
            parse(seg_len)


# --- the cropper -----------------------------------------------------------------------------


def test_crop_takes_l_frames_or_tiles_a_short_utterance():
    mel = np.arange(10 * 2, dtype=np.float16).reshape(10, 2)  # (T=10, 2)
    np.testing.assert_array_equal(crop(mel, 3, 4), mel[3:7])
    assert np.shares_memory(crop(mel, 3, 4), mel), "a long utterance's crop is a view"
    tiled = crop(mel, 7, 25)  # short: frames 7, 8, 9, 0, 1, ...
    np.testing.assert_array_equal(tiled, mel[(np.arange(25) + 7) % 10])
    out = np.full((25, 2), -1.0, np.float32)
    assert crop(mel, 0, 25, out) is out
    np.testing.assert_array_equal(out, mel[np.arange(25) % 10].astype(np.float32))
    rows = crop_rows([mel, mel[:3]], [6, 1], 4, np.empty((2, 4, 2), np.float32))  # (2, 4, 2)
    np.testing.assert_array_equal(rows[0], mel[6:10])
    np.testing.assert_array_equal(rows[1], mel[[1, 2, 0, 1]])


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(n_speakers=1), "n_speakers"),
        (dict(n_utterances=1), "n_utterances"),
        (dict(seg_len=0), "seg_len"),
        (dict(seg_len=(50, 40)), "lo <= hi"),
        (dict(seg_len=(0, 40)), "seg_len"),
        (dict(seg_len=(1, 2, 3)), "(lo, hi)"),
        (dict(seg_len=12.5), "seg_len"),
        (dict(short_policy="pad"), "short_policy"),
        (dict(max_uses=0), "max_uses"),
        (dict(min_frames=0), "min_frames"),
        (dict(rng=np.random.RandomState(0)), "Generator"),
    ],
)
def test_impossible_settings_raise_on_call(pool, kwargs, words):
    args = dict(samples=pool, n_speakers=4, n_utterances=5, seg_len=40, rng=np.random.default_rng(0))
    args.update(kwargs)
    with pytest.raises(DvectorError, match=words.replace("(", r"\(").replace(")", r"\)")):
        draw_round(**args)  # no next(): checked on the call


def test_bad_samples_raise():
    mel = np.zeros((50, 3), np.float16)
    with pytest.raises(DvectorError, match="speaker_index"):
        draw([{"mel": mel}])
    with pytest.raises(DvectorError, match="mel bands"):
        draw([{"mel": mel, "speaker_index": 0}, {"mel": np.zeros((50, 4), np.float16), "speaker_index": 1}])
    with pytest.raises(DvectorError, match="2-D"):
        draw([{"mel": np.zeros(50, np.float16), "speaker_index": 0}])


def test_stats_add_and_merge():
    a = SamplingStats(utterances=3, uses=4, batches=1, rounds=1, dropped_short=2)
    b = SamplingStats(utterances=1, uses=6, unused=5, repeated_short=1, leftover_uses=7)
    c = a + b
    assert c == SamplingStats(7 - 3, 10, 1, 1, 2, 1, 5, 7) and a.uses == 4
    a += b
    assert a == c and sum([a, b], SamplingStats()) == a + b
    assert c.to_dict()["uses"] == 10


# --- properties over random pools ------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    N=st.integers(2, 6),
    M=st.integers(2, 6),
    max_uses=st.integers(1, 3),
    L=st.one_of(st.integers(5, 60), st.tuples(st.integers(5, 30), st.integers(30, 60))),
    policy=st.sampled_from(["repeat", "drop"]),
)
def test_invariants_hold_for_random_pools(seed, N, M, max_uses, L, policy):
    samples = make_pool(seed, n_blocks=15, n_speakers=10, block=(1, 12), frames=(3, 70))
    lengths = np.array([len(s["mel"]) for s in samples])
    stats = SamplingStats()
    batches = draw(samples, N=N, M=M, L=L, seed=seed, max_uses=max_uses, short_policy=policy, stats=stats)
    uses = check_invariants(samples, batches, N, M, max_uses)
    for b in batches:
        np.testing.assert_array_equal(b.mels, expected_rows(samples, b))
    spec = SegmentSpec.parse(L)
    usable = lengths >= max(DEFAULT_MIN_FRAMES, spec.hi if policy == "drop" else 1)
    assert np.all(uses[~usable] == 0)
    assert stats.dropped_short == int((~usable).sum())
    speakers = np.array([s["speaker_index"] for s in samples])
    live = [np.sum((speakers == s) & usable & (uses < max_uses)) for s in np.unique(speakers)]
    assert sum(v >= M for v in live) < N, "the round stopped early"
    assert stats.unused == int(np.sum(usable & (uses == 0)))


# --- mixing ----------------------------------------------------------------------------------


def test_pair_cooccurrence_counts_and_chance_model():
    batches = [np.array([1, 1, 2, 2]), np.array([2, 3]), np.array([1, 2])]  # repeats count once
    speakers, observed, expected = pair_cooccurrence(batches)
    assert speakers.tolist() == [1, 2, 3]
    assert observed.tolist() == [[2, 2, 0], [2, 3, 1], [0, 1, 1]]
    # 6 slots, sizes 2,2,2: p = 3*2 / (6*5) = 0.2; expected[a, b] = c_a c_b p.
    np.testing.assert_allclose(expected, np.outer([2, 3, 1], [2, 3, 1]) * 0.2)


def test_ratio_detects_fixed_groups_and_accepts_random_batches():
    S, N, B = 16, 4, 800
    groups = [np.arange(g * N, g * N + N) for g in range(S // N)]
    fixed = [groups[t % len(groups)] for t in range(B)]
    assert pair_cooccurrence_ratio(fixed) == pytest.approx(S / (N - 1), rel=0.05)  # 5.3
    rng = np.random.default_rng(0)
    uniform = [rng.choice(S, N, replace=False) for _ in range(B)]
    assert pair_cooccurrence_ratio(uniform) < 1.5
    assert np.isnan(pair_cooccurrence_ratio(uniform[:2]))  # expected counts too small to judge
    with pytest.raises(DvectorError):
        pair_cooccurrence_ratio(uniform, quantile=2.0)


def long_run_z(speakers_per_batch: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Per-pair (observed - expected) / sqrt(expected), and the smallest expected count."""
    _, observed, expected = pair_cooccurrence(speakers_per_batch)
    iu = np.triu_indices(len(observed), 1)
    return (observed[iu] - expected[iu]) / np.sqrt(expected[iu]), float(expected[iu].min())


@pytest.mark.parametrize("N, M, seed", [(3, 4, 0), (4, 5, 1), (5, 6, 2), (3, 6, 3)])
def test_speaker_mix_of_a_long_run_is_as_random_as_chance(N, M, seed):
    """16 rounds over one 16-speaker pool: every pair meets about as often as chance predicts.

    Each pair is expected to meet E ~ 20-40 times; under chance its count is about Poisson(E), so
    (O - E) / sqrt(E) is about standard normal and the observed / expected ratio of the worst of
    the 120 pairs is near 1 + 3/sqrt(E). Poisson tails are heavier than Gaussian ones (uniformly
    random batches exceed 5 sigma in about 1 pair in 30,000), so the bound is 1 + 6/sqrt(E),
    i.e. below ~2.3, while fixed groups of speakers score S/(N-1) >= 4 (see above). No pair may
    meet less than 0.2 E times (P(Poisson(20) <= 4) ~ 2e-5; fixed groups give 0). The spread of
    all pairs' z-scores must also match that of uniformly random batches of the same shape.
    Fixed seeds: a statistical bound must not make the suite flaky.
    """
    S = 16
    samples = [{"mel": np.zeros((30, 2), np.float16), "speaker_index": s} for s in range(S) for _ in range(30)]
    rng = np.random.default_rng(seed)
    speakers: list[np.ndarray] = []
    for _ in range(16):  # rounds; one generator carried across them, as the data layer does per pass
        speakers += [b.speaker_index for b in draw_round(samples, N, M, 10, rng, materialize=False)]
    z, e_min = long_run_z(speakers)
    assert e_min > 15
    assert pair_cooccurrence_ratio(speakers) < 1 + 6 / np.sqrt(e_min)
    assert pair_cooccurrence_ratio(speakers, quantile=0.0) > 0.2  # no pair kept apart either
    null = np.random.default_rng(seed + 100)
    z_null, _ = long_run_z([null.choice(S, N, replace=False) for _ in range(len(speakers))])
    assert z.std() < 1.25 * z_null.std()


# --- counts of damage, handed on by the data layer ---------------------------------------------


def test_stats_carry_bad_samples_and_shards_and_add_up():
    a = SamplingStats(batches=2, bad_samples=3, bad_shards=1)
    b = SamplingStats(batches=1, bad_samples=1)
    total = a + b
    assert (total.batches, total.bad_samples, total.bad_shards) == (3, 4, 1)
    a += b
    assert a == total and a.to_dict()["bad_samples"] == 4 and a.to_dict()["bad_shards"] == 1
    stats = SamplingStats()
    draw(make_pool(3), N=4, M=3, stats=stats, materialize=False)
    assert stats.bad_samples == stats.bad_shards == 0, "draw_round reads no shard: the data layer fills these"


def _write_stream_shards(folder) -> list[str]:
    """Two good shards, one with a damaged .npy (a bad sample), one cut short (a broken shard)."""
    from dvector.shards.format import shard_name, write_shard

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)

    def samples(prefix: str, speakers: range) -> list:
        return [(f"{prefix}{s:02d}_{u:02d}", rng.standard_normal((40, N_MELS)).astype(np.float16),
                 {"speaker": f"t/{s}", "speaker_index": s}) for s in speakers for u in range(6)]

    urls = []
    for k, speakers in enumerate([range(0, 4), range(4, 8), range(8, 12), range(12, 16)]):
        path = folder / shard_name(k)
        write_shard(path, samples(f"k{k}s", speakers))
        urls.append(str(path))
    data = bytearray(open(urls[2], "rb").read())
    first_npy = data.index(b"\x93NUMPY")
    data[first_npy:first_npy + 6] = b"\x00garbl"  # one bad sample
    open(urls[2], "wb").write(bytes(data))
    data = open(urls[3], "rb").read()
    open(urls[3], "wb").write(data[: len(data) // 2])  # a broken shard: its rest is skipped
    return urls


def test_consumer_batches_hand_on_the_streams_counts_of_damage(tmp_path):
    import itertools
    import warnings

    from dvector.stream.batches import BatchSettings, consumer_batches
    from dvector.stream.samples import SampleStream
    from dvector.stream.sources import Consumer

    if not hasattr(SampleStream([], Consumer(), 0), "bad_samples"):
        pytest.skip("SampleStream does not count bad samples and shards yet")
    urls = _write_stream_shards(tmp_path / "shards")
    settings = BatchSettings(4, 3, 20, pool_size=24)
    total, passes = SamplingStats(), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for batch, state, stats in itertools.islice(consumer_batches(urls, settings, Consumer()), 200):
            total += stats
            passes.add(state.start.pass_)
            if len(passes) == 3:
                break
    # three passes read the same damage three times: counted once (reliability item 7)
    assert (total.bad_samples, total.bad_shards) == (1, 1)
    assert total.batches > 0


def test_the_loader_checks_samples_against_the_index_not_the_first_sample(tmp_path):
    """A first sample of another mel width, or with a speaker_index beyond the index's table, is the
    bad one: the loader gives the stream the index's n_mels and speaker range."""
    import json
    import warnings

    from dvector.files import write_json_atomic
    from dvector.shards.format import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, shard_name, write_shard
    from dvector.stream import index_checks
    from dvector.stream.loader import ge2e_loader

    rng = np.random.default_rng(0)
    odd = [("a_odd", rng.standard_normal((40, N_MELS + 2)).astype(np.float16), {"speaker_index": 0}),
           ("a_far", rng.standard_normal((40, N_MELS)).astype(np.float16), {"speaker_index": 999})]
    good = [(f"s{s}_{u}", rng.standard_normal((40, N_MELS)).astype(np.float16), {"speaker_index": s})
            for s in range(6) for u in range(6)]
    (tmp_path / "s").mkdir()
    info = write_shard(tmp_path / "s" / shard_name(0), odd + good).to_dict()
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": {"features": {"n_mels": N_MELS}},
             "speakers": [{"id": f"t/{s}", "index": s, "utterances": 6} for s in range(6)], "shards": [info]}
    write_json_atomic(tmp_path / "s" / INDEX_NAME, index)
    checks = index_checks(json.loads((tmp_path / "s" / INDEX_NAME).read_text()))
    assert (checks.n_mels, checks.max_speaker_index) == (N_MELS, 5)
    loader = ge2e_loader(tmp_path / "s", 4, 3, 20, workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (mels, speakers) in enumerate(loader):
            assert mels.shape == (12, 20, N_MELS) and int(speakers.max()) < 6
            if i == 5:
                break
    text = "\n".join(str(w.message) for w in caught)
    assert "a_odd" in text and "a_far" in text
    # counted once each, however many times a pool of this small corpus reads them (reliability item 7)
    assert (loader.stats.bad_samples, loader.stats.bad_shards) == (2, 0)


# ---- reliability item 7: counters count distinct damage ----------------------------------------------

def _counted(urls, settings, consumer, state=None, batches=None, passes=None):
    """(total stats, the last state, warnings about damage) of a consumer's batches until ``batches``
    batches or the batch that reports pass ``passes``."""
    import itertools
    import warnings

    from dvector.stream.batches import consumer_batches

    total, last = SamplingStats(), state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (_, after, stats) in enumerate(itertools.islice(consumer_batches(urls, settings, consumer, state), 500)):
            total += stats
            last = after
            if (batches is not None and i + 1 == batches) or (passes is not None and after.start.pass_ >= passes):
                break
    return total, last, [str(w.message) for w in caught if "skipping" in str(w.message)]


def test_damage_read_again_on_every_pass_is_counted_and_warned_once(tmp_path):
    """The issue: one damaged sample counted 5 times after 6 steps, 6 after 12."""
    from dvector.stream.batches import BatchSettings
    from dvector.stream.sources import Consumer

    urls = _write_stream_shards(tmp_path / "shards")
    settings = BatchSettings(4, 3, 20, pool_size=24)
    total, _, warned = _counted(urls, settings, Consumer(), passes=4)
    assert (total.bad_samples, total.bad_shards) == (1, 1)
    assert len(warned) == 2 and sum("garbl" in w or "sample" in w for w in warned) == 1, warned


def test_a_resumed_stream_does_not_count_damage_again(tmp_path):
    from dvector.stream.batches import BatchSettings, WorkerState
    from dvector.stream.sources import Consumer

    urls = _write_stream_shards(tmp_path / "shards")
    settings = BatchSettings(4, 3, 20, pool_size=24)
    first, state, _ = _counted(urls, settings, Consumer(), passes=1)
    assert (first.bad_samples, first.bad_shards) == (1, 1) and len(state.damage) == 2
    saved = WorkerState.from_dict(state.to_dict())  # as a checkpoint holds it
    assert saved == state
    later, _, warned = _counted(urls, settings, Consumer(), saved, passes=3)
    assert (later.bad_samples, later.bad_shards) == (0, 0) and warned == [] and later.batches > 0
    # a loader restarted at a new pass (other settings) keeps what every rank counted
    from dvector.stream.loader import GE2ELoader
    from dvector.stream import resolve_shards

    loader = GE2ELoader(resolve_shards(urls), settings, workers=0)
    message = loader.restore({"world": 2, "ranks": [{"states": {"0": state.to_dict()}}, None]})
    assert message and all(s.damage == state.damage for s in loader.states.values())


def test_consumers_reading_the_same_shards_count_each_damage_once(tmp_path):
    """Workers that share shards (keeping each other's speaker blocks), and consumers that each read every
    shard (the shared mode of a small corpus): the damage is counted by one of them."""
    import warnings

    from dvector.stream.samples import SampleStream
    from dvector.stream.sources import Consumer, StreamPosition

    urls = _write_stream_shards(tmp_path / "shards")

    def one_pass(stream):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                for pos, _ in stream.samples(StreamPosition()):
                    if pos.pass_ > 0:
                        break
            except DvectorError:  # a worker with no speaker block of its own: it read the shards all the same
                pass
        return stream.bad_samples, stream.bad_shards

    sharing = [one_pass(SampleStream(urls, Consumer(worker=k, workers=8), 0)) for k in range(8)]  # 4 shards, 8 workers
    assert tuple(map(sum, zip(*sharing))) == (1, 1), sharing
    shared = [one_pass(SampleStream(urls, Consumer(), 0, counted_by=(k, 3))) for k in range(3)]
    assert tuple(map(sum, zip(*shared))) == (1, 1), shared
