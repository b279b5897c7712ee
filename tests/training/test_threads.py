"""CPU threads: torch gets every core of the process (shared by torchrun's processes on the machine),
whatever the loader's workers, unless --threads says otherwise; benchmarks/bench_train.py --threads
takes effect."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dvector.config import ModelConfig, TrainConfig
from dvector.training.distributed import Distributed, cpu_threads
from dvector.training.loop import train
from train_helpers import session_shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("workers", [0, 2, 8])
def test_torch_gets_every_core_whatever_the_workers(monkeypatch, workers: int) -> None:
    """The loader's workers mostly wait on a full queue: they take no cores from the step's math."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads(TrainConfig(workers=workers), Distributed()) == 6


def test_torchrun_processes_share_the_cores(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cpu_threads(TrainConfig(workers=2), Distributed(rank=1, world=8, local_rank=1)) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads(TrainConfig(workers=2), Distributed(rank=1, world=2, local_rank=1)) == 3


def test_threads_given_are_used(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert cpu_threads(TrainConfig(workers=2, threads=3), Distributed()) == 3


def test_training_on_cpu_sets_the_threads(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    shards = session_shards(tmp_path_factory)
    cfg = TrainConfig(steps=1, save_every=1, valid_every=1000, n_speakers=4, n_utterances=4, seg_len=(40, 40),
                      workers=1)
    torch.set_num_threads(1)
    train(str(shards), tmp_path / "a", cfg, ModelConfig.preset("tiny"), device="cpu", say=lambda m: None)
    assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    train(str(shards), tmp_path / "b", replace(cfg, threads=1), ModelConfig.preset("tiny"), device="cpu",
          say=lambda m: None)
    assert torch.get_num_threads() == 1


@pytest.mark.slow
def test_bench_train_threads_take_effect(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--model", "tiny", "-n", "4", "-m", "4",
               "-l", "40", "--steps", "2", "--warmup", "1", "--workers", "0", "--device", "cpu", "--skip-loss",
               "--speakers", "8", "--utterances", "8", "--shards", "2", "--data-dir", str(tmp_path / "data"),
               "--threads", "1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "device: cpu (" in done.stdout and "cores, 1 torch threads)" in done.stdout
    assert "torch threads while training: 1" in done.stdout
    name, _, value = lines[-1].partition("=")
    assert name == "train_steps_per_s" and float(value) > 0
