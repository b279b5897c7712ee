"""build-shards on a bad day: a full disk, read-only storage, a worker killed, symlinked corpora.
Each is one clear line (no traceback), keeps the shards already finished, and a rerun resumes."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from build_helpers import SMALL_ARGS, Corpus, load_index, snapshot
from dvector.cli import main
from dvector.shards import build, build_folder, index, shard_job


def run_main(capsys: pytest.CaptureFixture, *args) -> tuple[int, str]:  # noqa: ANN002
    """The console entry point as a user runs it: exit status and everything printed."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def flat(text: str) -> str:
    return " ".join(text.split())


def refusing(error: int, message: str, after: int = 0):  # noqa: ANN201
    """A writer that works ``after`` times, then raises OSError(error) naming the file it was given."""
    calls = []

    def wrap(real):  # noqa: ANN001, ANN202
        def writer(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            calls.append(path)
            if len(calls) > after:
                raise OSError(error, message, str(path))
            return real(path, *args, **kwargs)
        return writer
    return wrap


def build_args(corpus: Corpus, out: Path, workers: int = 1) -> list:
    return ["build-shards", "-o", out, *SMALL_ARGS, "-j", workers, *corpus.roots]


@pytest.mark.parametrize("where", ["shard", "record"])
def test_disk_full_is_one_line_and_a_rerun_resumes(where: str, synth_build: SimpleNamespace, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "shards"
    wrap = refusing(errno.ENOSPC, "No space left on device", after=1)
    if where == "shard":
        monkeypatch.setattr(shard_job, "write_shard", wrap(shard_job.write_shard))
    else:
        monkeypatch.setattr(shard_job, "write_json_atomic", wrap(shard_job.write_json_atomic))
    code, text = run_main(capsys, *build_args(synth_build.corpus, out))
    assert code == 1 and "Traceback" not in text
    line = flat(text)
    failed = "shard-000001.tar" if where == "shard" else "shard-000001.json"
    assert f"error: cannot write {out / failed if where == 'shard' else out / '.build' / failed}: " \
           "no space left on the device (or over quota)" in line
    assert "rerun the same command to resume" in line
    assert (out / "shard-000000.tar").is_file() and not (out / "index.json").exists()
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in out.iterdir())  # no half-written files
    monkeypatch.undo()
    code, text = run_main(capsys, *build_args(synth_build.corpus, out))
    assert code == 0, text
    assert "1 already complete" in flat(text)
    assert snapshot(out) == snapshot(synth_build.out)


@pytest.mark.parametrize("error, why", [(errno.EROFS, "the storage is read-only"),
                                        (errno.EACCES, "permission denied")])
def test_unwritable_output_is_one_line(error: int, why: str, synth_roots: Corpus, tmp_path: Path,
                                       capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "shards"
    monkeypatch.setattr(build_folder, "write_json_atomic", refusing(error, os.strerror(error))(None))
    code, text = run_main(capsys, *build_args(synth_roots, out))
    assert code == 1 and "Traceback" not in text
    assert f"error: cannot write {out / '.build' / 'plan.json'}: {why}" in flat(text)


def test_index_that_cannot_be_written_is_one_line(synth_build: SimpleNamespace, synth_build_copy: Path,
                                                  capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (synth_build_copy / "index.json").unlink()
    monkeypatch.setattr(index, "write_json_atomic", refusing(errno.ENOSPC, "No space left on device")(None))
    for args in (build_args(synth_build.corpus, synth_build_copy), ["index", synth_build_copy]):
        code, text = run_main(capsys, *args)
        assert code == 1 and "Traceback" not in text
        assert f"error: cannot write {synth_build_copy / 'index.json'}: no space left" in flat(text)


def test_a_finished_build_on_read_only_storage_writes_nothing(synth_build: SimpleNamespace, synth_build_copy: Path,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Rerunning a finished build (a recipe does) must not need to rewrite index.json."""
    before = snapshot(synth_build_copy)
    refuse = refusing(errno.EROFS, "Read-only file system")(None)
    for module, name in ((shard_job, "write_shard"), (shard_job, "write_json_atomic"),
                         (build_folder, "write_json_atomic"), (index, "write_json_atomic")):
        monkeypatch.setattr(module, name, refuse)
    code, text = run_main(capsys, *build_args(synth_build.corpus, synth_build_copy, workers=2))
    assert code == 0, text
    assert "0 written, 4 already complete, 4 in the plan" in flat(text)
    code, text = run_main(capsys, "index", synth_build_copy)
    assert code == 0, text
    assert snapshot(synth_build_copy) == before


def test_a_changed_index_is_still_rewritten(synth_build: SimpleNamespace, synth_build_copy: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    (synth_build_copy / "index.json").write_text("{}")
    code, text = run_main(capsys, "index", synth_build_copy)
    assert code == 0, text
    assert snapshot(synth_build_copy) == snapshot(synth_build.out)


def _killed_worker(items, features, vad):  # noqa: ANN001, ANN202
    """A build worker that dies as the OOM killer would kill it."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_is_one_line_and_a_rerun_resumes(synth_build: SimpleNamespace, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "shards"
    monkeypatch.setattr(build, "process_chunk", _killed_worker)
    code, text = run_main(capsys, *build_args(synth_build.corpus, out, workers=2))
    assert code == 1 and "Traceback" not in text
    line = flat(text)
    assert "error: a build worker died (killed, perhaps for lack of memory" in line
    assert "rerun the same command to resume (with fewer --workers if memory is short)" in line
    monkeypatch.undo()
    code, text = run_main(capsys, *build_args(synth_build.corpus, out, workers=2))
    assert code == 0, text
    assert snapshot(out) == snapshot(synth_build.out)


def test_symlinked_and_repeated_roots_build_each_file_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The issue's case through the command: 12 files, a link to `..` in a speaker folder, a link
    to the root in the root, and the root given twice, made 36 utterances; now 12."""
    from dvector.demo.synth import write_corpus

    root = tmp_path / "c1"
    write_corpus(root, 3, 4, seed=12, duration_s=(1.0, 1.5))
    os.symlink("..", root / "spk000" / "up")
    os.symlink(".", root / "self")
    out = tmp_path / "shards"
    code, text = run_main(capsys, "build-shards", "-o", out, "--min-shards", "2", "-j", "1", root, f"{root}/")
    assert code == 0, text
    data = load_index(out)
    assert data["totals"]["utterances"] == 12
    assert sorted((s["id"], s["utterances"]) for s in data["speakers"]) == [
        ("c1/spk000", 4), ("c1/spk001", 4), ("c1/spk002", 4)]
    line = flat(text)
    assert f"scan: {root}: the same folder as a root given before it ({root}): read once" in line
    assert f"scan: {root / 'spk000' / 'up'}: alias of" in line and f"scan: {root / 'self'}: alias of" in line


# ---- reliability item 26: the advice fits the cause ------------------------------------------------

@pytest.mark.parametrize("error, why, advice", [
    (errno.EROFS, "the storage is read-only", "choose a writable folder with --out"),
    (errno.EACCES, "permission denied", "choose a writable folder with --out"),
    (errno.ENOSPC, "no space left on the device", "make room (or choose another --out), then rerun"),
])
def test_the_advice_fits_why_a_write_failed(error: int, why: str, advice: str, synth_roots: Corpus, tmp_path: Path,
                                            capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "shards"
    monkeypatch.setattr(build_folder, "write_json_atomic", refusing(error, os.strerror(error))(None))
    code, text = run_main(capsys, *build_args(synth_roots, out))
    assert code == 1 and "Traceback" not in text
    line = flat(text)
    assert f"{why}" in line and advice in line, line
    assert ("make room" in line) == (error == errno.ENOSPC), line


@pytest.mark.parametrize("where", ["the output", "a parent of the output"])
def test_a_file_in_the_way_of_the_output_folder_says_so(where: str, synth_roots: Corpus, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """Real errors, not mocked (a file where a folder must be stops root too): EEXIST and ENOTDIR."""
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    out = blocker if where == "the output" else blocker / "shards"
    code, text = run_main(capsys, *build_args(synth_roots, out))
    assert code == 1 and "Traceback" not in text
    line = flat(text)
    assert f"error: cannot write {out}: {blocker} is a file where a folder must be; a file is in the way: " \
           "move it, or choose another --out" in line, line
    assert "make room" not in line and blocker.read_text() == "a file, not a folder"
