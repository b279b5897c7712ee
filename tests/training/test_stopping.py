"""Training that stops before its last step keeps its work: SIGTERM/SIGINT save the step reached as the
run's latest checkpoint (and `-c` continues exactly), --max-minutes is checked after every step, a dead
loader worker and a full disk at a save end in one line; one run folder has one writer; a continued run
keeps its loss.

Signals are sent from the run's own ``on_log`` hook at a step it reports (never after a sleep), so where
they land does not depend on the machine's speed.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest

from dvector.config import AugmentConfig, ModelConfig, TrainConfig
from dvector.errors import DvectorError, Stopped
from dvector.files import LOCK_NAME, one_writer
from dvector.training import checkpoint as checkpoint_module
from dvector.training.checkpoint import load_checkpoint
from dvector.training.loop import StepLog, train
from train_helpers import assert_same_weights, ckpt_dir, numbered

TINY = ModelConfig.preset("tiny")
CFG = TrainConfig(steps=12, save_every=100, decay_every=4, valid_every=100, log_every=1, n_speakers=4,
                  n_utterances=4, seg_len=(40, 40), workers=0, momentum=0.9, augment=AugmentConfig(kinds=()))

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # exact resume: the same thread count everywhere


def run(shards: Path, model_dir: Path, cfg: TrainConfig = CFG, on_log: Callable[[StepLog], None] | None = None,
        said: list[str] | None = None, **kw: Any) -> Any:
    return train(str(shards), model_dir, cfg, kw.pop("model_cfg", TINY), on_log=on_log,
                 say=(said if said is not None else []).append, **kw)


def signal_at(step: int, signum: int, also: Callable[[], None] = lambda: None) -> Callable[[StepLog], None]:
    """An ``on_log`` that sends ``signum`` to this process when the run logs ``step``."""
    def on_log(entry: StepLog) -> None:
        if entry.step == step:
            also()
            os.kill(os.getpid(), signum)
    return on_log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_the_step_reached_and_continue_matches_a_straight_run(
        shards: Path, tmp_path: Path, signum: int) -> None:
    said: list[str] = []
    with pytest.raises(Stopped) as stopped:
        run(shards, tmp_path / "stopped", on_log=signal_at(5, signum), said=said)
    state = load_checkpoint(tmp_path / "stopped")
    step = state["step"]
    assert 5 <= step < CFG.steps  # the signal came at step 5: the run stops at the end of a step after it
    assert stopped.value.exit_code == 128 + signum and stopped.value.signum == signum
    message = str(stopped.value)
    assert signal.Signals(signum).name in message and f"at step {step}" in message
    assert "latest" in message and f"-c {tmp_path / 'stopped'}" in message
    assert numbered(tmp_path / "stopped") == [step]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or signum != signal.SIGTERM  # handlers given back

    run(shards, tmp_path / "stopped", resume=tmp_path / "stopped")
    run(shards, tmp_path / "straight")
    assert_same_weights(load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "stopped"))


def test_a_second_signal_during_the_save_leaves_no_damaged_file(shards: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The first SIGTERM asks for the save; a second one arrives in the middle of writing it."""
    real_save = checkpoint_module.torch.save
    calls: list[int] = []

    def save_with_a_signal_inside(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        real_save(obj, f, *args, **kwargs)

    arm = lambda: monkeypatch.setattr(checkpoint_module.torch, "save", save_with_a_signal_inside)  # noqa: E731
    with pytest.raises(Stopped):
        run(shards, tmp_path / "run", on_log=signal_at(3, signal.SIGTERM, also=arm))
    assert calls, "the save ran"
    folder = ckpt_dir(tmp_path / "run")
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "a temporary file was left"
    state = load_checkpoint(folder / "latest.pt")
    assert state["step"] == numbered(tmp_path / "run")[-1] >= 3


def test_a_loader_worker_inherits_the_handlers_and_survives_the_signal(shards: Path, tmp_path: Path) -> None:
    """`timeout`, Slurm and Ctrl-C signal the whole process group: the loader's worker must not die of it."""
    def signal_everyone() -> None:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGTERM)

    with pytest.raises(Stopped):
        run(shards, tmp_path / "run", replace(CFG, workers=1), on_log=signal_at(4, signal.SIGTERM, signal_everyone))
    assert load_checkpoint(tmp_path / "run")["step"] >= 4


def test_a_killed_loader_worker_is_one_line_after_a_checkpoint(shards: Path, tmp_path: Path) -> None:
    def kill_the_worker(entry: StepLog) -> None:
        if entry.step == 3:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)

    with pytest.raises(DvectorError) as error:
        run(shards, tmp_path / "run", replace(CFG, workers=1, steps=100_000), on_log=kill_the_worker)
    message = str(error.value)
    assert "\n" not in message and "DataLoader worker" in message, message
    assert "killed by signal" in message or "exited unexpectedly" in message, message
    step = load_checkpoint(tmp_path / "run")["step"]
    assert step >= 3 and f"saved {ckpt_dir(tmp_path / 'run') / f'step-{step:09d}.pt'}" in message
    assert "-c " in message


def test_a_full_disk_at_a_save_is_one_line_and_keeps_the_earlier_checkpoints(
        shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes fail with ENOSPC from step 4's save on (the earlier ones at steps 2 were written)."""
    real_open = open

    def open_on_a_full_disk(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode and ".step-000000004.pt.tmp-" in str(file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_on_a_full_disk)
    with pytest.raises(DvectorError) as error:
        run(shards, tmp_path / "run", replace(CFG, save_every=2))
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message and "step-000000004.pt" in message
    assert load_checkpoint(tmp_path / "run")["step"] == 2
    assert not [p for p in ckpt_dir(tmp_path / "run").iterdir() if p.name.startswith(".")]


def test_max_minutes_is_checked_after_every_step(shards: Path, tmp_path: Path) -> None:
    """Not only at log steps: a limit already spent stops after the first step, whatever --log-every says."""
    said: list[str] = []
    result = run(shards, tmp_path / "run", replace(CFG, log_every=50, max_minutes=1e-9), said=said)
    assert result.final_step == 1 and load_checkpoint(tmp_path / "run")["step"] == 1
    assert any("--max-minutes" in line for line in said)


# ---- one writer per run folder -------------------------------------------------------------------

def test_a_second_training_into_a_busy_run_folder_is_refused_before_reading_data(
        shards: Path, tmp_path: Path) -> None:
    """The second start (another seed) is refused at once, naming the running one; the first run
    finishes unharmed. Started from the first run's log hook, so it surely overlaps."""
    outcome: dict[str, Any] = {}

    def start_another(entry: StepLog) -> None:
        if entry.step == 2 and "error" not in outcome:
            try:
                run(Path("/nonexistent/shards/never/read"), tmp_path / "run", replace(CFG, seed=1))
            except DvectorError as exc:
                outcome["error"] = str(exc)

    run(shards, tmp_path / "run", on_log=start_another)
    message = outcome["error"]
    assert "in use by another training run" in message and f"pid {os.getpid()}" in message and "host " in message
    assert "/nonexistent" not in message  # refused before the shards were looked at
    assert load_checkpoint(tmp_path / "run")["step"] == CFG.steps
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # removed when the run ended


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(shards: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("host elsewhere, pid 999999, since 2026-01-01 00:00:00: dvector train\n")
    said: list[str] = []
    run(shards, folder, replace(CFG, steps=2), said=said)
    notes = [line for line in said if "taking over" in line]
    assert len(notes) == 1 and "pid 999999" in notes[0] and "no longer runs" in notes[0]
    assert load_checkpoint(folder)["step"] == 2


def test_one_writer_refuses_a_second_holder_and_frees_the_folder(tmp_path: Path) -> None:
    with one_writer(tmp_path / "out", "shard build") as lock:
        assert f"pid {os.getpid()}" in lock.read_text()
        with pytest.raises(DvectorError, match="in use by another shard build"):
            with one_writer(tmp_path / "out", "shard build"):
                pass
    with one_writer(tmp_path / "out", "shard build"):  # free again
        pass


def test_a_run_folder_under_a_file_is_one_line(shards: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DvectorError, match="cannot write into the run folder .*a-file/run: Not a directory"):
        run(shards, tmp_path / "a-file" / "run")


# ---- a continued run keeps its loss --------------------------------------------------------------

def test_continuing_with_another_loss_is_refused_in_one_line(shards: Path, tmp_path: Path) -> None:
    run(shards, tmp_path / "run", replace(CFG, steps=2))
    with pytest.raises(DvectorError) as error:
        run(shards, tmp_path / "run", replace(CFG, steps=4, loss="aamsoftmax"), resume=tmp_path / "run")
    message = str(error.value)
    assert "--loss ge2e" in message and f"--init {tmp_path / 'run'} --loss aamsoftmax" in message
    assert load_checkpoint(tmp_path / "run")["step"] == 2


def test_loss_settings_left_out_are_the_runs_own(shards: Path, tmp_path: Path) -> None:
    """An aamsoftmax run continued with none of its loss options (the CLI's defaults would say ge2e)."""
    aam = replace(CFG, steps=2, loss="aamsoftmax", margin=0.1, scale=20.0)
    run(shards, tmp_path / "run", aam)
    said: list[str] = []
    run(shards, tmp_path / "run", replace(CFG, steps=4), resume=tmp_path / "run", given={"steps"}, said=said)
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 4 and state["train_config"]["loss"] == "aamsoftmax"
    assert (state["train_config"]["margin"], state["train_config"]["scale"]) == (0.1, 20.0)
    assert not [line for line in said if line.startswith("note: --")]


def test_another_optimizer_on_a_continued_run_is_said(shards: Path, tmp_path: Path) -> None:
    run(shards, tmp_path / "run", replace(CFG, steps=2))
    said: list[str] = []
    run(shards, tmp_path / "run", replace(CFG, steps=4, optimizer="adam"), resume=tmp_path / "run",
        given={"steps", "optimizer"}, said=said)
    assert any("--optimizer adam now" in line and "sgd" in line for line in said)
    assert load_checkpoint(tmp_path / "run")["train_config"]["optimizer"] == "adam"
