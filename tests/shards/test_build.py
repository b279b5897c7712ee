"""Tests for dvector.shards.build (and plan, check): multi-root builds read back with plain webdataset, the index,
speaker blocks, determinism, resume, parts, configuration changes and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from build_helpers import SMALL_CFG, Corpus, load_index, read_back, shard_files, snapshot
from dvector.corpus import scan_roots
from dvector.shards.build import BuildReport, build_shards, parse_part
from dvector.shards.index import write_index
from dvector.shards.check import check_shards
from dvector.config import BuildConfig, FeatureConfig, VadConfig
from dvector.errors import DvectorError
from dvector.shards.plan import make_plan
from dvector.signal.process import process_file
from dvector.shards.format import FORMAT_NAME, FORMAT_VERSION

KEY = re.compile(r"^s\d{6}u\d{9}$")


def jsonable(data):
    return json.loads(json.dumps(data))


# ---- a multi-root build read back with plain webdataset ------------------------------------------

def test_build_reads_back_with_webdataset(synth_build: SimpleNamespace) -> None:
    corpus: Corpus = synth_build.corpus
    index = load_index(synth_build.out)
    samples = read_back(synth_build.out)
    assert len(samples) == len(corpus.sources) == index["totals"]["utterances"]
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == len(keys) and all(KEY.match(k) for k in keys)
    assert {(s["root"], s["source"]) for s in samples} == corpus.sources  # every file once, hidden ones not
    speakers = [sp["id"] for sp in index["speakers"]]
    for s in samples:
        mel = s["mel"]
        assert mel.dtype == np.float16 and mel.ndim == 2 and mel.shape == (s["n_frames"], 40)
        assert s["n_frames"] >= 1 and np.all(np.isfinite(mel))
        assert s["speaker"] == speakers[s["speaker_index"]]
        assert s["speaker"].startswith(s["root"] + "/")
        assert s["key"].startswith(f"s{s['speaker_index']:06d}u")
        assert 0 < s["vad"] <= 1 and 1.0 <= s["duration_s"] <= 2.5
        assert s["input_rate"] == (22050 if s["root"] == "vctk" else 16000)
    # same-named speaker folders in two roots stay two speakers
    assert set(speakers) == corpus.speakers
    assert {"vctk/spk000", "libri/spk000"} <= set(speakers)
    assert Counter(s["speaker"] for s in samples)["libri/84"] == 6  # nested chapters belong to their speaker


def test_shard_features_equal_processing_the_file(synth_build: SimpleNamespace) -> None:
    cfg: BuildConfig = synth_build.cfg
    samples = read_back(synth_build.out)
    roots = {Path(r).name: Path(r) for r in synth_build.corpus.roots}
    for s in samples[::7]:
        expected = process_file(roots[s["root"]] / s["source"], cfg.features, cfg.vad)
        np.testing.assert_array_equal(s["mel"], expected.mel)


def test_index_describes_the_build(synth_build: SimpleNamespace) -> None:
    out: Path = synth_build.out
    cfg: BuildConfig = synth_build.cfg
    index = load_index(out)
    assert index["format"] == FORMAT_NAME and index["version"] == FORMAT_VERSION
    assert index["config"] == jsonable(cfg.to_dict()) and index["config_hash"] == cfg.hash()
    assert BuildConfig.from_dict(index["config"]) == cfg  # the record rebuilds the configuration
    assert index["roots"] == {r: Path(r).name for r in synth_build.corpus.roots}
    assert index["failures"] == []
    samples = read_back(out)
    # speaker table
    assert [sp["index"] for sp in index["speakers"]] == list(range(len(index["speakers"])))
    assert [sp["id"] for sp in index["speakers"]] == sorted(sp["id"] for sp in index["speakers"])
    for sp in index["speakers"]:
        mine = [s for s in samples if s["speaker"] == sp["id"]]
        assert sp["utterances"] == len(mine) and sp["frames"] == sum(s["n_frames"] for s in mine)
    # shard entries
    files = shard_files(out)
    assert [e["name"] for e in index["shards"]] == [p.name for p in files] == \
        [f"shard-{i:06d}.tar" for i in range(len(files))]
    for entry, path in zip(index["shards"], files):
        data = path.read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        mine = [s for s in samples if Path(s["url"]).name == path.name]
        assert entry["samples"] == len(mine) and entry["frames"] == sum(s["n_frames"] for s in mine)
        assert entry["speakers"] == sorted({s["speaker_index"] for s in mine})
    totals = index["totals"]
    assert totals == {"shards": len(files), "utterances": len(samples), "frames": sum(s["n_frames"] for s in samples),
                      "speakers": len(index["speakers"]), "failures": 0}
    # nothing else lies in the folder but the shards, the index and the build state
    assert sorted(os.listdir(out)) == sorted([p.name for p in files] + ["index.json", ".build"])


def test_speaker_blocks_are_consecutive(synth_build: SimpleNamespace) -> None:
    """Within shards, a speaker's utterances come in runs; a speaker has at most ceil(U / block) runs."""
    block = synth_build.cfg.block_size
    samples = read_back(synth_build.out)
    runs: Counter[str] = Counter()
    previous = None
    for s in samples:
        here = (s["url"], s["speaker"])
        if here != previous:
            runs[s["speaker"]] += 1
        previous = here
    per_speaker = Counter(s["speaker"] for s in samples)
    for spk, count in per_speaker.items():
        assert runs[spk] <= math.ceil(count / block), f"{spk}: {runs[spk]} runs for {count} utterances"
    # and blocks are shuffled across shards: no shard holds a single speaker only, nor are speakers sorted
    by_shard: dict[str, list[int]] = {}
    for s in samples:
        by_shard.setdefault(s["url"], []).append(s["speaker_index"])
    assert any(len(set(v)) > 1 for v in by_shard.values())
    order = [s["speaker_index"] for s in samples]
    assert order != sorted(order)


def test_small_corpus_gives_several_balanced_shards(synth_build: SimpleNamespace) -> None:
    index = load_index(synth_build.out)
    sizes = [e["samples"] for e in index["shards"]]
    assert len(sizes) == synth_build.cfg.min_shards == synth_build.report.shards_total
    assert max(sizes) - min(sizes) <= synth_build.cfg.block_size


def test_plan_shard_counts_and_sizes(synth_roots: Corpus) -> None:
    scan = scan_roots(synth_roots.roots, SMALL_CFG.extensions)
    total = len(scan.utterances)
    for shard_size, block in [(5, 1), (7, 3), (10, 4), (1000, 2)]:
        cfg = replace(SMALL_CFG, shard_size=shard_size, block_size=block, min_shards=2)
        plan = make_plan(scan, cfg)
        assert plan.n_utterances == total
        assert len(plan.shards) == max(math.ceil(total / shard_size), 2)
        assert max(len(s) for s in plan.shards) < shard_size + block  # the bound, up to one speaker block
    few_blocks = make_plan(scan, replace(SMALL_CFG, block_size=10, min_shards=50))
    assert len(few_blocks.shards) == sum(math.ceil(n / 10) for n in Counter(u.speaker for u in scan.utterances).values())
    # the plan depends on the seed, and only on it
    assert make_plan(scan, SMALL_CFG).shards == make_plan(scan, SMALL_CFG).shards
    assert make_plan(scan, replace(SMALL_CFG, seed=1)).shards != make_plan(scan, SMALL_CFG).shards


# ---- determinism, reruns and resume --------------------------------------------------------------

def test_two_builds_are_byte_identical(synth_build: SimpleNamespace, tmp_path: Path) -> None:
    again = build_shards(synth_build.corpus.roots, tmp_path / "again", SMALL_CFG, workers=1)
    assert again.index_written and again.shards_written == synth_build.report.shards_written
    first, second = snapshot(synth_build.out), snapshot(tmp_path / "again")
    assert sorted(first) == sorted(second) and len(first) == SMALL_CFG.min_shards + 1
    for name in first:
        assert first[name] == second[name], f"{name} differs between two builds of the same input"
    other_seed = build_shards(synth_build.corpus.roots, tmp_path / "seed1", replace(SMALL_CFG, seed=1), workers=2)
    assert other_seed.index_written
    assert snapshot(tmp_path / "seed1")["shard-000000.tar"] != first["shard-000000.tar"]


def test_rerun_skips_complete_shards(synth_build: SimpleNamespace, synth_build_copy: Path) -> None:
    before = snapshot(synth_build_copy)
    report = build_shards(synth_build.corpus.roots, synth_build_copy, SMALL_CFG, workers=2)
    assert report.shards_written == 0 and report.shards_skipped == report.shards_total == SMALL_CFG.min_shards
    assert report.utterances_ok == 0 and report.index_written
    assert snapshot(synth_build_copy) == before


def test_resume_finishes_a_partial_build(synth_build: SimpleNamespace, synth_build_copy: Path) -> None:
    """What a killed run leaves (missing shards, a stale temporary file, no index) is finished identically."""
    out = synth_build_copy
    before = snapshot(out)
    (out / "index.json").unlink()
    for number in (1, 3):
        (out / f"shard-{number:06d}.tar").unlink()
    (out / ".build" / "shard-000002.json").unlink()  # a tar renamed, its record not yet written
    (out / ".shard-000001.tar.tmp-999999").write_bytes(b"half a shard")
    (out / ".build" / ".shard-000003.json.tmp-999999").write_bytes(b"{")
    report = build_shards(synth_build.corpus.roots, out, SMALL_CFG, workers=2)
    assert report.shards_written == 3 and report.shards_skipped == 1 and report.index_written
    assert snapshot(out) == before
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


# ---- parts ---------------------------------------------------------------------------------------

def test_parts_merge_into_the_same_index(synth_build: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    first = build_shards(synth_build.corpus.roots, out, SMALL_CFG, workers=2, part=(1, 2))
    assert not first.index_written and not (out / "index.json").exists()
    assert first.shards_written == 2 and [p.name for p in shard_files(out)] == ["shard-000000.tar", "shard-000002.tar"]
    with pytest.raises(DvectorError, match="2 of 4 shards are not built yet"):
        write_index(out)
    second = build_shards(synth_build.corpus.roots, out, SMALL_CFG, workers=1, part=(2, 2))
    assert second.index_written  # the last part to finish writes the index
    assert snapshot(out) == snapshot(synth_build.out)
    (out / "index.json").unlink()
    write_index(out)
    assert (out / "index.json").read_bytes() == (synth_build.out / "index.json").read_bytes()


@pytest.mark.parametrize("text,expected", [(None, (1, 1)), ("1/1", (1, 1)), ("3/8", (3, 8)), ("8/8", (8, 8))])
def test_parse_part(text, expected) -> None:
    assert parse_part(text) == expected


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "-1/2", "a/b", "1", "1/2/3", "1-2"])
def test_parse_part_errors(text: str) -> None:
    with pytest.raises(DvectorError, match="--part"):
        parse_part(text)


# ---- configuration changes -----------------------------------------------------------------------

def test_different_configuration_is_refused(synth_build: SimpleNamespace, synth_build_copy: Path) -> None:
    before = snapshot(synth_build_copy)
    other = replace(SMALL_CFG, features=FeatureConfig(n_mels=20))
    with pytest.raises(DvectorError, match="different configuration.*--overwrite"):
        build_shards(synth_build.corpus.roots, synth_build_copy, other, workers=2)
    assert snapshot(synth_build_copy) == before  # nothing was touched
    report = build_shards(synth_build.corpus.roots, synth_build_copy, other, workers=2, overwrite=True)
    assert report.index_written and report.shards_skipped == 0
    index = load_index(synth_build_copy)
    assert index["config"]["features"]["n_mels"] == 20 and index["config_hash"] == other.hash()
    assert all(s["mel"].shape[1] == 20 for s in read_back(synth_build_copy))


def test_changed_input_files_are_refused(synth_build: SimpleNamespace, synth_build_copy: Path, tmp_path: Path) -> None:
    roots = [str(tmp_path / "roots" / Path(r).name) for r in synth_build.corpus.roots]
    for src, dst in zip(synth_build.corpus.roots, roots):
        shutil.copytree(src, dst)
    extra = Path(roots[0]) / "spk000" / "utt000.flac"
    shutil.copy(extra, extra.with_name("extra.flac"))
    with pytest.raises(DvectorError, match="different input files"):
        build_shards(roots, synth_build_copy, SMALL_CFG, workers=2)


def test_foreign_shards_are_refused(synth_build: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(DvectorError, match="unknown build"):
        build_shards(synth_build.corpus.roots, out, SMALL_CFG, workers=1)
    report = build_shards(synth_build.corpus.roots, out, SMALL_CFG, workers=2, overwrite=True)
    assert snapshot(out) == snapshot(synth_build.out) and report.index_written


def test_no_audio_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "root" / "spk").mkdir(parents=True)
    (tmp_path / "root" / "spk" / "readme.txt").write_text("x")
    with pytest.raises(DvectorError, match="no audio files"):
        build_shards([str(tmp_path / "root")], tmp_path / "out", SMALL_CFG, workers=1)


def test_config_extensions_are_normalised() -> None:
    assert BuildConfig(extensions=("WAV", ".flac", "wav")).extensions == ("flac", "wav")
    assert BuildConfig().hash() == BuildConfig(extensions=("wav", "flac", "ogg", "mp3")).hash() == \
        BuildConfig(extensions=("MP3", "OGG", "FLAC", "WAV")).hash()


# ---- check ---------------------------------------------------------------------------------------

def test_check_passes_on_a_good_build(synth_build: SimpleNamespace) -> None:
    report = check_shards(synth_build.out, workers=2)
    assert report.ok and report.shards == SMALL_CFG.min_shards and report.problems == []


def test_check_catches_flipped_bytes(synth_build_copy: Path) -> None:
    target = synth_build_copy / "shard-000002.tar"
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    target.write_bytes(bytes(data))
    report = check_shards(synth_build_copy)
    assert not report.ok and {name for name, _ in report.problems} == {"shard-000002.tar"}


def test_check_catches_a_truncated_and_a_missing_shard(synth_build_copy: Path) -> None:
    target = synth_build_copy / "shard-000001.tar"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3])
    (synth_build_copy / "shard-000003.tar").unlink()
    report = check_shards(synth_build_copy, workers=2)
    problems = dict(report.problems)
    assert set(problems) == {"shard-000001.tar", "shard-000003.tar"}
    assert "size" in problems["shard-000001.tar"] and problems["shard-000003.tar"] == "missing"


def test_check_catches_a_corrupt_shard_of_the_right_size(synth_build_copy: Path) -> None:
    target = synth_build_copy / "shard-000000.tar"
    data = bytearray(target.read_bytes())
    data[100:110] = b"\x00" * 10  # inside the first tar header: unreadable, same size
    target.write_bytes(bytes(data))
    report = check_shards(synth_build_copy)
    assert [name for name, _ in report.problems] == ["shard-000000.tar"]


# ---- bad input -----------------------------------------------------------------------------------

def test_bad_inputs_are_skipped_and_listed(messy_build: SimpleNamespace) -> None:
    corpus: Corpus = messy_build.corpus
    report: BuildReport = messy_build.report
    assert report.index_written
    samples = read_back(messy_build.out)
    # every good file is in the shards, including 6-channel, 8-bit, 96 kHz and a non-UTF-8 name
    assert {(s["root"], s["source"]) for s in samples} == corpus.sources
    rates = {s["source"]: s["input_rate"] for s in samples}
    assert rates["spk two/rate96k.wav"] == 96000
    for s in samples:  # nothing invalid reaches a shard
        assert s["mel"].dtype == np.float16 and s["mel"].shape[0] >= 1 and np.all(np.isfinite(s["mel"]))
    assert {s["speaker"] for s in samples} == corpus.speakers
    # every bad file is listed with its reason, in the index and in the report
    index = load_index(messy_build.out)
    listed = {(f["root"], f["source"]): f for f in index["failures"]}
    assert set(listed) == set(corpus.bad)
    for key, fragment in corpus.bad.items():
        assert fragment in listed[key]["reason"], (key, listed[key]["reason"])
        assert listed[key]["speaker"] == f"messy/{key[1].split('/')[0]}"
    assert index["totals"]["failures"] == len(corpus.bad)
    assert report.failures == index["failures"]
    assert [(Path(p).name, r) for p, r in report.scan_problems] == [
        ("messy", "1 audio file(s) directly in the root are not in a speaker directory and were ignored")]
    assert sorted(report.few_utterance_speakers) == sorted(corpus.speakers)  # fewer than 10 each: reported
    # reasons name files, not the folder the corpus happens to be in
    assert str(Path(corpus.roots[0]).parent) not in json.dumps(index["failures"])


def test_fail_fast_stops_at_the_first_bad_file(messy_root: Corpus, tmp_path: Path) -> None:
    cfg = BuildConfig(min_shards=3, block_size=2)
    with pytest.raises(DvectorError, match="--fail-fast") as info:
        build_shards(messy_root.roots, tmp_path / "out", cfg, workers=2, fail_fast=True)
    named = [src for _, src in messy_root.bad if os.fsencode(src).decode("utf-8", "backslashreplace") in str(info.value)]
    assert len(named) == 1
    assert not (tmp_path / "out" / "index.json").exists()


def test_merge_speakers_builds_one_speaker_per_folder_name(synth_roots: Corpus, tmp_path: Path) -> None:
    cfg = replace(SMALL_CFG, merge_speakers=True)
    report = build_shards(synth_roots.roots, tmp_path / "merged", cfg, workers=2)
    assert report.speakers == 4  # spk000..002 merged across the roots, and 84
    index = load_index(tmp_path / "merged")
    assert [s["id"] for s in index["speakers"]] == ["84", "spk000", "spk001", "spk002"]
    assert sum(s["utterances"] for s in index["speakers"]) == len(synth_roots.sources)


def test_build_without_vad_keeps_whole_files(synth_roots: Corpus, tmp_path: Path) -> None:
    cfg = replace(SMALL_CFG, vad=VadConfig(enabled=False))
    build_shards(synth_roots.roots, tmp_path / "novad", cfg, workers=2)
    for s in read_back(tmp_path / "novad"):
        assert s["vad"] == 1.0
        assert abs(s["n_frames"] - (1 + s["duration_s"] * 100)) <= 1  # every frame of the file
