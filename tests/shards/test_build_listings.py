"""build-shards from Kaldi data directories and manifests: the same samples as from files, segments cut,
commands run only when allowed and bounded in time, bad lines counted, and what a root build does holds
(parts, resume byte-identical)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dvector.config import BuildConfig
from dvector.corpus import CorpusInputs
from dvector.errors import DvectorError
from dvector.shards.build import build_shards
from dvector.signal.audio import DecodeError, decode_command
from build_helpers import Corpus, load_index, read_back, shard_files, snapshot

CFG = BuildConfig(min_shards=2, block_size=3)
REAL_MORE = Path(__file__).resolve().parents[3] / "shared" / "data" / "real-more"


def listed_files(corpus: Corpus) -> list[tuple[str, Path]]:
    """(speaker ROOT_SPK, absolute path) of every usable file of the synthetic roots, sorted."""
    roots = {Path(r).name: Path(r) for r in corpus.roots}
    return sorted((f"{name}_{rel.split('/')[0]}", roots[name] / rel) for name, rel in corpus.sources)


def kaldi_of_roots(corpus: Corpus, folder: Path, commands: bool = False) -> Path:
    """A Kaldi data directory listing every usable file of the synthetic roots (absolute paths)."""
    folder.mkdir(parents=True)
    wav, utt2spk = [], []
    for n, (speaker, f) in enumerate(listed_files(corpus)):
        uid = f"{speaker}-{n:03d}"
        wav.append(f"{uid} cat {f} |" if commands and f.suffix == ".wav" else f"{uid} {f}")
        utt2spk.append(f"{uid} {speaker}")
    (folder / "wav.scp").write_text("\n".join(wav) + "\n")
    (folder / "utt2spk").write_text("\n".join(utt2spk) + "\n")
    return folder


def frames_by_speaker(out: Path, listed: bool = True) -> dict[str, list[int]]:
    """Frames of every sample by speaker: ``ROOT_SPK`` (a listing's ``NAME/ROOT_SPK``, a root build's ``ROOT/SPK``)."""
    found: dict[str, list[int]] = {}
    for sample in read_back(out):
        speaker = sample["speaker"].split("/", 1)[1] if listed else sample["speaker"].replace("/", "_")
        found.setdefault(speaker, []).append(int(sample["mel"].shape[0]))
    return {k: sorted(v) for k, v in found.items()}


def test_a_kaldi_directory_builds_the_samples_its_files_give(synth_roots: Corpus, synth_build, tmp_path: Path) -> None:  # noqa: ANN001
    data = kaldi_of_roots(synth_roots, tmp_path / "train")
    report = build_shards(CorpusInputs(kaldi=(str(data),)), tmp_path / "out", CFG, workers=1)
    assert report.index_written
    assert frames_by_speaker(tmp_path / "out") == frames_by_speaker(synth_build.out, listed=False)
    assert {s["id"].split("/")[0] for s in load_index(tmp_path / "out")["speakers"]} == {"train"}


def test_commands_run_only_when_allowed_and_give_the_same_samples(synth_roots: Corpus, tmp_path: Path) -> None:
    data = kaldi_of_roots(synth_roots, tmp_path / "train", commands=True)
    plain = kaldi_of_roots(synth_roots, tmp_path / "plain" / "train")
    refused = build_shards(CorpusInputs(kaldi=(str(data),)), tmp_path / "refused", CFG, workers=1)
    allowed = build_shards(CorpusInputs(kaldi=(str(data),), allow_commands=True), tmp_path / "allowed", CFG, workers=1)
    assert not allowed.scan_problems
    build_shards(CorpusInputs(kaldi=(str(plain),)), tmp_path / "files", CFG, workers=1)
    assert frames_by_speaker(tmp_path / "allowed") == frames_by_speaker(tmp_path / "files")
    commands = sum(1 for line in (data / "wav.scp").read_text().splitlines() if "|" in line)
    assert sum("--allow-commands" in reason for _, reason in refused.scan_problems) == commands > 0


def test_a_command_that_fails_or_hangs_is_a_reason_not_a_hang() -> None:
    with pytest.raises(DecodeError, match=r"exit 3"):
        decode_command("echo oops >&2; exit 3")
    with pytest.raises(DecodeError, match="ran longer than"):
        decode_command("sleep 60", timeout=1)


def test_segments_cut_recordings_and_one_past_the_end_is_skipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rec = tmp_path / "rec.wav"
    sf.write(rec, (0.1 * rng.standard_normal(16000 * 6)).astype(np.float32), 16000)
    data = tmp_path / "d"
    data.mkdir()
    (data / "wav.scp").write_text(f"rec {rec}\n")
    (data / "segments").write_text("a-1 rec 0 2\na-2 rec 2 4\nb-1 rec 1 3\nb-2 rec 3 5.5\nb-3 rec 5 9\n")
    (data / "utt2spk").write_text("a-1 A\na-2 A\nb-1 B\nb-2 B\nb-3 B\n")
    report = build_shards(CorpusInputs(kaldi=(str(data),)), tmp_path / "out", BuildConfig(min_shards=1), workers=1)
    failures = load_index(tmp_path / "out")["failures"]
    assert [f["source"] for f in failures] == ["b-3"] and "runs past the end" in failures[0]["reason"]
    lengths = {s["source"]: int(s["mel"].shape[0]) for s in read_back(tmp_path / "out")}
    assert set(lengths) == {"a-1", "a-2", "b-1", "b-2"} and abs(lengths["b-2"] - 250) <= 5
    assert report.index_written


def test_kaldi_builds_resume_byte_identical_and_build_in_parts(synth_roots: Corpus, tmp_path: Path) -> None:
    data = kaldi_of_roots(synth_roots, tmp_path / "train")
    inputs = CorpusInputs(kaldi=(str(data),))
    build_shards(inputs, tmp_path / "whole", CFG, workers=1)
    whole = snapshot(tmp_path / "whole")
    build_shards(inputs, tmp_path / "parts", CFG, workers=1, part=(2, 2))
    build_shards(inputs, tmp_path / "parts", CFG, workers=1, part=(1, 2))
    assert snapshot(tmp_path / "parts") == whole
    shard_files(tmp_path / "whole")[0].unlink()  # as a build killed before its first shard was renamed
    (tmp_path / "whole" / "index.json").unlink()
    build_shards(inputs, tmp_path / "whole", CFG, workers=1)
    assert snapshot(tmp_path / "whole") == whole


def test_a_manifest_builds_like_the_files_it_lists(synth_roots: Corpus, synth_build, tmp_path: Path) -> None:  # noqa: ANN001
    lines = ["path,speaker"] + [f"{f},{speaker}" for speaker, f in listed_files(synth_roots)]
    (tmp_path / "corpus.csv").write_text("\n".join(lines) + "\n")
    build_shards(CorpusInputs(manifests=(str(tmp_path / "corpus.csv"),)), tmp_path / "out", CFG, workers=1)
    assert frames_by_speaker(tmp_path / "out") == frames_by_speaker(synth_build.out, listed=False)


def test_inputs_named_alike_are_refused(synth_roots: Corpus, tmp_path: Path) -> None:
    data = kaldi_of_roots(synth_roots, tmp_path / Path(synth_roots.roots[0]).name)
    with pytest.raises(DvectorError, match="are both named"):
        build_shards(CorpusInputs(roots=tuple(synth_roots.roots), kaldi=(str(data),)), tmp_path / "out", CFG, workers=1)


@pytest.mark.skipif(not (REAL_MORE / "kaldi" / "speechocean762_train").is_dir(), reason="real-more is absent")
def test_real_more_built_from_its_kaldi_directory_or_its_folders_is_the_same(tmp_path: Path) -> None:
    """Three speakers of real-more both ways (its Kaldi directory names the same 1,250 files)."""
    kaldi = REAL_MORE / "kaldi" / "speechocean762_train"
    speakers = sorted(p.name for p in (REAL_MORE / "speechocean762_train").iterdir() if p.is_dir())[:3]
    subset = tmp_path / "speechocean762_train"
    subset.mkdir()
    for name in ("wav.scp", "utt2spk"):
        lines = [line for line in (kaldi / name).read_text().splitlines() if line.split("-")[0] in speakers]
        (subset / name).write_text("\n".join(lines) + "\n")
    roots = tmp_path / "roots" / "speechocean762_train"
    roots.mkdir(parents=True)
    for spk in speakers:
        os.symlink(REAL_MORE / "speechocean762_train" / spk, roots / spk)
    build_shards(CorpusInputs(kaldi=(str(subset),), kaldi_root=str(REAL_MORE)), tmp_path / "k", CFG, workers=1)
    build_shards([str(roots)], tmp_path / "r", CFG, workers=1)
    a, b = load_index(tmp_path / "k"), load_index(tmp_path / "r")
    assert [(s["id"], s["utterances"]) for s in a["speakers"]] == [(s["id"], s["utterances"]) for s in b["speakers"]]
    assert a["speakers"][0]["id"] == f"speechocean762_train/{speakers[0]}"
    assert a["totals"]["frames"] == b["totals"]["frames"] and a["totals"]["utterances"] == 30
    shutil.rmtree(tmp_path / "roots")
