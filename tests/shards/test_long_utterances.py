"""Reliability item 3: what the build accepts, every reader reads. An utterance whose features would
make a ``.mel.npy`` member over the readers' limit (``MAX_MEL_BYTES``: 64 MiB, about 2.3 hours of
speech at 40 mels) is written as segments that fit, like ``--split-seconds`` makes them; ``check``,
the training stream and ``iter_shard`` read every one. The limit is made small here (a few seconds of
speech), so that a short file stands for a 4-hour one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from build_helpers import load_index, read_back
from dvector.cli import main
from dvector.config import BuildConfig
from dvector.demo.synth import write_corpus
from dvector.shards import reader
from dvector.shards.build import build_shards
from dvector.shards.check import check_shards
from dvector.shards.plan import segment_key
from dvector.shards.reader import iter_shard
from dvector.shards.shard_job import NPY_HEADER_BYTES, fitting_segment, member_frames
from dvector.stream.samples import SampleStream
from dvector.stream.sources import Consumer

MEMBER_FRAMES = 150  # the most frames a reader takes in one sample, here (1.5 s at 40 mels)
N_MELS = 40


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    limit = MEMBER_FRAMES * N_MELS * 2 + NPY_HEADER_BYTES
    monkeypatch.setattr(reader, "MAX_MEL_BYTES", limit)
    assert member_frames(N_MELS) == MEMBER_FRAMES and fitting_segment(N_MELS) == 100
    return limit


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Utterances of 3.5-6 s (longer than a sample may hold here) and of about 1 s (shorter)."""
    base = tmp_path_factory.mktemp("long_utts")
    write_corpus(base / "long", 2, 2, seed=51, extension="wav", duration_s=(3.5, 6.0))
    write_corpus(base / "short", 2, 2, seed=52, extension="wav", duration_s=(0.9, 1.2))
    return [str(base / "long"), str(base / "short")]


def test_a_too_long_utterance_is_written_in_pieces_every_reader_takes(small_limit: int, corpus: list[str],
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "shards"
    report = build_shards(corpus, out, BuildConfig(min_shards=2, block_size=2), workers=1)
    assert report.failures == [] and report.utterances_ok == 8
    samples = read_back(out)
    pieces = [s for s in samples if "segments" in s]
    whole = [s for s in samples if "segments" not in s]
    assert report.cut_to_fit == len({s["key"][:-4] for s in pieces}) == 4, "the long utterances, each once"
    assert all(s["mel"].shape[0] <= MEMBER_FRAMES for s in samples), "no member over the readers' limit"
    assert all(s["n_frames"] <= MEMBER_FRAMES for s in whole) and len(whole) == 4
    by_utt: dict[str, list[dict]] = {}
    for s in pieces:
        by_utt.setdefault(s["key"][:-4], []).append(s)
    for key, parts in by_utt.items():  # keyed, numbered and sized as --split-seconds makes them
        parts.sort(key=lambda s: s["segment"])
        assert [s["key"] for s in parts] == [segment_key(key, i) for i in range(len(parts))]
        assert {s["segments"] for s in parts} == {len(parts)} and len({s["source"] for s in parts}) == 1
        assert all(s["mel"].shape[0] == 100 for s in parts[:-1]) and 50 <= parts[-1]["mel"].shape[0] <= 149
    # every reader: check, iter_shard, the training stream
    assert check_shards(out).ok
    urls = [str(out / s["name"]) for s in load_index(out)["shards"]]
    assert sum(1 for u in urls for _ in iter_shard(u)) == len(samples)
    stream = SampleStream(urls, Consumer(), 0)
    assert sum(1 for u in urls for _ in stream.shard_samples(u, 0, 1, 0)) == len(samples)
    assert (stream.bad_samples, stream.bad_shards) == (0, 0)
    assert load_index(out)["totals"]["frames"] == sum(s["mel"].shape[0] for s in samples)


def test_without_the_cut_the_readers_would_refuse_them(small_limit: int, corpus: list[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The test bites: a build that kept such an utterance whole wrote a shard that check calls damaged."""
    from dvector.shards import shard_job

    monkeypatch.setattr(shard_job, "member_frames", lambda n_mels: 1 << 40)
    out = tmp_path / "shards"
    build_shards(corpus[:1], out, BuildConfig(min_shards=1), workers=1)
    report = check_shards(out)
    assert not report.ok and "over the limit" in report.problems[0][1]


def test_split_seconds_longer_than_a_sample_may_hold_is_cut_to_fit(small_limit: int, corpus: list[str],
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "shards"
    build_shards(corpus[:1], out, BuildConfig(min_shards=1, split_seconds=2.5), workers=1)
    samples = read_back(out)
    assert max(s["mel"].shape[0] for s in samples) <= MEMBER_FRAMES and check_shards(out).ok


def test_the_command_says_what_it_cut(small_limit: int, corpus: list[str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shards"
    with pytest.raises(SystemExit) as exit_info:
        main(["build-shards", "-o", str(out), "--min-shards", "1", "-j", "1", corpus[0]])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().err.split())
    assert "split: 4 utterance(s) with more speech than one sample may hold (the most a reader takes) written " \
           "as samples of about 0 min" in text, text
    assert json.loads((out / "index.json").read_text())["totals"]["utterances"] > 4


def test_the_real_limit_holds_hours(corpus: list[str]) -> None:
    """At the real limit, 40 mels: over two hours of speech in one sample, segments of about 93 minutes."""
    assert reader.MAX_MEL_BYTES == 64 << 20
    hours = member_frames(40) / 100 / 3600
    assert 2.3 < hours < 2.4 and 92 < fitting_segment(40) / 100 / 60 < 94
    assert np.float16(0).nbytes * 40 * member_frames(40) + NPY_HEADER_BYTES <= reader.MAX_MEL_BYTES
