"""`dvector train` on the command line: the seed project's short flags, continuing, kill -9 and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dvector.training.checkpoint import load_checkpoint
from dvector.cli import app, main
from dvector.config import ModelConfig, TrainConfig
from dvector.training.loop import train
from train_helpers import assert_same_weights, ckpt_dir, numbered, session_shards

runner = CliRunner()
# -w 0 --threads 1: one process and one thread, so that runs are comparable and fast
SMALL = ["-n", "4", "-m", "4", "-l", "40", "--model", "tiny", "-w", "0", "--threads", "1"]


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return session_shards(tmp_path_factory)


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def invoke(*args: str):  # noqa: ANN201
    result = runner.invoke(app, ["train", *args], env={"COLUMNS": "200"})
    return result


def test_help_lists_the_seed_projects_flags() -> None:
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for flag in ("-i", "--steps", "-s", "--save-every", "-d", "--decay-every", "-n", "--n-speakers", "-m",
                 "--n-utterances", "-l", "--seg-len", "-c", "--continue", "--valid", "--model", "--threads"):
        assert flag in result.output, f"{flag} missing from train --help"


def test_train_with_short_flags_then_continue(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = invoke(str(shards), str(run), "-i", "10", "-s", "5", "-d", "4", *SMALL)
    assert result.exit_code == 0, result.output
    assert numbered(run) == [5, 10] and (ckpt_dir(run) / "best.pt").exists()
    state = load_checkpoint(run)
    assert state["step"] == 10 and state["model_config"]["name"] == "tiny"
    cfg = state["train_config"]
    assert (cfg["steps"], cfg["save_every"], cfg["decay_every"], cfg["n_speakers"], cfg["n_utterances"],
            list(cfg["seg_len"])) == (10, 5, 4, 4, 4, [40, 40])
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.5 ** 2)  # halved at 4 and 8
    assert state["rng"]["torch"].dtype == torch.uint8

    # -i is the total: continuing from step 10 with -i 14 takes 4 more steps
    result = invoke(str(shards), str(run), "-i", "14", "-s", "5", "-d", "4", "-c", str(ckpt_dir(run) / "latest.pt"), *SMALL)
    assert result.exit_code == 0, result.output
    assert "continuing from" in result.output and "4 this run, at step 14" in result.output
    assert load_checkpoint(run)["step"] == 14 and numbered(run) == [5, 10, 14]

    # continuing with -i 14 again does nothing, and says so
    result = invoke(str(shards), str(run), "-i", "14", "-c", str(run), *SMALL)
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output and "0 this run" in result.output
    assert numbered(run) == [5, 10, 14]


def test_existing_run_without_continue_is_an_error(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert invoke(str(shards), str(run), "-i", "2", "-s", "2", *SMALL).exit_code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(shards), str(run), "-i", "4", *SMALL])
    assert exit_info.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "already holds a run" in err and "-c" in err and "Traceback" not in err
    assert numbered(run) == [2]


@pytest.mark.slow
def test_kill_9_then_continue_matches_a_straight_run(shards: Path, tmp_path: Path) -> None:
    """`python -m dvector train` killed with SIGKILL after a checkpoint, continued with -c: the weights
    equal a straight run's to the same step, bit for bit."""
    run = tmp_path / "killed"
    flags = ["-s", "3", "-d", "7", *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "dvector", "train", str(shards), str(run), "-i", "100000", *flags],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(ckpt_dir(run).glob("step-*.pt")):
            assert proc.poll() is None, f"training exited early: {proc.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        time.sleep(0.15)  # land somewhere mid-run, maybe mid-save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(run)["step"]
    assert 3 <= saved < 100000 and saved % 3 == 0
    target = saved + 5

    result = invoke(str(shards), str(run), "-i", str(target), "-c", str(ckpt_dir(run) / "latest.pt"), *flags)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "continuing from" in said and f"at step {saved}" in said
    resumed = load_checkpoint(run)
    assert resumed["step"] == target

    # the same options as the command line gives them, straight to the target step
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=target, save_every=3, decay_every=7, n_speakers=4, n_utterances=4, seg_len=(40, 40),
                      workers=0)
    train(str(shards), tmp_path / "straight", cfg, ModelConfig.preset("tiny"), say=lambda message: None)
    straight = load_checkpoint(tmp_path / "straight")
    assert straight["step"] == target
    assert_same_weights(straight, resumed)


def test_max_minutes_stops_with_a_checkpoint(tmp_path: Path, shards: Path) -> None:
    """A time limit already spent stops at the first check (a log step) and saves there."""
    from typer.testing import CliRunner

    from dvector.cli import app

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(shards), str(run), "-i", "1000", "-n", "4", "-m", "4",
                                      "-l", "60", "--model", "tiny", "-w", "0", "--log-every", "3",
                                      "--max-minutes", "0.000001", "--valid-every", "1000"])
    assert result.exit_code == 0, result.output
    assert "--max-minutes" in " ".join(result.output.split())
    assert "segments used" in " ".join(result.output.split())  # the summary reports what sampling did
    import torch
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 3
