"""Faults met when using a model: non-UTF-8 file names as .npz keys, a model folder that cannot be
written to, audio that gives non-finite features, and trials that name files outside the root."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dvector.demo.synth import random_voice, utterance
from dvector.errors import DvectorError
from dvector.use import results
from dvector.use.embed_inputs import (MODEL_KEY, EmbedResult, embed_paths, key_of, load_embeddings, member_name,
                                      save_embeddings)
from dvector.use.embedder import EmbedError
from dvector.use.evaluate import Trial, check_trial_files, evaluate, parse_trials, read_trials
from dvector.use.results import DET_FILE, EVAL_FILE, run_eval
from use_helpers import copy_run, write_wav

RATE = 16000


# ---- .npz keys: stored losslessly ------------------------------------------------------------------

@pytest.mark.parametrize("key", ["spk/a.wav", os.fsdecode(b"spk/\xff\xfe.wav"), "__model__", "__times__/x",
                                 "__fs__/41", "[/b].wav", "caf\u00e9/\u00e9t\u00e9.flac"])
def test_member_names_round_trip(key: str) -> None:
    member = member_name(key)
    member.encode("utf-8")  # a zip member name must be valid UTF-8
    assert key_of(member) == key
    assert member == key or member.startswith("__fs__/")


def test_non_utf8_file_names_are_stored_and_read_back(trained, embedder, tmp_path: Path) -> None:  # noqa: ANN001
    folder = tmp_path / "in"
    folder.mkdir()
    odd = os.path.join(os.fsencode(folder), b"\xff\xfe.flac")
    shutil.copy(trained.files[0], odd)
    shutil.copy(trained.files[1], folder / "plain.flac")
    shutil.copy(trained.files[2], folder / "__model__.flac")
    result = embed_paths(embedder, [str(folder)], ["flac"])
    expected = {os.path.join(str(folder), name) for name in (os.fsdecode(b"\xff\xfe.flac"), "plain.flac",
                                                              "__model__.flac")}
    assert set(result.vectors) == expected
    out = save_embeddings(tmp_path / "emb.npz", result, embedder)
    vectors, info, times = load_embeddings(out)
    assert set(vectors) == expected and not times and info["step"] == 5
    for key in expected:
        np.testing.assert_array_equal(vectors[key], result.vectors[key].astype(np.float32))
    with np.load(out) as z:
        assert MODEL_KEY in z.files and all(name.isprintable() for name in z.files)

    windows = embed_paths(embedder, [os.fsdecode(odd)], per_window=True)
    vectors, _, times = load_embeddings(save_embeddings(tmp_path / "win.npz", windows, embedder))
    assert set(vectors) == set(times) == {os.path.normpath(os.fsdecode(odd))}


def test_an_unwritable_npz_is_one_clear_error(embedder, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    def refuse(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(np, "savez", refuse)
    result = EmbedResult(vectors={"a": np.ones(embedder.dim, dtype=np.float32)})
    with pytest.raises(DvectorError, match="cannot write .*out.npz: Read-only file system"):
        save_embeddings(tmp_path / "out.npz", result, embedder)
    assert list(tmp_path.iterdir()) == []


# ---- eval in a model folder that cannot be written -------------------------------------------------

@pytest.mark.parametrize("error", [OSError(errno.EROFS, "Read-only file system"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_eval_into_a_read_only_model_folder_keeps_its_results(error: OSError, trained, small_root: Path,  # noqa: ANN001
                                                              tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    run = copy_run(trained.run, tmp_path / "run")

    def refuse(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise error

    monkeypatch.setattr(results, "write_json_atomic", refuse)
    monkeypatch.setattr(results, "save_det", refuse)
    done = run_eval(run, small_root, n_nontarget=20, threads=1)
    assert 0 <= done.result.eer <= 1 and done.result.n_target == 9
    assert (done.results_path, done.det_path) == (None, None)
    assert len(done.warnings) == 2
    assert done.warnings[0].startswith(f"could not write {run / EVAL_FILE}: {error.strerror}")
    assert done.warnings[1].startswith(f"could not write {run / DET_FILE}: {error.strerror}")
    assert not (run / EVAL_FILE).exists() and not (run / DET_FILE).exists()


def test_eval_when_only_the_det_curve_fails(trained, small_root: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    run = copy_run(trained.run, tmp_path / "run")

    def refuse(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results, "save_det", refuse)
    done = run_eval(run, small_root, n_nontarget=20, threads=1)
    assert (done.results_path, done.det_path) == (run / EVAL_FILE, None)
    assert [w.split(":")[0] for w in done.warnings] == [f"could not write {run / DET_FILE}"]
    stored = json.loads((run / EVAL_FILE).read_text())
    assert stored["det"] is None and stored["eer"] == pytest.approx(done.result.eer)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes whatever the mode")
def test_eval_into_a_chmod_read_only_model_folder(trained, small_root: Path, tmp_path: Path) -> None:  # noqa: ANN001
    run = copy_run(trained.run, tmp_path / "run")
    run.chmod(0o555)
    try:
        done = run_eval(run, small_root, n_nontarget=20, threads=1)
    finally:
        run.chmod(0o755)
    assert (done.results_path, done.det_path) == (None, None) and len(done.warnings) == 2


# ---- non-finite features ---------------------------------------------------------------------------

def test_huge_amplitude_audio_is_an_embed_error_not_a_nan_vector(embedder, tmp_path: Path) -> None:  # noqa: ANN001
    rng = np.random.default_rng(6)
    wav = utterance(random_voice(rng), 1.5, RATE, rng)
    huge = tmp_path / "folder" / "huge.wav"
    huge.parent.mkdir()
    sf.write(huge, (wav * 1e20).astype(np.float32), RATE, subtype="FLOAT")
    write_wav(tmp_path / "folder" / "fine.wav", wav)
    for embed in (embedder.embed, embedder.per_window):
        with pytest.raises(EmbedError, match="non-finite features"):
            embed(huge)
    result = embed_paths(embedder, [str(huge.parent)])
    assert list(result.vectors) == [str(tmp_path / "folder" / "fine.wav")]
    assert [(Path(k).name, r.split(":")[0]) for k, r in result.skipped] == [("huge.wav", "non-finite features")]
    assert all(np.all(np.isfinite(v)) for v in result.vectors.values())


# ---- trials that leave the root --------------------------------------------------------------------

@pytest.mark.parametrize("path, why", [
    ("../outside/x.wav", "climbs out with '..'"), ("spk/../../x.wav", "climbs out with '..'"),
    ("spk/..", "climbs out with '..'"), ("/etc/passwd", "is an absolute path"),
])
def test_trials_naming_files_outside_the_root_are_refused(path: str, why: str) -> None:
    with pytest.raises(DvectorError) as err:
        parse_trials(["1 spk/a.wav spk/b.wav", f"0 spk/a.wav {path}"], "veri.txt")
    assert str(err.value).startswith(f"veri.txt line 2: {path!r} {why}")
    with pytest.raises(DvectorError, match=why):
        check_trial_files([Trial(0, "spk/a.wav", path)], "/data/root")


def test_dots_inside_names_are_fine() -> None:
    assert parse_trials(["1 spk..1/a..wav spk/.b.wav"]) == [Trial(1, "spk..1/a..wav", "spk/.b.wav")]


def test_evaluate_never_reads_outside_the_root(trained, embedder, small_root: Path, tmp_path: Path,  # noqa: ANN001
                                               monkeypatch) -> None:  # noqa: ANN001
    root = tmp_path / "root"
    shutil.copytree(small_root, root)
    outside = tmp_path / "outside.flac"
    shutil.copy(trained.files[0], outside)
    speakers = sorted(p.name for p in root.iterdir())
    a, b = (f"{speakers[0]}/{sorted(os.listdir(root / speakers[0]))[k]}" for k in (0, 1))
    opened = []
    real_embed = embedder.embed
    monkeypatch.setattr(embedder, "embed", lambda source: opened.append(Path(source)) or real_embed(source))
    for bad in ("../outside.flac", str(outside)):
        trials = tmp_path / "trials.txt"
        trials.write_text(f"1 {a} {b}\n0 {a} {bad}\n")
        with pytest.raises(DvectorError, match=r"trials.txt line 2: .* trial paths are relative"):
            evaluate(embedder, root, trials)
    assert opened == []
    os.symlink(outside, root / speakers[1] / "linked.flac")  # a link the user put inside the root is followed
    trials.write_text(f"1 {a} {b}\n0 {a} {speakers[1]}/linked.flac\n")
    done = evaluate(embedder, root, trials)
    assert done.result.n_trials == 2 and len(read_trials(trials)) == 2


# ---- resource bounds -------------------------------------------------------------------------------

def test_embedding_audio_of_an_absurd_rate_is_refused(embedder, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(EmbedError, match="the waveform: sample rate 1 Hz is outside"):
        embedder.embed((np.zeros(4000, np.float32), 1))
    one_hz = tmp_path / "folder" / "one_hz.wav"
    one_hz.parent.mkdir()
    sf.write(one_hz, np.zeros(4000, np.int16), 1, subtype="PCM_16")  # 8 KB claiming 4000 s
    with pytest.raises(EmbedError, match="sample rate 1 Hz"):
        embedder.embed(one_hz)
    result = embed_paths(embedder, [str(one_hz.parent)])
    assert not result.vectors and [r.split(" is ")[0] for _, r in result.skipped] == ["sample rate 1 Hz"]
