"""``embed --format kaldi`` (embeddings.ark + embeddings.scp through kaldiio, written atomically) and
``embed --kaldi DATA_DIR`` (the utterances of a Kaldi data directory, keyed by utterance id)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from dvector.inference.embed_inputs import load_embeddings
from use_helpers import flat, run_main

kaldiio = pytest.importorskip("kaldiio")

REAL_MORE = Path("/work/shared/data/real-more")
SPEECHOCEAN = REAL_MORE / "kaldi" / "speechocean762_train"


def kaldi_data_dir(root: Path, dest: Path, extra_wav: str = "", extra_utt2spk: str = "", segments: str = "") -> Path:
    """A Kaldi data directory over the speaker folders of ``root``: ``SPEAKER-UTT`` ids, wav.scp paths
    relative to ``root`` (the --kaldi-root), utt2spk; ``extra_*`` lines appended, ``segments`` if given."""
    wav, spk = [], []
    for f in sorted(root.rglob("*.flac")):
        rel = f.relative_to(root)
        uid = f"{rel.parts[0]}-{f.stem}"
        wav.append(f"{uid} {rel.as_posix()}\n")
        spk.append(f"{uid} {rel.parts[0]}\n")
    dest.mkdir(parents=True)
    (dest / "wav.scp").write_text("".join(wav) + extra_wav)
    (dest / "utt2spk").write_text("".join(spk) + extra_utt2spk)
    if segments:
        (dest / "segments").write_text(segments)
    return dest


def read_scp(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in kaldiio.load_scp(str(folder / "embeddings.scp")).items()}


def test_embed_writes_a_kaldi_archive_that_kaldiio_reads(trained, small_root: Path, tmp_path: Path,  # noqa: ANN001
                                                          capsys: pytest.CaptureFixture, monkeypatch) -> None:  # noqa: ANN001
    npz = tmp_path / "e.npz"
    code, _, err = run_main(capsys, "embed", trained.run, small_root, "-o", npz, "--threads", "1")
    assert code == 0, err
    out = tmp_path / "kaldi"
    monkeypatch.chdir(tmp_path)  # the index names the archive by its absolute path: readable from anywhere
    code, _, err = run_main(capsys, "embed", trained.run, small_root, "--format", "kaldi", "-o", "kaldi",
                            "--threads", "1")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["embeddings.ark", "embeddings.scp"]  # no temporary file left
    assert "9 embeddings" in flat(err)
    expected, _, _ = load_embeddings(npz)
    monkeypatch.chdir("/")
    got = read_scp(out)
    assert list(got) == list(expected)  # the keys embed uses: paths as reached from the input
    for key, vector in got.items():
        assert vector.dtype == np.float32 and vector.shape == (expected[key].size,)
        np.testing.assert_array_equal(vector, expected[key])
    for line in (out / "embeddings.scp").read_text().splitlines():
        assert line.split(" ", 1)[1].startswith(f"{out / 'embeddings.ark'}:")
    with kaldiio.ReadHelper(f"ark:{out / 'embeddings.ark'}") as reader:  # the archive alone, as Kaldi reads it
        assert [k for k, _ in reader] == list(expected)


def test_per_window_keys_carry_start_and_end_in_milliseconds(trained, tmp_path: Path,  # noqa: ANN001
                                                             capsys: pytest.CaptureFixture) -> None:
    wav = trained.files[0]
    npz = tmp_path / "w.npz"
    assert run_main(capsys, "embed", trained.run, wav, "--per-window", "-o", npz, "--threads", "1")[0] == 0
    out = tmp_path / "w"
    code, _, err = run_main(capsys, "embed", trained.run, wav, "--per-window", "--format", "kaldi", "-o", out,
                            "--threads", "1")
    assert code == 0, err
    vectors, _, times = load_embeddings(npz)
    (key,) = vectors
    assert len(times[key]) >= 2
    expected = {f"{key}-{round(s * 1000):08d}-{round(e * 1000):08d}": v
                for v, (s, e) in zip(vectors[key], times[key])}
    got = read_scp(out)
    assert list(got) == list(expected)
    for k, v in got.items():
        np.testing.assert_array_equal(v, expected[k])
    first = next(iter(got))
    assert first.endswith(f"-00000000-{round(times[key][0][1] * 1000):08d}")


def test_embed_a_kaldi_data_directory_by_utterance_id(trained, small_root: Path, tmp_path: Path,  # noqa: ANN001
                                                      capsys: pytest.CaptureFixture) -> None:
    first = sorted(small_root.rglob("*.flac"))[0]
    rel = first.relative_to(small_root).as_posix()
    data = kaldi_data_dir(small_root, tmp_path / "data" / "test",
                          extra_wav="cmd1 sox x.wav -t wav - |\norphan gone.flac\nrec1 " + rel + "\n",
                          extra_utt2spk="cmd1 X\norphan X\nseg1 X\n")
    (data / "segments").write_text("".join(f"{line.split()[0]} {line.split()[0]} 0 -1\n"
                                           for line in (data / "wav.scp").read_text().splitlines()
                                           if not line.startswith("rec1 "))
                                   + "seg1 rec1 0.2 1.2\n")
    out = tmp_path / "kaldi"
    code, _, err = run_main(capsys, "embed", trained.run, "--kaldi", data, "--kaldi-root", small_root,
                            "--format", "kaldi", "-o", out, "--threads", "1", "-j", "2")
    assert code == 0, err
    got = read_scp(out)
    ids = [line.split()[0] for line in (data / "utt2spk").read_text().splitlines()][:9]
    # the whole files as their segments 0 to -1, and one cut of 1 s; the missing file is skipped, the command refused
    assert sorted(got) == sorted(ids + ["seg1"])
    message = flat(err)
    assert "orphan" in message and "--allow-commands" in message and "skipped" in message

    npz = tmp_path / "one.npz"  # the segment 0 to -1 is the whole file: the same vector as the file itself
    assert run_main(capsys, "embed", trained.run, first, "-o", npz, "--threads", "1")[0] == 0
    vectors, _, _ = load_embeddings(npz)
    uid = f"{first.parent.name}-{first.stem}"
    np.testing.assert_allclose(got[uid], next(iter(vectors.values())), atol=1e-6)
    assert not np.allclose(got["seg1"], got[uid], atol=1e-3)


def test_kaldi_keys_cannot_hold_whitespace(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(trained.files[0], folder / "a b.flac")
    shutil.copy(trained.files[1], folder / "ok.flac")
    code, _, err = run_main(capsys, "embed", trained.run, folder, "--format", "kaldi", "-o", tmp_path / "k",
                            "--threads", "1")
    assert code == 0, err
    assert list(read_scp(tmp_path / "k")) == [str(folder / "ok.flac")]
    assert "a b.flac: a Kaldi key cannot hold whitespace" in flat(err)


def test_a_failed_write_leaves_the_old_pair_whole(trained, tmp_path: Path, capsys: pytest.CaptureFixture,  # noqa: ANN001
                                                  monkeypatch) -> None:  # noqa: ANN001
    out = tmp_path / "k"
    assert run_main(capsys, "embed", trained.run, trained.files[0], "--format", "kaldi", "-o", out,
                    "--threads", "1")[0] == 0
    before = {name: (out / name).read_bytes() for name in ("embeddings.ark", "embeddings.scp")}
    real = kaldiio.save_ark

    def full_disk(ark, arrays, scp=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
        real(ark, dict(list(arrays.items())[:1]), scp=scp, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kaldiio, "save_ark", full_disk)
    code, _, err = run_main(capsys, "embed", trained.run, trained.files[0], trained.files[1], "--format", "kaldi",
                            "-o", out, "--threads", "1")
    assert code == 1 and "No space left on device" in flat(err) and "embeddings" in flat(err)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # no temporary file either
    assert list(read_scp(out)) == [str(trained.files[0])]


def test_kaldi_format_without_kaldiio_is_one_line(trained, tmp_path: Path, capsys: pytest.CaptureFixture,  # noqa: ANN001
                                                   monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, "kaldiio", None)  # import kaldiio raises ImportError
    code, out, err = run_main(capsys, "embed", trained.run, trained.files[0], "--format", "kaldi",
                              "-o", tmp_path / "k")
    assert code == 1 and out == ""
    assert flat(err) == "error: --format kaldi needs kaldiio: pip install 'dvector[kaldi]'"
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("args, message", [
    (["--format", "ark"], "--format takes npz or kaldi"),
    (["--format", "kaldi", "-o", "x.npz"], "-o names a folder"),
    (["--kaldi-root", "."], "--kaldi-root and --allow-commands go with --kaldi"),
])
def test_embed_option_errors(trained, tmp_path: Path, capsys: pytest.CaptureFixture, args: list,  # noqa: ANN001
                             message: str, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "embed", trained.run, trained.files[0], *args)
    assert code == 1 and message in flat(err)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not (SPEECHOCEAN / "wav.scp").is_file(), reason="real data not here: " + str(SPEECHOCEAN))
def test_real_kaldi_directory_twenty_utterances(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    """speechocean762's train directory (wav.scp relative to real-more), its first 20 utterances."""
    data = tmp_path / "speechocean20"
    data.mkdir()
    wav = (SPEECHOCEAN / "wav.scp").read_text().splitlines()[:20]
    ids = {line.split()[0] for line in wav}
    (data / "wav.scp").write_text("\n".join(wav) + "\n")
    (data / "utt2spk").write_text("".join(line + "\n" for line in (SPEECHOCEAN / "utt2spk").read_text().splitlines()
                                          if line.split()[0] in ids))
    out = tmp_path / "emb"
    code, _, err = run_main(capsys, "embed", trained.run, "--kaldi", data, "--kaldi-root", REAL_MORE,
                            "--format", "kaldi", "-o", out, "--threads", "1")
    assert code == 0, err
    got = read_scp(out)
    assert sorted(got) == sorted(ids)
    assert all(np.isclose(np.linalg.norm(v), 1, atol=1e-5) for v in got.values())


def test_embed_needs_inputs_or_a_listing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(capsys, "embed", tmp_path / "no-model")  # refused before the model is looked for
    assert code == 1 and "give at least one audio file, folder or shard URL, or --kaldi DATA_DIR" in flat(err)
