"""Training: the loss goes down, w stays positive, checkpoints round-trip and resume exactly, DDP with gloo.

Every run uses the tiny model on tiny synthetic shards (16 speakers x 10 utterances), one torch
thread (exact resume needs the same thread count) and small batches (N=4, M=4, L=40).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dvector.training.checkpoint import load_checkpoint
from dvector.config import AUGMENT_KINDS, AugmentConfig, ModelConfig, TrainConfig
from dvector.stream.batches import BatchSettings
from dvector.stream.loader import GE2ELoader
from dvector.shards.locate import resolve_shards
from dvector.errors import DvectorError
from dvector.nn.loss import W_MIN
from dvector.training.loop import StepLog, TrainResult, train
from dvector.training.validation import MAX_VALID_SPEAKERS, collect_validation, heldout_speakers
from train_helpers import N_SPEAKERS, assert_same_weights, ckpt_dir, numbered

TINY = ModelConfig.preset("tiny")
# small batches; lr decays inside the runs and SGD has momentum, so optimizer and scheduler state matter on resume;
# every augmentation kind on, so that exact resume covers the augmented stream too
BASE = TrainConfig(steps=20, save_every=10, decay_every=7, valid_every=10, log_every=1, n_speakers=4,
                   n_utterances=4, seg_len=(40, 40), workers=0, momentum=0.9, keep_checkpoints=5,
                   augment=AugmentConfig(kinds=AUGMENT_KINDS))

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # exact resume: runs with the same thread count


class Run:
    """One call of train(), with what it logged and said."""

    def __init__(self, shards: Path, model_dir: Path, cfg: TrainConfig = BASE, resume: Any = None, **kw: Any):
        self.logs: list[StepLog] = []
        self.messages: list[str] = []
        self.result: TrainResult = train(str(shards), model_dir, cfg, TINY, resume=resume, on_log=self.logs.append,
                                         say=self.messages.append, **kw)

    @property
    def text(self) -> str:
        return "\n".join(self.messages)


# ---- learning ------------------------------------------------------------------------------------

def test_loss_goes_down_and_w_stays_positive(shards: Path, tmp_path: Path) -> None:
    # lr 0.05: with the recording level normalised away (input_norm "mean"), the synthetic speakers are no
    # longer told apart by loudness, and 60 steps at the paper's 0.01 move the loss by only ~6%
    cfg = replace(BASE, steps=60, save_every=60, decay_every=1000, valid_every=30, momentum=0.0, lr=0.05)
    run = Run(shards, tmp_path / "run", cfg)
    losses = np.array([entry.loss for entry in run.logs])
    assert len(losses) == 60 and np.isfinite(losses).all()
    first, last = losses[:15].mean(), losses[-15:].mean()
    assert last < 0.9 * first, f"mean loss of the first 15 steps {first:.2f}, of the last 15 {last:.2f}"
    assert all(entry.w > 0 for entry in run.logs)
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 60 and float(state["criterion"]["w"]) > 0
    eers = [entry.valid_eer for entry in run.logs if entry.valid_eer is not None]
    assert len(eers) == 2 and all(0 <= e <= 1 for e in eers)
    assert run.result.steps_done == 60 and run.result.final_step == 60 and run.result.is_main
    assert "validating on 2 held-out speakers" in run.text  # a 16-speaker corpus still trains
    assert list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))  # TensorBoard


def test_w_is_projected_back_positive(shards: Path, tmp_path: Path) -> None:
    """A checkpoint holding w <= 0 (edited by hand) trains on with w >= W_MIN > 0."""
    Run(shards, tmp_path / "a", replace(BASE, steps=5, save_every=5))
    state = load_checkpoint(tmp_path / "a")
    state["criterion"]["w"] = torch.tensor(-3.0)
    torch.save(state, tmp_path / "negative.pt")
    run = Run(shards, tmp_path / "b", replace(BASE, steps=10, lr=1.0), resume=tmp_path / "negative.pt")
    w_min = float(np.float32(W_MIN))  # w is a float32 parameter: the clamp stores W_MIN rounded to float32
    assert run.logs and all(entry.w >= w_min > 0 for entry in run.logs)
    assert float(load_checkpoint(tmp_path / "b")["criterion"]["w"]) >= w_min


# ---- checkpoints ---------------------------------------------------------------------------------

PLAIN = (int, float, str, bool, type(None), torch.Tensor)


def assert_plain(value: Any, where: str = "checkpoint") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            assert_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert isinstance(value, PLAIN), f"{where} is a {type(value).__name__}"


def test_checkpoint_round_trip(shards: Path, tmp_path: Path) -> None:
    cfg = replace(BASE, steps=30, save_every=5, valid_every=10, keep_checkpoints=3)
    run = Run(shards, tmp_path / "run", cfg)
    folder = ckpt_dir(tmp_path / "run")
    assert numbered(tmp_path / "run") == [20, 25, 30]  # keep-last-k
    files = sorted(p.name for p in (tmp_path / "run").rglob("*.pt"))
    assert files == ["best.pt", "latest.pt", "step-000000020.pt", "step-000000025.pt", "step-000000030.pt"]
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]
    for path in (tmp_path / "run").rglob("*.pt"):
        state = torch.load(path, weights_only=True)
        assert type(state) is dict
        assert_plain(state, path.name)
        for key in ("step", "model", "criterion", "optimizer", "scheduler", "rng", "loader", "model_config",
                    "train_config", "feature_config"):
            assert key in state, f"{path.name} lacks {key}"
        assert isinstance(state["rng"]["torch"], torch.Tensor)
        assert state["loader"]["world"] == 1 and len(state["loader"]["ranks"]) == 1
        assert state["model_config"] == TINY.to_dict()
        assert state["train_config"]["n_speakers"] == 4
    latest, newest = (torch.load(folder / n, weights_only=True) for n in ("latest.pt", "step-000000030.pt"))
    assert latest["step"] == newest["step"] == 30
    assert_same_weights(latest, newest)
    assert latest["loader"] == newest["loader"] and latest["scheduler"] == newest["scheduler"]
    # best.pt: the checkpoint of the best validation EER
    eers = {entry.step: entry.valid_eer for entry in run.logs if entry.valid_eer is not None}
    assert sorted(eers) == [10, 20, 30]
    best = torch.load(folder / "best.pt", weights_only=True)
    dcfs = {entry.step: entry.valid_min_dcf for entry in run.logs if entry.valid_eer is not None}
    best_step = min(eers, key=lambda s: (eers[s], dcfs[s], -s))  # ties: the lower minDCF, then the later step
    assert best["step"] == best_step and best["best_eer"] == pytest.approx(eers[best_step])
    assert best["best_valid"] == {"step": best_step, "eer": eers[best_step], "min_dcf": dcfs[best_step]}
    assert run.result.best_eer == pytest.approx(min(eers.values()))


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_exact_resume(shards: Path, tmp_path: Path, workers: int) -> None:
    cfg = replace(BASE, workers=workers)
    Run(shards, tmp_path / "straight", cfg)
    first = Run(shards, tmp_path / "split", replace(cfg, steps=10))
    assert first.result.final_step == 10
    second = Run(shards, tmp_path / "split", cfg, resume=ckpt_dir(tmp_path / "split") / "latest.pt")
    assert second.result.steps_done == 10 and second.result.final_step == 20
    assert "continuing from" in second.text and "new pass" not in second.text
    a, b = (load_checkpoint(tmp_path / d) for d in ("straight", "split"))
    assert a["step"] == b["step"] == 20
    assert_same_weights(a, b)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and a["loader"] == b["loader"]


def test_changed_batch_options_restart_at_a_new_pass(shards: Path, tmp_path: Path) -> None:
    Run(shards, tmp_path / "run", replace(BASE, steps=10))
    run = Run(shards, tmp_path / "run", replace(BASE, steps=15, n_speakers=3),
              resume=ckpt_dir(tmp_path / "run") / "latest.pt")
    assert "restarts at a new pass" in run.text
    assert run.result.steps_done == 5 and run.result.final_step == 15
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 15 and state["train_config"]["n_speakers"] == 3
    assert state["loader"]["ranks"][0]["settings"]["n_speakers"] == 3
    assert all(s["pass"] >= 1 for s in state["loader"]["ranks"][0]["states"].values())


def test_changed_world_size_restarts_at_a_new_pass(shards: Path, tmp_path: Path) -> None:
    """A checkpoint of 2 processes continued by 1: a fresh pass after the last one any rank reached."""
    Run(shards, tmp_path / "run", replace(BASE, steps=10))
    state = load_checkpoint(tmp_path / "run")
    rank0 = state["loader"]["ranks"][0]
    rank1 = {**rank0, "rank": 1, "states": {k: {**v, "pass": 3} for k, v in rank0["states"].items()}}
    state["loader"] = {"world": 2, "ranks": [{**rank0, "world": 2}, {**rank1, "world": 2}]}
    torch.save(state, tmp_path / "two_ranks.pt")
    run = Run(shards, tmp_path / "run", replace(BASE, steps=12), resume=tmp_path / "two_ranks.pt")
    assert "restarts at a new pass (4)" in run.text and run.result.steps_done == 2
    assert all(s["pass"] >= 4 for s in load_checkpoint(tmp_path / "run")["loader"]["ranks"][0]["states"].values())


def test_steps_is_the_total(shards: Path, tmp_path: Path) -> None:
    Run(shards, tmp_path / "run", replace(BASE, steps=10, valid_every=1000))
    latest = ckpt_dir(tmp_path / "run") / "latest.pt"
    same = Run(shards, tmp_path / "run", replace(BASE, steps=10), resume=latest)
    assert same.result.steps_done == 0 and same.result.final_step == 10
    assert "nothing to do" in same.text
    assert numbered(tmp_path / "run") == [10]
    more = Run(shards, tmp_path / "run", replace(BASE, steps=20), resume=tmp_path / "run")  # a run folder works too
    assert more.result.steps_done == 10 and more.result.final_step == 20
    assert [entry.step for entry in more.logs] == list(range(11, 21))
    assert load_checkpoint(tmp_path / "run")["step"] == 20


def test_existing_run_needs_continue(shards: Path, tmp_path: Path) -> None:
    Run(shards, tmp_path / "run", replace(BASE, steps=2))
    with pytest.raises(DvectorError, match="already holds a run"):
        Run(shards, tmp_path / "run", replace(BASE, steps=4))


# ---- validation speakers -------------------------------------------------------------------------

def fake_index(n: int, utterances: int = 5) -> dict[str, Any]:
    return {"speakers": [{"index": i, "id": f"s{i}", "utterances": utterances} for i in range(n)]}


@pytest.mark.parametrize("n, expected", [(4, 2), (16, 2), (20, 2), (35, 4), (100, 10), (640, 64), (5000, 64)])
def test_heldout_speaker_counts(n: int, expected: int) -> None:
    chosen = heldout_speakers(fake_index(n), 0.1, seed=0)
    assert len(chosen) == expected and len(set(chosen)) == expected
    assert set(chosen) <= set(range(n))
    assert chosen == heldout_speakers(fake_index(n), 0.1, seed=0)  # deterministic
    assert expected <= MAX_VALID_SPEAKERS


def test_heldout_speakers_need_two_utterances_and_enough_speakers() -> None:
    index = fake_index(20)
    for s in index["speakers"][:15]:
        s["utterances"] = 1
    assert set(heldout_speakers(index, 0.1, seed=3)) <= set(range(15, 20))
    with pytest.raises(DvectorError, match="--valid"):
        heldout_speakers(fake_index(3), 0.1, seed=0)


def test_heldout_speakers_never_train(shards: Path, tmp_path: Path) -> None:
    source = resolve_shards(str(shards))
    heldout = heldout_speakers(source.index, 0.1, seed=0)
    assert len(heldout) == 2
    settings = BatchSettings(n_speakers=4, n_utterances=4, seg_len=40, exclude_speakers=tuple(heldout))
    seen: set[int] = set()
    for i, (mels, speakers) in enumerate(GE2ELoader(source, settings, workers=0, rank=0, world=1)):
        seen |= set(speakers.tolist())
        if i == 40:
            break
    assert not seen & set(heldout)
    assert len(seen) == N_SPEAKERS - 2  # every other speaker does train
    valid = collect_validation(source.urls, source.index, heldout, 20, 40)
    assert sorted(set(valid.speakers.tolist())) == heldout and valid.mels.shape[1:] == (40, 40)
    # the trainer holds out the same speakers and records them
    Run(shards, tmp_path / "run", replace(BASE, steps=2))
    assert load_checkpoint(tmp_path / "run")["heldout_speakers"] == heldout


# ---- several processes ---------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from dvector.config import AUGMENT_KINDS, AugmentConfig, ModelConfig, TrainConfig
    from dvector.training.loop import train
    args = json.loads(sys.argv[1])
    cfg = TrainConfig.from_dict(args["cfg"])
    result = train(args["shards"], args["model_dir"], cfg, ModelConfig.preset("tiny"), resume=args["resume"],
                   say=lambda message: None)
    rank = int(os.environ["RANK"])
    with open(os.path.join(args["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"steps_done": result.steps_done, "final_step": result.final_step, "is_main": result.is_main,
                   "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else None}, f)
""")


def torchrun(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_in_step_and_resume(shards: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    cfg = replace(BASE, steps=8, save_every=4, valid_every=4, momentum=0.0)
    args = {"shards": str(shards), "model_dir": str(run_dir), "cfg": cfg.to_dict(), "resume": None, "out": str(out)}
    torchrun([str(script), json.dumps(args)], tmp_path)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r.pop("is_main") for r in ranks] == [True, False]  # the CLI prints the summary of rank 0 only
    assert ranks[0] == ranks[1] == {"steps_done": 8, "final_step": 8, "world": None}  # the group is closed after
    state = load_checkpoint(run_dir)
    assert state["step"] == 8 and state["loader"]["world"] == 2
    positions = state["loader"]["ranks"]
    assert [p["rank"] for p in positions] == [0, 1] and all(p["world"] == 2 for p in positions)
    assert all(p["states"] for p in positions)  # both ranks drew batches (each from its own slice)
    assert numbered(run_dir) == [4, 8] and (ckpt_dir(run_dir) / "best.pt").exists()

    # continue through the command line, still under torchrun, to a later step
    done = torchrun(["-m", "dvector", "train", str(shards), str(run_dir), "-c", str(ckpt_dir(run_dir) / "latest.pt"),
                     "-i", "12", "-s", "4", "-d", "7", "-n", "4", "-m", "4", "-l", "40", "--model", "tiny",
                     "-w", "0", "--threads", "1", "--valid-every", "4"], tmp_path)
    assert "continuing from" in done.stdout + done.stderr
    assert "new pass" not in done.stdout + done.stderr
    resumed = load_checkpoint(run_dir)
    assert resumed["step"] == 12 and resumed["loader"]["world"] == 2 and len(resumed["loader"]["ranks"]) == 2
    assert numbered(run_dir)[-2:] == [8, 12]


def test_a_run_killed_before_latest_pt_was_linked_still_resumes(tmp_path):
    """-c RUN_DIR falls back to the newest numbered checkpoint when latest.pt is missing."""
    import torch

    from dvector.training.checkpoint import checkpoint_dir, resolve_checkpoint, save_checkpoint

    for step in (5, 10):
        save_checkpoint({"step": step, "model": {"x": torch.zeros(1)}}, tmp_path, keep=5)
    (checkpoint_dir(tmp_path) / "latest.pt").unlink()
    (checkpoint_dir(tmp_path) / ".step-000000015.pt.tmp-123").write_bytes(b"half a checkpoint")
    assert resolve_checkpoint(tmp_path).name == "step-000000010.pt"
    save_checkpoint({"step": 15, "model": {"x": torch.zeros(1)}}, tmp_path, keep=5)
    assert not list(checkpoint_dir(tmp_path).glob(".*.tmp-*"))
    assert resolve_checkpoint(tmp_path).name == "latest.pt"
