"""The build-shards, index and check commands through Typer's runner, and `python -m dvector` in
subprocesses for what needs a real process: exit codes and messages, and resuming after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from build_helpers import SMALL_ARGS, Corpus, display, load_index, read_back, snapshot, squash
from dvector.shards.build import build_shards
from dvector.cli import app, main
from dvector.config import BuildConfig
from dvector.demo.synth import write_corpus

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def run_main(capsys: pytest.CaptureFixture, *args) -> tuple[int, str]:
    """The console entry point as a user runs it: exit status and everything printed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out + captured.err


# ---- help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command,expected", [
    ([], ["build-shards", "index", "check"]),
    (["build-shards"], ["--out", "--save_dir", "-s", "--extensions", "--workers", "--part", "--strict", "--fail-fast",
                        "--overwrite", "--block-size", "--shard-size", "--min-shards", "--merge-speakers"]),
    (["index"], ["FOLDER"]),
    (["check"], ["FOLDER", "--workers"]),
])
def test_help(command: list[str], expected: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    for word in expected:
        assert word.lower() in result.output.lower(), f"{word} missing from `dvector {' '.join(command)} --help`"


def test_help_of_every_command() -> None:
    import typer.main

    commands = typer.main.get_command(app).commands
    assert {"build-shards", "index", "check"} <= set(commands)
    for name in commands:
        result = invoke(name, "--help")
        assert result.exit_code == 0 and "Usage" in result.output, f"`dvector {name} --help` failed"


# ---- building --------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_flag", ["-s", "--save_dir", "-o"])
def test_cli_build_equals_the_library_build(out_flag: str, synth_build: SimpleNamespace, tmp_path: Path) -> None:
    """-s/--save_dir name the output folder; upper-case -e lists work; the result is the library's build."""
    out = tmp_path / "cli"
    result = invoke("build-shards", out_flag, out, "-e", "WAV,Flac,OGG,mp3", *SMALL_ARGS, "-j", "2",
                    *synth_build.corpus.roots)
    assert result.exit_code == 0, result.output
    assert snapshot(out) == snapshot(synth_build.out)
    text = squash(result.output)
    assert squash("4 written, 0 already complete, 4 in the plan") in text
    assert squash("index written") in text and "speakers6" in text
    assert squash("note: 6 speaker(s) have fewer than 10 utterances") in text


def test_cli_progress_bar(synth_build: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVECTOR_PROGRESS", "1")
    result = invoke("build-shards", "-o", tmp_path / "out", *SMALL_ARGS, *synth_build.corpus.roots)
    assert result.exit_code == 0, result.output
    assert "realtime" in result.output and f"{len(synth_build.corpus.sources)}/{len(synth_build.corpus.sources)}" in result.output
    assert snapshot(tmp_path / "out") == snapshot(synth_build.out)


def test_cli_extension_filter_and_empty_root(synth_roots: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "wav_only"
    result = invoke("build-shards", "-o", out, "-e", "WAV", *SMALL_ARGS, *synth_roots.roots)
    assert result.exit_code == 0, result.output
    index = load_index(out)
    assert index["config"]["extensions"] == ["wav"]
    assert {s["id"] for s in index["speakers"]} == {"libri/spk000", "libri/spk001"}
    assert {s["source"] for s in read_back(out)} == {src for root, src in synth_roots.sources if src.lower().endswith(".wav")}
    assert squash(f"root {synth_roots.roots[0]} holds no audio") in squash(result.output)


def test_cli_rerun_skips_complete_shards(synth_build: SimpleNamespace, synth_build_copy: Path) -> None:
    before = snapshot(synth_build_copy)
    result = invoke("build-shards", "-o", synth_build_copy, *SMALL_ARGS, *synth_build.corpus.roots)
    assert result.exit_code == 0, result.output
    assert squash("0 written, 4 already complete") in squash(result.output)
    assert snapshot(synth_build_copy) == before


def test_cli_refuses_another_configuration(synth_build: SimpleNamespace, synth_build_copy: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    before = snapshot(synth_build_copy)
    code, text = run_main(capsys, "build-shards", "-o", synth_build_copy, *SMALL_ARGS, "--n-mels", "20",
                          *synth_build.corpus.roots)
    assert code == 1
    assert "different configuration" in text and "--overwrite" in text and "Traceback" not in text
    assert snapshot(synth_build_copy) == before
    result = invoke("build-shards", "-o", synth_build_copy, *SMALL_ARGS, "--n-mels", "20", "--overwrite",
                    *synth_build.corpus.roots)
    assert result.exit_code == 0, result.output
    assert load_index(synth_build_copy)["config"]["features"]["n_mels"] == 20
    assert {s["mel"].shape[1] for s in read_back(synth_build_copy)} == {20}


def test_cli_parts_then_index(synth_build: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "parts"
    first = invoke("build-shards", "-o", out, *SMALL_ARGS, "--part", "1/2", *synth_build.corpus.roots)
    assert first.exit_code == 0, first.output
    assert squash("index not yet: other parts are still missing") in squash(first.output)
    assert not (out / "index.json").exists()
    code, text = run_main(capsys, "index", out)
    assert code == 1 and "not built yet" in text and "Traceback" not in text
    second = invoke("build-shards", "-o", out, *SMALL_ARGS, "--part", "2/2", *synth_build.corpus.roots)
    assert second.exit_code == 0, second.output
    (out / "index.json").unlink()
    merged = invoke("index", out)
    assert merged.exit_code == 0, merged.output
    assert "4 shards" in merged.output
    assert (out / "index.json").read_bytes() == (synth_build.out / "index.json").read_bytes()
    assert snapshot(out) == snapshot(synth_build.out)


@pytest.mark.parametrize("part,message", [("0/2", "1 <= i <= n"), ("3/2", "1 <= i <= n"), ("two", "i/n")])
def test_cli_bad_part(part: str, message: str, synth_roots: Corpus, tmp_path: Path,
                      capsys: pytest.CaptureFixture) -> None:
    code, text = run_main(capsys, "build-shards", "-o", tmp_path / "x", "--part", part, *synth_roots.roots)
    assert code == 1 and "--part" in text and message in text and "Traceback" not in text
    assert not (tmp_path / "x").exists()


def test_cli_missing_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, text = run_main(capsys, "build-shards", "-o", tmp_path / "x", tmp_path / "nowhere")
    assert code == 1 and "does not exist" in text


# ---- check ---------------------------------------------------------------------------------------

def test_cli_check_good(synth_build: SimpleNamespace) -> None:
    for workers in ("1", "2"):
        result = invoke("check", "-j", workers, synth_build.out)
        assert result.exit_code == 0, result.output
        assert squash("ok: 4 shards match the index") in squash(result.output)


def test_cli_check_flipped_bytes(synth_build_copy: Path) -> None:
    target = synth_build_copy / "shard-000003.tar"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    result = invoke("check", synth_build_copy)
    assert result.exit_code == 1
    assert "shard-000003.tar" in result.output and "sha256" in result.output
    for other in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert other not in result.output
    assert squash("1 of 4 shards are damaged") in squash(result.output)


def test_cli_check_truncated(synth_build_copy: Path) -> None:
    target = synth_build_copy / "shard-000001.tar"
    target.write_bytes(target.read_bytes()[:1000])
    result = invoke("check", "-j", "1", synth_build_copy)
    assert result.exit_code == 1 and "shard-000001.tar" in result.output
    assert "shard-000000.tar" not in result.output


def test_cli_check_names_a_shard_file_the_index_does_not_list(synth_build_copy: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """Reliability item 25: a warning line naming it; the exit status stays 0, since every shard the index
    lists (all that readers of the folder read) is intact."""
    stray = synth_build_copy / "shard-000004.tar"
    stray.write_bytes((synth_build_copy / "shard-000000.tar").read_bytes())
    (synth_build_copy / ".shard-000005.tar.tmp").write_bytes(b"a temporary: not reported")
    code, text = run_main(capsys, "check", "-j", "1", synth_build_copy)
    assert code == 0, text
    line = " ".join(text.split())
    assert f"warning: {stray}: a shard file that index.json does not list" in line, line
    assert "ok: 4 shards match the index; 1 file(s) not in the index (see the warnings)" in line
    assert ".shard-000005" not in line and line.count("warning:") == 1
    # damage and a stray file: both reported, damage decides the status
    (synth_build_copy / "shard-000001.tar").write_bytes(b"")
    code, text = run_main(capsys, "check", synth_build_copy)
    assert code == 1 and "shard-000004.tar" in text and "1 of 4 shards are damaged" in " ".join(text.split())


def test_cli_check_without_index(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, text = run_main(capsys, "check", tmp_path)
    assert code == 1 and "index.json" in text and "Traceback" not in text


# ---- bad input -----------------------------------------------------------------------------------

MESSY_ARGS = ["--min-shards", "3", "--block-size", "2"]


def test_cli_bad_inputs_are_listed(messy_root: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("build-shards", "-o", out, *MESSY_ARGS, *messy_root.roots)
    assert result.exit_code == 0, result.output
    text = squash(result.output)
    assert squash(f"skipped {len(messy_root.bad)} file(s)") in text
    assert squash("1 audio file(s) directly in the root are not in a speaker directory") in text
    for (root, source), reason in messy_root.bad.items():
        assert squash(f"{root}/{display(source)}: {reason}") in text, f"{source} is not in the summary"
    assert {(s["root"], s["source"]) for s in read_back(out)} == messy_root.sources
    assert {(f["root"], f["source"]) for f in load_index(out)["failures"]} == set(messy_root.bad)


def test_cli_strict(messy_root: Corpus, tmp_path: Path) -> None:
    result = invoke("build-shards", "-o", tmp_path / "out", *MESSY_ARGS, "--strict", *messy_root.roots)
    assert result.exit_code == 2
    assert squash(f"--strict: {len(messy_root.bad)} file(s) were skipped") in squash(result.output)
    assert (tmp_path / "out" / "index.json").exists()  # the build itself is complete


def test_cli_strict_passes_on_a_clean_corpus(synth_build: SimpleNamespace, synth_build_copy: Path) -> None:
    result = invoke("build-shards", "-o", synth_build_copy, *SMALL_ARGS, "--strict", *synth_build.corpus.roots)
    assert result.exit_code == 0, result.output


def test_cli_fail_fast(messy_root: Corpus, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, text = run_main(capsys, "build-shards", "-o", tmp_path / "out", *MESSY_ARGS, "-j", "1", "--fail-fast",
                          *messy_root.roots)
    assert code == 1 and "--fail-fast" in text and "Traceback" not in text
    named = [src for _, src in messy_root.bad if squash(display(src)) in squash(text)]
    assert len(named) == 1, text
    assert not (tmp_path / "out" / "index.json").exists()


# ---- real processes ------------------------------------------------------------------------------

def dvector_process(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "dvector", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900, **kwargs)  # a hang guard only


def test_python_m_dvector_errors_without_traceback(tmp_path: Path, synth_roots: Corpus) -> None:
    done = dvector_process("build-shards", "-o", tmp_path / "x", "--part", "3/2", *synth_roots.roots)
    assert done.returncode == 1
    assert "error:" in done.stderr and "--part 3/2" in done.stderr and "Traceback" not in done.stderr


# A -j 1 build that takes its time on each file, so that kill -9 lands mid-build. The build itself
# is the real one: `main` is what `python -m dvector` runs.
SLOW_BUILD = """
import sys, time
import dvector.shards.shard_job as shard_job
real = shard_job.process_file
def slow(*args, **kwargs):
    time.sleep(0.03)
    return real(*args, **kwargs)
shard_job.process_file = slow
from dvector.cli import main
main(sys.argv[1:])
"""

KILL_ARGS = ["--min-shards", "12", "--block-size", "2"]


@pytest.fixture(scope="module")
def kill_corpus(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("kill")
    write_corpus(base / "big", 6, 8, seed=21, duration_s=(1.0, 2.0))
    ref = base / "reference"
    build_shards([str(base / "big")], ref, BuildConfig(min_shards=12, block_size=2), workers=2)
    return SimpleNamespace(roots=[str(base / "big")], reference=snapshot(ref))


def run_and_kill(command: list[str], out: Path, reference: dict[str, bytes], stop) -> int:
    """Run ``command``; kill -9 it when ``stop(names in out)`` holds; check every shard as it appears."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checked: set[str] = set()
    deadline = time.monotonic() + 900  # a hang guard only
    try:
        while proc.poll() is None:
            names = os.listdir(out) if out.exists() else []
            for name in names:
                if name.startswith("shard-") and name not in checked:
                    # a file under a final shard name is always complete: the reference shard, byte for byte
                    assert (out / name).read_bytes() == reference[name], f"{name} is incomplete or differs"
                    checked.add(name)
            if stop(names, checked):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "the build did not reach the kill point"
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for name in os.listdir(out):
        if name.startswith("shard-"):
            assert (out / name).read_bytes() == reference[name]
    return proc.returncode


@pytest.mark.slow
def test_resume_after_kill_is_byte_identical(kill_corpus: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    slow = [sys.executable, "-c", SLOW_BUILD, "build-shards", "-o", str(out), "-j", "1", *KILL_ARGS, *kill_corpus.roots]
    # 1: killed once the first shard is complete
    code = run_and_kill(slow, out, kill_corpus.reference, lambda names, done: len(done) >= 1)
    assert code == -signal.SIGKILL, "the build ended before it could be killed"
    assert not (out / "index.json").exists()
    done_first = {n for n in os.listdir(out) if n.startswith("shard-")}
    assert 1 <= len(done_first) < 12
    # 2: rerun, killed again while it writes a shard (or right after one more is complete)
    code = run_and_kill(slow, out, kill_corpus.reference,
                        lambda names, done: any(".tmp-" in n for n in names) or len(done) > len(done_first))
    assert code == -signal.SIGKILL
    assert not (out / "index.json").exists()
    # 3: a plain rerun with another worker count finishes the job
    done = dvector_process("build-shards", "-o", out, "-j", "2", *KILL_ARGS, *kill_corpus.roots)
    assert done.returncode == 0, done.stderr
    assert "already complete" in done.stderr
    assert snapshot(out) == kill_corpus.reference
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temporary files were left behind"
