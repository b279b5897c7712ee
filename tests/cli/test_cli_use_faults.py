"""`embed` and `eval` through the console entry point keep their results whatever the names of the
files they skip (rich markup such as ``[/``, bytes that are not UTF-8) and wherever they cannot write."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dvector.evaluation import results
from dvector.inference.embed_inputs import embed_paths, load_embeddings
from use_helpers import KILL_MARK, copy_run, dying_embed_job, flat, run_main


@pytest.fixture
def odd_folder(trained, tmp_path: Path) -> Path:  # noqa: ANN001
    """Good files, one named with bytes that are not UTF-8, and a bad file at ``x[/b].wav``
    (``[/b]`` reads as a closing tag in rich markup) and one at a non-UTF-8 name."""
    folder = tmp_path / "in"
    (folder / "x[").mkdir(parents=True)
    shutil.copy(trained.files[0], folder / "good.flac")
    shutil.copy(trained.files[1], os.path.join(os.fsencode(folder), b"\xff\xfe.flac"))
    (folder / "x[" / "b].wav").write_text("not audio")
    with open(os.path.join(os.fsencode(folder), b"bad \xfd.wav"), "w") as f:
        f.write("not audio either")
    return folder


def test_embed_lists_odd_names_literally_and_writes_the_npz(trained, odd_folder: Path, tmp_path: Path,  # noqa: ANN001
                                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "emb.npz"
    code, _, err = run_main(capsys, "embed", trained.run, odd_folder, "-o", out, "--threads", "1")
    assert code == 0, err
    assert "Traceback" not in err and "error" not in err
    text = flat(err)
    assert "skipped 2 file(s)" in text
    assert f"{odd_folder}/x[/b].wav: cannot decode" in text  # literally, not read as markup
    assert f"{odd_folder}/bad \\xfd.wav: cannot decode" in text  # the undecodable byte shown, not lost
    vectors, info, _ = load_embeddings(out)
    assert set(vectors) == {str(odd_folder / "good.flac"), os.fsdecode(os.path.join(os.fsencode(odd_folder),
                                                                                    b"\xff\xfe.flac"))}
    assert info["step"] == 5 and f"wrote {out}: 2 embeddings" in text


def test_eval_lists_odd_names_literally_and_prints_the_eer(trained, tmp_path: Path,  # noqa: ANN001
                                                           capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained.run, tmp_path / "run")
    root = tmp_path / "root"
    for k, speaker in enumerate(sorted(p for p in trained.root.iterdir() if p.is_dir())[:3]):
        dest = root / (f"x{k}[" if k == 0 else speaker.name)
        dest.mkdir(parents=True)
        for f in sorted(speaker.iterdir())[:3]:
            shutil.copy(f, dest / f.name)
    (root / "x0[" / "b].flac").write_text("not audio")
    with open(os.path.join(os.fsencode(root / "x0["), b"\xfe.flac"), "w") as f:
        f.write("not audio")
    code, out, err = run_main(capsys, "eval", run, root, "--n-nontarget", "20", "--threads", "1")
    assert code == 0, err
    assert "EER=" in out and "Traceback" not in err
    text = flat(err)
    assert "skipped 2 file(s)" in text and "x0[/b].flac: cannot decode" in text and "x0[/\\xfe.flac" in text
    assert (run / "eval.json").is_file() and (run / "det.png").is_file()


@pytest.mark.parametrize("error", [OSError(errno.EROFS, "Read-only file system"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_eval_into_a_read_only_model_folder_prints_the_eer(error: OSError, trained, tmp_path: Path,  # noqa: ANN001
                                                           capsys: pytest.CaptureFixture, monkeypatch) -> None:  # noqa: ANN001
    """A model folder on read-only storage (simulated: tests may run as root, who writes anyway)."""
    run = copy_run(trained.run, tmp_path / "run")

    def refuse(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise error

    monkeypatch.setattr(results, "write_output", refuse)
    monkeypatch.setattr(results, "save_det", refuse)
    root = trained.root
    code, out, err = run_main(capsys, "eval", run, root, "--n-nontarget", "20", "--threads", "1")
    assert code == 0, err
    assert "EER=" in out and "minDCF" in out and "Traceback" not in err
    text = flat(err)
    assert f"warning: could not write {run / 'eval.json'}: {error.strerror}" in text
    assert f"warning: could not write {run / 'det.png'}: {error.strerror}" in text
    assert "results:" not in text and "DET curve:" not in text


def test_embed_to_a_read_only_place_is_one_error_line(trained, tmp_path: Path, capsys: pytest.CaptureFixture,  # noqa: ANN001
                                                      monkeypatch) -> None:  # noqa: ANN001
    import numpy as np

    def refuse(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(np, "savez", refuse)
    code, _, err = run_main(capsys, "embed", trained.run, trained.files[0], "-o", tmp_path / "e.npz", "--threads", "1")
    assert code == 1 and "Traceback" not in err
    assert "error: cannot write" in err and "Read-only file system" in err


def test_embed_keeps_its_results_when_a_worker_process_is_killed(trained, embedder, tmp_path: Path,  # noqa: ANN001
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch) -> None:  # noqa: ANN001
    """Before: a BrokenProcessPool traceback and no .npz. Now the inputs of the jobs a dead worker took
    with it are embedded again, one by one in a fresh process; the one it dies on again is skipped with
    its reason, and the rest are written (the same vectors as one process)."""
    from dvector.inference import embed_inputs

    folder = tmp_path / "in"
    folder.mkdir()
    good = [folder / f.name for f in trained.files[:3]]
    for src, dest in zip(trained.files, good):
        shutil.copy(src, dest)
    shutil.copy(trained.files[3], folder / f"zz-{KILL_MARK}.flac")  # last: its worker dies on it, every time
    monkeypatch.setattr(embed_inputs, "_embed_job", dying_embed_job)
    out = tmp_path / "e.npz"
    code, _, err = run_main(capsys, "embed", trained.run, folder, "-o", out, "-j", "2", "--threads", "1")
    assert code == 0, err
    text = flat(err)
    assert "Traceback" not in err and "skipped 1 file(s):" in text
    assert f"{folder / ('zz-' + KILL_MARK + '.flac')}: its worker process died (killed, perhaps for lack of memory)" \
        in text
    vectors, _, _ = load_embeddings(out)
    assert sorted(vectors) == [str(p) for p in good]
    one = embed_paths(embedder, [str(p) for p in good]).vectors  # in this process, as without -j
    assert all(np.array_equal(vectors[key], one[key]) for key in one)
