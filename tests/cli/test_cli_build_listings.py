"""`dvector build-shards --kaldi/--manifest` as a user types it: relative wav.scp paths from --kaldi-root,
commands refused with the flag to run them named, nothing given is one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import use_helpers


def run_main(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    code, out, err = use_helpers.run_main(capsys, *args)
    return int(code or 0), " ".join((out + err).split())


@pytest.fixture
def kaldi_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    for spk in ("A", "B"):
        for n in range(3):
            path = tmp_path / "audio" / spk / f"{n}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    ids = [f"{spk}-{n}" for spk in ("A", "B") for n in range(3)]
    (data / "wav.scp").write_text("".join(f"{i} audio/{i[0]}/{i[2]}.wav\n" for i in ids) + "X-0 cat x.wav |\n")
    (data / "utt2spk").write_text("".join(f"{i} {i[0]}\n" for i in ids) + "X-0 X\n")
    return data


def test_build_shards_from_a_kaldi_directory(kaldi_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shards"
    code, text = run_main(capsys, "build-shards", "--kaldi", kaldi_dir, "--kaldi-root", tmp_path, "-o", out,
                          "-j", 1, "--min-shards", 1)
    assert code == 0, text
    assert "6 written this run" in text and "--allow-commands" in text and "Traceback" not in text
    code, text = run_main(capsys, "check", out)
    assert code == 0, text


def test_build_shards_with_nothing_to_read_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, text = run_main(capsys, "build-shards", "-o", tmp_path / "out")
    assert code == 1 and text.count("error:") == 1 and "--kaldi" in text and "Traceback" not in text


def test_strict_counts_the_lines_a_listing_could_not_use(kaldi_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    code, text = run_main(capsys, "build-shards", "--kaldi", kaldi_dir, "--kaldi-root", tmp_path, "-o",
                          tmp_path / "shards", "-j", 1, "--min-shards", 1, "--strict")
    assert code == 2, text
    assert "scan: 2 problem(s) while listing the input" in text  # the refused command and its speaker left empty
    assert "--strict: 0 file(s) were skipped, 2 problem(s) found listing the input" in text
