"""Speed perturbation at build time (``build-shards --speed-perturb 0.9,1.1``): each utterance is also
written resampled by each factor, as a new speaker ``ROOT/SPK@sp0.9``; the index records the factors;
check, parts and resume keep working; and a build without the option is what it was before it existed."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from build_helpers import load_index, read_back, rebuild_after_losing, snapshot
from dvector.cli import main
from dvector.config import BuildConfig, VadConfig, parse_speed_perturb
from dvector.corpus import scan_roots
from dvector.demo.synth import write_corpus
from dvector.errors import DvectorError
from dvector.shards.build import build_shards
from dvector.shards.check import check_shards
from dvector.shards.plan import make_plan, source_speaker, speed_speaker
from dvector.signal.process import process_file

FACTORS = (0.9, 1.1)
# no VAD: a perturbed copy's length is then exactly the resampled audio's, 1/factor of the original's
CFG = BuildConfig(min_shards=4, block_size=2, vad=VadConfig(enabled=False), speed_perturb=FACTORS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two roots: 16 kHz wav, and 22.05 kHz flac (resampled to the feature rate as well as perturbed)."""
    base = tmp_path_factory.mktemp("speed_corpus")
    write_corpus(base / "alpha", 2, 4, seed=31, extension="wav", duration_s=(1.0, 1.6))
    write_corpus(base / "beta", 2, 3, seed=32, sample_rate=22050, duration_s=(1.0, 1.6))
    return [str(base / "alpha"), str(base / "beta")]


@pytest.fixture(scope="module")
def builds(corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The corpus built with speed perturbation, and without it (same settings otherwise)."""
    base = tmp_path_factory.mktemp("speed_builds")
    perturbed = build_shards(corpus, base / "perturbed", CFG, workers=2)
    plain = build_shards(corpus, base / "plain", replace(CFG, speed_perturb=()), workers=2)
    return SimpleNamespace(perturbed=base / "perturbed", plain=base / "plain", report=perturbed, plain_report=plain)


# ---- the option --------------------------------------------------------------------------------

def test_parse_speed_perturb() -> None:
    assert parse_speed_perturb("") == parse_speed_perturb(()) == ()
    assert parse_speed_perturb("1.1, 0.9") == parse_speed_perturb([0.9, 1.1, 0.9]) == (0.9, 1.1)
    assert parse_speed_perturb("0.95") == (0.95,)
    assert BuildConfig(speed_perturb="1.1,0.9").speed_perturb == (0.9, 1.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["1.0", "0.5", "2", "0.4", "abc", "0.9,nan", [True]])
def test_bad_speed_factors_are_refused(value) -> None:  # noqa: ANN001
    with pytest.raises(DvectorError, match="speed_perturb"):
        BuildConfig(speed_perturb=value)


def test_a_build_without_the_option_has_the_config_and_hash_it_had_before() -> None:
    """Builds made before the option existed must resume: same record, same hash (values computed with
    the code before speed perturbation was added)."""
    assert "speed_perturb" not in BuildConfig().to_dict()
    assert BuildConfig().hash() == "b17f8d3d059bca6f"
    assert BuildConfig(min_shards=3, block_size=2).hash() == "548be158ef4471aa"
    with_speeds = BuildConfig(speed_perturb=FACTORS)
    assert with_speeds.to_dict()["speed_perturb"] == FACTORS and with_speeds.hash() != BuildConfig().hash()
    assert BuildConfig.from_dict(json.loads(json.dumps(with_speeds.to_dict()))) == with_speeds
    assert BuildConfig.from_dict(BuildConfig().to_dict()) == BuildConfig()


def test_a_plan_without_the_option_is_the_plan_it_was_before(tmp_path: Path) -> None:
    """The keys, files and speaker indices of a default plan, as the code before the option made them."""
    root = tmp_path / "wavcorp"
    write_corpus(root, 3, 5, seed=11, extension="wav", duration_s=(1.0, 1.5))
    cfg = BuildConfig(min_shards=3, block_size=2)
    plan = make_plan(scan_roots([str(root)], cfg.extensions, cfg.merge_speakers), cfg)
    assert plan.speakers == ["wavcorp/spk000", "wavcorp/spk001", "wavcorp/spk002"]
    expected = [[(2, 0), (2, 2), (1, 2), (1, 0), (0, 1)], [(1, 3), (0, 3), (0, 0), (1, 4), (1, 1)],
                [(2, 3), (2, 4), (2, 1), (0, 2), (0, 4)]]
    position = 0
    for shard, want in zip(plan.shards, expected, strict=True):
        for planned, (spk, utt) in zip(shard, want, strict=True):
            assert planned.key == f"s{spk:06d}u{position:09d}" and planned.speaker_index == spk
            assert planned.utterance.source == f"spk{spk:03d}/utt{utt:03d}.wav" and planned.speed == 1.0
            position += 1


def test_speaker_ids_of_copies() -> None:
    assert speed_speaker("vctk/p225", 0.9) == "vctk/p225@sp0.9" and speed_speaker("vctk/p225", 1.0) == "vctk/p225"
    assert source_speaker("vctk/p225@sp0.9") == source_speaker("vctk/p225") == "vctk/p225"
    assert source_speaker("odd@spname") == "odd@spname"


# ---- the plan ------------------------------------------------------------------------------------

def test_the_plan_holds_a_copy_of_every_utterance_per_factor(corpus: list[str]) -> None:
    scan = scan_roots(corpus, CFG.extensions, CFG.merge_speakers)
    plan = make_plan(scan, CFG)
    n = len(scan.speakers)
    assert plan.speakers[:n] == scan.speakers  # the speakers as recorded keep their indices
    assert plan.speakers[n:] == [f"{s}@sp{f}" for f in FACTORS for s in scan.speakers]
    planned = [p for shard in plan.shards for p in shard]
    assert len(planned) == 3 * len(scan.utterances) and len({p.key for p in planned}) == len(planned)
    for p in planned:
        assert plan.speakers[p.speaker_index] == p.speaker == speed_speaker(p.utterance.speaker, p.speed)
    copies = Counter((p.utterance.path, p.speed) for p in planned)
    assert set(copies.values()) == {1} and len(copies) == 3 * len(scan.utterances)
    again = make_plan(scan_roots(corpus, CFG.extensions, CFG.merge_speakers), CFG)
    assert again.shards == plan.shards and again.digest == plan.digest  # deterministic
    assert plan.digest != make_plan(scan, replace(CFG, speed_perturb=())).digest


def test_a_folder_named_like_a_copy_is_refused(tmp_path: Path) -> None:
    write_corpus(tmp_path / "r", 1, 2, seed=1, extension="wav", duration_s=(1.0, 1.1))
    (tmp_path / "r" / "spk000").rename(tmp_path / "r" / "spk000@sp0.9")
    write_corpus(tmp_path / "r", 1, 2, seed=2, extension="wav", duration_s=(1.0, 1.1))
    scan = scan_roots([str(tmp_path / "r")], CFG.extensions, False)
    with pytest.raises(DvectorError, match="named like a speed-perturbed copy"):
        make_plan(scan, CFG)


# ---- the build -----------------------------------------------------------------------------------

def test_copies_are_new_speakers_scaled_in_time(builds: SimpleNamespace) -> None:
    samples = read_back(builds.perturbed)
    index = load_index(builds.perturbed)
    table = [s["id"] for s in index["speakers"]]
    plain = {(s["root"], s["source"]): s for s in read_back(builds.plain)}
    originals = [s["id"] for s in load_index(builds.plain)["speakers"]]
    assert table == originals + [f"{s}@sp{f}" for f in FACTORS for s in originals]
    assert index["config"]["speed_perturb"] == list(FACTORS)
    assert len(samples) == 3 * len(plain) and builds.report.utterances_ok == len(samples)
    counts = Counter(s["speaker_index"] for s in samples)
    assert [s["utterances"] for s in index["speakers"]] == [counts[i] for i in range(len(table))]
    for s in samples:
        assert table[s["speaker_index"]] == s["speaker"]
        original = plain[(s["root"], s["source"])]
        speed = s.get("speed", 1.0)
        assert s["speaker"] == speed_speaker(original["speaker"], speed)
        if "speed" not in s:  # as recorded: the same features as a build without the option
            np.testing.assert_array_equal(s["mel"], original["mel"])
            continue
        assert speed in FACTORS and s["mel"].shape[1] == original["mel"].shape[1]
        assert abs(s["n_frames"] - original["n_frames"] / speed) <= 2, (s["n_frames"], original["n_frames"], speed)
        assert s["duration_s"] == pytest.approx(original["duration_s"] / speed, abs=1e-3)
    assert all("speed" not in s for s in read_back(builds.plain))


def test_speed_changes_duration_and_pitch(corpus: list[str]) -> None:
    """process_file at speed f: 1/f of the samples; the spectrum moves up by f (centroid of mel bands)."""
    path = sorted(Path(corpus[0]).rglob("*.wav"))[0]
    base = process_file(path, CFG.features, CFG.vad)
    fast = process_file(path, CFG.features, CFG.vad, speed=1.1)
    slow = process_file(path, CFG.features, CFG.vad, speed=0.9)
    assert abs(fast.mel.shape[0] - base.mel.shape[0] / 1.1) <= 2
    assert abs(slow.mel.shape[0] - base.mel.shape[0] / 0.9) <= 2

    def centroid(mel: np.ndarray) -> float:
        power = np.exp(mel.astype(np.float64)).mean(axis=0)
        return float((power * np.arange(power.size)).sum() / power.sum())

    assert centroid(slow.mel) < centroid(base.mel) < centroid(fast.mel)


def test_check_passes(builds: SimpleNamespace) -> None:
    report = check_shards(builds.perturbed, workers=1)
    assert report.ok, report.problems


def test_parts_equal_a_whole_build(corpus: list[str], builds: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    first = build_shards(corpus, out, CFG, workers=1, part=(1, 2))
    assert not first.index_written
    second = build_shards(corpus, out, CFG, workers=2, part=(2, 2))
    assert second.index_written and snapshot(out) == snapshot(builds.perturbed)


def test_resume_and_a_changed_option(corpus: list[str], builds: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    report = rebuild_after_losing(corpus, builds.perturbed, out, CFG, "shard-000001.tar")
    assert report.shards_written == 1 and report.index_written and snapshot(out) == snapshot(builds.perturbed)
    with pytest.raises(DvectorError, match="different configuration"):
        build_shards(corpus, out, replace(CFG, speed_perturb=(0.9,)), workers=1)
    with pytest.raises(DvectorError, match="different configuration"):
        build_shards(corpus, out, replace(CFG, speed_perturb=()), workers=1)


def test_the_command_line_option(corpus: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as info:
        main(["build-shards", corpus[1], "-o", str(out), "--speed-perturb", "1.0"])
    assert info.value.code == 1 and "speed_perturb" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["build-shards", corpus[1], "-o", str(out), "--min-shards", "2", "--speed-perturb", "1.1,0.9", "-j", "1"])
    assert info.value.code == 0
    index = load_index(out)
    assert index["config"]["speed_perturb"] == [0.9, 1.1]
    ids = {f"beta/spk00{i}{suffix}" for i in range(2) for suffix in ("", "@sp0.9", "@sp1.1")}
    assert {s["id"] for s in index["speakers"]} == ids
