"""Kaldi data directories, manifests and Lhotse manifests listed as utterances: speakers named as roots
name them, segments cut, commands only when allowed, every bad line one counted problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dvector.corpus.kaldi import scan_kaldi
from dvector.corpus.manifest import scan_manifests
from dvector.errors import DvectorError


def wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(seconds * rate), dtype=np.float32), rate)
    return path


def kaldi_dir(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".") if name == "wav_scp" else folder / name).write_text(text)
    return folder


def reasons(scan) -> str:  # noqa: ANN001
    return "\n".join(f"{w}: {r}" for w, r in scan.problems)


def test_a_kaldi_directory_names_speakers_like_a_root_and_resolves_paths(tmp_path: Path) -> None:
    wav(tmp_path / "audio" / "a1.wav")
    wav(tmp_path / "audio" / "b1.wav")
    data = kaldi_dir(tmp_path / "data" / "train", wav_scp="u-a1 audio/a1.wav\nu-b1 audio/b1.wav\n",
                     utt2spk="u-a1 A\nu-b1 B\n")
    scan = scan_kaldi([str(data)], kaldi_root=tmp_path)
    assert [(u.source, u.speaker, u.path) for u in scan.utterances] == [
        ("u-a1", "train/A", tmp_path / "audio" / "a1.wav"), ("u-b1", "train/B", tmp_path / "audio" / "b1.wav")]
    assert scan.speakers == ["train/A", "train/B"] and scan.problems == []
    merged = scan_kaldi([str(data)], kaldi_root=tmp_path, merge_speakers=True)
    assert merged.speakers == ["A", "B"]


def test_kaldi_segments_cut_their_recordings(tmp_path: Path) -> None:
    wav(tmp_path / "rec.wav", 5.0)
    data = kaldi_dir(tmp_path / "d", wav_scp=f"rec {tmp_path / 'rec.wav'}\n", utt2spk="s1 A\ns2 A\ns3 A\n",
                     segments="s1 rec 0.5 1.5\ns2 rec 2 -1\ns3 rec 3 2\ns4 rec 0 1\n")
    scan = scan_kaldi([str(data)])
    got = {u.source: (u.start, u.end) for u in scan.utterances}
    assert got == {"s1": (0.5, 1.5), "s2": (2.0, 0.0)}
    assert "s3" in reasons(scan) and "empty or negative" in reasons(scan)
    assert f"{data / 'segments'}:4: 's4' is not in utt2spk" in reasons(scan)  # its own line, not its recording's


def test_kaldi_commands_run_only_when_allowed_in_the_kaldi_root(tmp_path: Path) -> None:
    data = kaldi_dir(tmp_path / "d", wav_scp="c1 sox x.wav -t wav - |\n", utt2spk="c1 A\n")
    refused = scan_kaldi([str(data)], kaldi_root=tmp_path)
    assert refused.utterances == [] and "'c1': a command" in reasons(refused) and "--allow-commands" in reasons(refused)
    allowed = scan_kaldi([str(data)], kaldi_root=tmp_path, allow_commands=True)
    assert [u.command for u in allowed.utterances] == [f"cd {tmp_path} && sox x.wav -t wav -"]


def test_relative_paths_that_exist_nowhere_ask_for_kaldi_root(tmp_path: Path) -> None:
    wav(tmp_path / "corpus" / "a.wav")
    data = kaldi_dir(tmp_path / "d", wav_scp="u1 corpus/a.wav\n", utt2spk="u1 A\n")
    with pytest.raises(DvectorError, match="give --kaldi-root"):
        scan_kaldi([str(data)], kaldi_root=tmp_path / "d")
    assert len(scan_kaldi([str(data)], kaldi_root=tmp_path).utterances) == 1


def test_every_bad_kaldi_line_is_one_problem_naming_file_and_line(tmp_path: Path) -> None:
    wav(tmp_path / "a.wav")
    data = kaldi_dir(tmp_path / "d", wav_scp="u1 a.wav\nu1 b.wav\nu2 c.wav\nu3\n",
                     utt2spk="u1 A\nu4 B\nu5 C\n")
    scan = scan_kaldi([str(data)], kaldi_root=tmp_path)
    text = reasons(scan)
    assert f"{data / 'wav.scp'}:2: 'u1' again" in text  # a duplicated id
    assert f"{data / 'wav.scp'}:4: 'u3' has no value" in text
    assert "'u2' is not in utt2spk" in text  # an utterance without a speaker
    assert "'u4' is in utt2spk but not in wav.scp" in text
    assert f"{data / 'utt2spk'}:2: speaker 'B' has no utterance" in text and "speaker 'C' has no utterance" in text
    assert [u.source for u in scan.utterances] == ["u1"]


def test_a_folder_without_wav_scp_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(DvectorError, match="not a Kaldi data directory: it has no wav.scp"):
        scan_kaldi([str(tmp_path / "d")])


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_a_manifest_in_each_format(tmp_path: Path, kind: str) -> None:
    wav(tmp_path / "m" / "x.wav", 3.0)
    rows = [{"path": "x.wav", "speaker": "A"}, {"path": "x.wav", "speaker": "A", "start": "1", "end": "2.5"},
            {"path": "", "speaker": "B"}, {"path": "x.wav", "speaker": "A", "start": "2", "end": "1"}]
    file = tmp_path / "m" / f"train.{kind}"
    if kind == "jsonl":
        file.write_text("".join(json.dumps(r) + "\n" for r in rows) + "[1, 2]\n")
    else:
        sep = "," if kind == "csv" else "\t"
        lines = [sep.join(["path", "speaker", "start", "end"])]
        lines += [sep.join([r["path"], r["speaker"], r.get("start", ""), r.get("end", "")]) for r in rows]
        file.write_text("\n".join(lines) + "\n")
    scan = scan_manifests([str(file)])
    assert [(u.source, u.speaker, u.start, u.end) for u in scan.utterances] == [
        ("x.wav", "train/A", 0.0, 0.0), ("x.wav@1-2.5", "train/A", 1.0, 2.5)]
    assert all(u.path == tmp_path / "m" / "x.wav" for u in scan.utterances)
    text = reasons(scan)
    assert "needs a path and a speaker" in text and "segment 2-1 s is empty" in text
    assert len(scan.problems) == (3 if kind == "jsonl" else 2)


def test_a_manifest_without_the_columns_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("file,who\nx.wav,A\n")
    with pytest.raises(DvectorError, match="path and speaker"):
        scan_manifests([str(tmp_path / "t.csv")])


def test_lhotse_recordings_with_supervisions(tmp_path: Path) -> None:
    lhotse = pytest.importorskip("lhotse")
    audio = wav(tmp_path / "r1.wav", 4.0)
    recordings = lhotse.RecordingSet.from_recordings([lhotse.Recording.from_file(audio, recording_id="r1")])
    supervisions = lhotse.SupervisionSet.from_segments([
        lhotse.SupervisionSegment("r1-a", "r1", start=0.5, duration=1.0, speaker="A"),
        lhotse.SupervisionSegment("r1-b", "r1", start=2.0, duration=1.5, speaker="B"),
        lhotse.SupervisionSegment("r1-c", "r1", start=3.0, duration=0.5, speaker=None)])
    recordings.to_file(tmp_path / "corpus_recordings.jsonl.gz")
    supervisions.to_file(tmp_path / "corpus_supervisions.jsonl.gz")
    from dvector.corpus.lhotse_manifests import scan_lhotse
    scan = scan_lhotse([str(tmp_path / "corpus_supervisions.jsonl.gz"), str(tmp_path / "corpus_recordings.jsonl.gz")])
    assert [(u.source, u.speaker, u.start, u.end, u.path) for u in scan.utterances] == [
        ("r1-a", "corpus_recordings/A", 0.5, 1.5, audio), ("r1-b", "corpus_recordings/B", 2.0, 3.5, audio)]
    assert [w for w, _ in scan.problems] == ["r1-c"]
    cuts = lhotse.CutSet.from_manifests(recordings=recordings, supervisions=supervisions)
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    assert [u.source for u in scan_lhotse([str(tmp_path / "cuts.jsonl.gz")]).utterances] == ["r1-a", "r1-b"]
