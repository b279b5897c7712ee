"""`dvector train` on the command line: the seed project's short flags, continuing, kill -9 and resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dvector.errors import DvectorError
from dvector.training.checkpoint import load_checkpoint
from dvector.cli import app, main
from train_helpers import assert_same_weights, ckpt_dir, narrow_shards, numbered

runner = CliRunner()
# -w 0 --threads 1: one process and one thread, so that runs are comparable and fast
SMALL = ["-n", "4", "-m", "4", "-l", "40", "--model", "tiny", "-w", "0", "--threads", "1"]



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


def continue_to(shards: Path, checkpoint: Path, run: Path, target: int, flags: list[str]) -> dict:
    """Copy ``checkpoint`` into a fresh run folder ``run``, continue it with -c to ``target`` through the
    command line, and return the checkpoint it ends with."""
    ckpt_dir(run).mkdir(parents=True)
    shutil.copyfile(checkpoint, ckpt_dir(run) / checkpoint.name)
    result = invoke(str(shards), str(run), "-i", str(target), "-c", str(run), *flags)
    assert result.exit_code == 0, result.output
    assert f"at step {load_checkpoint(checkpoint)['step']}" in " ".join(result.output.split())
    state = load_checkpoint(run)
    assert state["step"] == target
    return state


def assert_same_run_state(a: dict, b: dict) -> None:
    """Same weights, optimizer, scheduler and data-stream position, bit for bit."""
    assert_same_weights(a, b)
    assert a["scheduler"] == b["scheduler"] and a["loader"] == b["loader"]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


# (workers, target, save_every): each worker's first sampling round ends at its 15th batch, so every
# target lies past a round's end (a pool read anew), and -d 5 halves the rate several times on the way
@pytest.mark.parametrize("workers, target, every", [(0, 18, 1), (1, 18, 1), pytest.param(2, 33, 1, marks=pytest.mark.slow)])
def test_continuing_from_every_checkpoint_matches_a_straight_run(shards: Path, tmp_path: Path, workers: int,
                                                                 target: int, every: int) -> None:
    """A straight run through the command line, then a run continued from each of its checkpoints
    (copied alone into a fresh folder) to the same step: every one ends with the same weights,
    optimizer, scheduler and data position, bit for bit. Same flags (and so threads) everywhere."""
    flags = ["-s", str(every), "-d", "5", "--keep", "100", *SMALL[:-4], "-w", str(workers), "--threads", "1"]
    straight_dir = tmp_path / "straight"
    result = invoke(str(shards), str(straight_dir), "-i", str(target), *flags)
    assert result.exit_code == 0, result.output
    saved = numbered(straight_dir)
    assert saved == list(range(every, target + 1, every))
    straight = load_checkpoint(straight_dir)
    for step in saved[:-1]:
        resumed = continue_to(shards, ckpt_dir(straight_dir) / f"step-{step:09d}.pt", tmp_path / f"from-{step}",
                              target, flags)
        assert_same_run_state(straight, resumed)


@pytest.mark.slow
def test_kill_9_then_continue_matches_a_straight_run(shards: Path, tmp_path: Path) -> None:
    """`python -m dvector train` killed with SIGKILL once it has saved a checkpoint, continued with -c
    from whatever latest.pt then holds: the weights equal a straight run's to the same step, bit
    for bit. Where the kill lands (mid-step, mid-save) decides only which step is continued from."""
    run = tmp_path / "killed"
    flags = ["-s", "2", "-d", "5", *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "dvector", "train", str(shards), str(run), "-i", "100000", *flags],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600  # a guard against a hang only: the first checkpoint comes within seconds
        while not (ckpt_dir(run) / "latest.pt").exists():
            assert proc.poll() is None, f"training exited early: {proc.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(run)["step"]
    assert saved >= 2 and saved % 2 == 0
    target = saved + 5

    result = invoke(str(shards), str(run), "-i", str(target), "-c", str(ckpt_dir(run) / "latest.pt"), *flags)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "continuing from" in said and f"at step {saved}" in said
    resumed = load_checkpoint(run)
    assert resumed["step"] == target

    # the same command line, straight to the target step
    result = invoke(str(shards), str(tmp_path / "straight"), "-i", str(target), *flags)
    assert result.exit_code == 0, result.output
    assert_same_run_state(load_checkpoint(tmp_path / "straight"), resumed)


def test_sigterm_saves_says_where_in_one_line_and_exits_143(shards: Path, tmp_path: Path) -> None:
    """What Slurm preemption, Kubernetes and `timeout` send: sent once the run reports step 3 (its plain
    progress lines, one per --log-every step), the run saves the step it reached as its latest checkpoint."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "dvector", "train", str(shards), str(run), "-i", "100000",
                             "--log-every", "1", *SMALL], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("train: 3/"):
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stderr.read()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
    assert "Traceback" not in rest
    stopped = [line for line in rest.splitlines() if line.startswith("stopped:")]
    step = load_checkpoint(run)["step"]
    assert len(stopped) == 1 and f"SIGTERM at step {step}: saved" in stopped[0] and step >= 3
    assert f"-c {run}" in stopped[0]
    result = invoke(str(shards), str(run), "-i", str(step + 2), "-c", str(run), *SMALL)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run)["step"] == step + 2


def test_continuing_with_another_loss_on_the_command_line_is_one_line(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert invoke(str(shards), str(run), "-i", "2", *SMALL).exit_code == 0
    for extra in (["--loss", "aamsoftmax"], ["--loss", "angleproto", "--optimizer", "adam"]):
        result = invoke(str(shards), str(run), "-i", "4", "-c", str(run), *extra, *SMALL)
        assert isinstance(result.exception, DvectorError), result.output  # main() prints it as one line
        assert "--loss ge2e" in str(result.exception) and "\n" not in str(result.exception)
    assert load_checkpoint(run)["step"] == 2


def test_max_minutes_stops_with_a_checkpoint(tmp_path: Path, shards: Path) -> None:
    """A time limit already spent stops at the first check (after every step) and saves there."""
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
    assert state["step"] == 1


def test_a_truncated_latest_pt_is_noted_and_the_run_goes_on(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert invoke(str(shards), str(run), "-i", "4", "-s", "2", *SMALL).exit_code == 0
    latest = ckpt_dir(run) / "latest.pt"
    half = latest.read_bytes()[: latest.stat().st_size // 2]
    latest.unlink()  # a new file: the step file it was linked to stays whole
    latest.write_bytes(half)
    result = invoke(str(shards), str(run), "-i", "6", "-s", "2", "-c", str(run), *SMALL)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "note:" in said and "cannot load checkpoint" in said and "step-000000004.pt" in said
    assert "2 this run, at step 6" in said
    assert load_checkpoint(run)["step"] == 6


def test_shards_of_another_feature_size_are_one_error_line(shards: Path, tmp_path: Path,
                                                           tmp_path_factory: pytest.TempPathFactory,
                                                           capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert invoke(str(shards), str(run), "-i", "2", "-s", "2", *SMALL).exit_code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(narrow_shards(tmp_path_factory)), str(run), "-i", "4", "-c", str(run), *SMALL])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert "24 mel bands" in " ".join(err.split()) and "--n-mels 40" in " ".join(err.split())


def test_summary_counts_what_was_skipped(tmp_path: Path) -> None:
    """Skipped steps and the loader's counters of damage (whatever their names) show in the summary."""
    from rich.console import Console

    from dvector.cli.summary import print_train_summary
    from dvector.training.loop import TrainResult

    sampling = {"utterances": 40, "uses": 64, "batches": 4, "rounds": 0, "dropped_short": 1, "repeated_short": 2,
                "unused": 0, "leftover_uses": 0, "bad_samples": 3, "bad_shards": 1, "stalled_reads": 0}
    result = TrainResult(tmp_path, 4, 4, 1.5, None, 2.0, 0.1, sampling=sampling, skipped_steps=2)
    console = Console(record=True, width=200)
    print_train_summary(result, console)
    text = " ".join(console.export_text().split())
    assert "40 utterances read" in text and "3 bad samples, 1 bad shards" in text
    assert "stalled reads" not in text  # zero: not worth a word
    assert "skipped steps 2 with NaN or Inf" in text

    clean = TrainResult(tmp_path, 4, 4, 1.5, None, 2.0, 0.1, sampling={k: 0 for k in sampling})
    console = Console(record=True, width=200)
    print_train_summary(clean, console)
    assert "skipped" not in console.export_text()


@pytest.mark.parametrize("model, loss", [("ecapa-small", "aamsoftmax"), ("resnet34-quarter", "angleproto")])
def test_an_encoder_and_a_loss_by_name_train_then_embed(shards: Path, tmp_path: Path, model: str, loss: str) -> None:
    """`--model` and `--loss` by name, as a user types them; the run then embeds with `dvector embed`."""
    run = tmp_path / "run"
    small = [a for a in SMALL if a != "tiny"]
    small[small.index("--model") + 1:small.index("--model") + 1] = [model]
    result = invoke(str(shards), str(run), "-i", "2", "-s", "2", "--loss", loss, "--margin-warmup", "10",
                    "--subcentres", "2", "--weight-decay", "1e-4", *small)
    assert result.exit_code == 0, result.output
    assert f"model {model}: " in result.output and f"loss {loss}" in result.output
    state = load_checkpoint(run)
    assert state["model_config"]["name"] == model and state["train_config"]["loss"] == loss
    assert state["train_config"]["subcentres"] == 2 and state["train_config"]["weight_decay"] == 1e-4
    wav = next(p for p in sorted(shards.parent.rglob("*.wav")) + sorted(shards.parent.rglob("*.flac")))
    out = tmp_path / "emb.npz"
    embedded = runner.invoke(app, ["embed", str(run), str(wav), "-o", str(out)], env={"COLUMNS": "200"})
    assert embedded.exit_code == 0, embedded.output
    import numpy as np
    with np.load(out) as data:
        vectors = np.stack([data[k] for k in data.files if k != "__model__"])
    assert vectors.shape[0] == 1 and vectors.shape[1] == (192 if model.startswith("ecapa") else 256)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_help_names_every_encoder_and_loss() -> None:
    from dvector.config import LOSSES, MODEL_PRESETS

    text = " ".join(invoke("--help").output.split())
    for name in (*MODEL_PRESETS, *LOSSES):
        assert name in text, f"{name} missing from train --help"
