"""Splitting long utterances at build time (``build-shards --split-seconds S``): each utterance's speech
(its log-mel frames after VAD) becomes samples of about S seconds of the same speaker, keyed from the
utterance's key; the index records the setting; check, parts and resume keep working; it combines
with speed perturbation; and a build without the option is what it was before the option existed."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from build_helpers import load_index, read_back, rebuild_after_losing, snapshot
from dvector.cli import main
from dvector.config import BuildConfig
from dvector.demo.synth import write_corpus
from dvector.errors import DvectorError
from dvector.shards.build import build_shards
from dvector.shards.check import check_shards
from dvector.shards.plan import segment_bounds, segment_frames, segment_key

SPLIT = 1.0  # seconds: 100 frames at the default 10 ms hop
CFG = BuildConfig(min_shards=3, block_size=2, split_seconds=SPLIT)
SEGMENT = segment_frames(SPLIT, CFG.features.hop_ms)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Long utterances (several segments each) and, in a second root, ones shorter than a segment."""
    base = tmp_path_factory.mktemp("split_corpus")
    write_corpus(base / "long", 3, 2, seed=41, extension="wav", duration_s=(3.0, 5.5))
    write_corpus(base / "short", 2, 2, seed=42, duration_s=(0.5, 0.8))
    return [str(base / "long"), str(base / "short")]


@pytest.fixture(scope="module")
def builds(corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The corpus built split, whole (same settings otherwise), and split with speed perturbation."""
    base = tmp_path_factory.mktemp("split_builds")
    split = build_shards(corpus, base / "split", CFG, workers=1)
    whole = build_shards(corpus, base / "whole", replace(CFG, split_seconds=0.0), workers=1)
    speeds = build_shards(corpus, base / "speeds", replace(CFG, speed_perturb=(0.9, 1.1)), workers=1)
    return SimpleNamespace(split=base / "split", whole=base / "whole", speeds=base / "speeds",
                           report=split, whole_report=whole, speeds_report=speeds)


# ---- the rule and the setting --------------------------------------------------------------------

@pytest.mark.parametrize("n_frames", [1, 99, 100, 149, 150, 199, 200, 249, 250, 1234])
def test_segment_bounds_cover_the_utterance(n_frames: int) -> None:
    bounds = segment_bounds(n_frames, 100)
    assert bounds[0][0] == 0 and bounds[-1][1] == n_frames
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no overlap, nothing lost
    lengths = [stop - start for start, stop in bounds]
    if n_frames < 100:
        assert lengths == [n_frames]  # shorter than a segment: stays whole
    else:
        assert all(length == 100 for length in lengths[:-1]) and 50 <= lengths[-1] < 150
        assert len(bounds) == n_frames // 100 + (n_frames % 100 >= 50)


def test_segment_bounds_examples() -> None:
    assert segment_bounds(249, 100) == [(0, 100), (100, 249)]  # 49 frames left: joined to the last segment
    assert segment_bounds(250, 100) == [(0, 100), (100, 200), (200, 250)]  # half a segment: its own
    assert segment_bounds(500, 0) == [(0, 500)]  # off
    assert segment_frames(2.0, 10.0) == 200 and segment_frames(0.0, 10.0) == 0
    assert segment_key("s000003u000000042", 2) == "s000003u000000042g002"


def test_the_setting_is_recorded_only_when_on() -> None:
    assert "split_seconds" not in BuildConfig().to_dict()
    assert BuildConfig().hash() == "b17f8d3d059bca6f"  # the hash of the defaults before the option existed
    assert BuildConfig(split_seconds=0).hash() == BuildConfig().hash()
    on = BuildConfig(split_seconds=2)
    assert on.to_dict()["split_seconds"] == 2.0 and on.hash() != BuildConfig().hash()
    assert BuildConfig.from_dict(json.loads(json.dumps(on.to_dict()))) == on


@pytest.mark.parametrize("value", [-1.0, 0.05, float("nan"), 1e9, True])
def test_bad_split_lengths_are_refused(value: float) -> None:
    with pytest.raises(DvectorError, match="split_seconds"):
        BuildConfig(split_seconds=value)


# ---- the build -----------------------------------------------------------------------------------

def test_segments_are_the_utterance_cut_in_order(builds: SimpleNamespace) -> None:
    whole = {s["key"]: s for s in read_back(builds.whole)}
    samples = read_back(builds.split)
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == len(keys)
    by_utterance: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        assert s["key"][:-4] in whole and s["key"][-4] == "g"
        by_utterance[s["key"][:-4]].append(s)
    assert set(by_utterance) == set(whole)  # every utterance, under its planned key
    several = 0
    for key, parts in by_utterance.items():
        original = whole[key]
        parts.sort(key=lambda s: s["segment"])
        assert [s["key"] for s in parts] == [segment_key(key, i) for i in range(len(parts))]
        assert [s["segment"] for s in parts] == list(range(len(parts)))
        assert {s["segments"] for s in parts} == {len(parts)}
        np.testing.assert_array_equal(np.concatenate([s["mel"] for s in parts]), original["mel"])
        lengths = [s["n_frames"] for s in parts]
        assert lengths == [stop - start for start, stop in segment_bounds(original["n_frames"], SEGMENT)]
        for s in parts:  # the same speaker and source; the utterance's duration and VAD fraction
            for name in ("speaker", "speaker_index", "root", "source", "duration_s", "vad"):
                assert s[name] == original[name], name
        several += len(parts) > 1
    assert several >= 6  # the long root's utterances were split
    assert all(len(by_utterance[k]) == 1 for k, s in whole.items() if s["root"] == "short")  # too short: whole


def test_index_and_report_count_samples(builds: SimpleNamespace) -> None:
    index = load_index(builds.split)
    samples = read_back(builds.split)
    assert index["config"]["split_seconds"] == SPLIT and "split_seconds" not in load_index(builds.whole)["config"]
    assert index["totals"]["utterances"] == len(samples) and index["totals"]["speakers"] == 5
    counts = Counter(s["speaker_index"] for s in samples)
    assert [s["utterances"] for s in index["speakers"]] == [counts[i] for i in range(5)]
    assert index["totals"]["frames"] == load_index(builds.whole)["totals"]["frames"]
    report, whole = builds.report, builds.whole_report
    assert report.utterances_ok == whole.utterances_ok == whole.samples_ok == 10
    assert report.samples_ok == len(samples) > report.utterances_ok
    assert report.audio_s == pytest.approx(whole.audio_s)  # each utterance's audio counted once


def test_check_passes(builds: SimpleNamespace) -> None:
    for folder in (builds.split, builds.speeds):
        report = check_shards(folder, workers=1)
        assert report.ok, report.problems


def test_with_speed_perturbation(builds: SimpleNamespace) -> None:
    samples = read_back(builds.speeds)
    table = [s["id"] for s in load_index(builds.speeds)["speakers"]]
    assert len({s["key"] for s in samples}) == len(samples)
    assert builds.speeds_report.utterances_ok == 30 and builds.speeds_report.samples_ok == len(samples)
    speeds = Counter(s.get("speed", 1.0) for s in samples if s["segment"] == 0)
    assert speeds == {1.0: 10, 0.9: 10, 1.1: 10}
    for s in samples:
        assert table[s["speaker_index"]] == s["speaker"]
        if s["segment"] < s["segments"] - 1:
            assert s["n_frames"] == SEGMENT
        elif s["segments"] > 1:
            assert SEGMENT // 2 <= s["n_frames"] < SEGMENT + SEGMENT // 2
    plain = [s for s in samples if "speed" not in s]

    def lengths(items: list[dict]) -> dict[tuple[str, str], list[int]]:
        out: dict[tuple[str, str], list[int]] = defaultdict(list)
        for s in sorted(items, key=lambda s: s["segment"]):
            out[(s["root"], s["source"])].append(s["n_frames"])
        return dict(out)

    assert lengths(plain) == lengths(read_back(builds.split))  # as recorded: split as without perturbation
    slow = sum(s["n_frames"] for s in samples if s.get("speed") == 0.9)
    fast = sum(s["n_frames"] for s in samples if s.get("speed") == 1.1)
    assert slow > sum(s["n_frames"] for s in plain) > fast


def test_parts_equal_a_whole_build(corpus: list[str], builds: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    assert not build_shards(corpus, out, CFG, workers=1, part=(2, 2)).index_written
    assert build_shards(corpus, out, CFG, workers=1, part=(1, 2)).index_written
    assert snapshot(out) == snapshot(builds.split)  # the same keys and bytes: stable


def test_resume_and_a_changed_length(corpus: list[str], builds: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    report = rebuild_after_losing(corpus, builds.split, out, CFG, "shard-000000.tar")
    assert report.shards_written == 1 and report.index_written and snapshot(out) == snapshot(builds.split)
    for other in (0.0, 2.0):
        with pytest.raises(DvectorError, match="different configuration"):
            build_shards(corpus, out, replace(CFG, split_seconds=other), workers=1)


def test_without_the_option_nothing_changes(corpus: list[str], builds: SimpleNamespace, tmp_path: Path) -> None:
    """The default build equals one made with the option at 0, and holds no segment fields."""
    default = build_shards(corpus, tmp_path / "default", BuildConfig(min_shards=3, block_size=2), workers=1)
    assert snapshot(tmp_path / "default") == snapshot(builds.whole)
    assert default.samples_ok == default.utterances_ok
    assert all("segment" not in s and "g" not in s["key"] for s in read_back(builds.whole))


def test_the_command_line_option(corpus: list[str], builds: SimpleNamespace, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as info:
        main(["build-shards", *corpus, "-o", str(out), "--min-shards", "3", "--block-size", "2",
              "--split-seconds", "1", "-j", "1"])
    assert info.value.code == 0
    assert snapshot(out) == snapshot(builds.split)
    assert f"as {builds.report.samples_ok} sample(s)" in " ".join(capsys.readouterr().err.split())
