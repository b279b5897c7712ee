"""Training from another run's encoder (``train(..., init=RUN)``, ``dvector train --init``): the encoder's
weights are copied and nothing else, --freeze-steps keeps them exactly for K steps, the checkpoints record
where the run started, ``-c`` continues such a run exactly, and shards of other features are refused.

Tiny model, the session's synthetic shards (16 speakers), one torch thread, batches of N=4, M=4, L=40.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import dvector.training.loop as loop
from dvector.config import BuildConfig, FeatureConfig, ModelConfig, TrainConfig
from dvector.demo.synth import write_corpus
from dvector.errors import DvectorError
from dvector.files import sha256_file
from dvector.nn.encoders import build_encoder
from dvector.shards.build import build_shards
from dvector.training.checkpoint import load_checkpoint, save_checkpoint
from dvector.training.loop import train
from train_helpers import assert_same_weights, ckpt_dir, narrow_shards

TINY = ModelConfig.preset("tiny")
NO_AUGMENT = replace(TrainConfig().augment, kinds=())
BASE = TrainConfig(steps=6, save_every=3, decay_every=4, valid_every=1000, log_every=1, n_speakers=4, n_utterances=4,
                   seg_len=(40, 40), workers=0, momentum=0.9, keep_checkpoints=10, augment=NO_AUGMENT)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # exact resume: runs with the same thread count


def quiet_train(shards: Path, model_dir: Path, cfg: TrainConfig, model: ModelConfig | None = None,
                **kw: Any) -> list[str]:
    """``train`` with what it says collected (and returned)."""
    said: list[str] = []
    train(str(shards), model_dir, cfg, model, say=said.append, **kw)
    return said


@pytest.fixture(scope="module")
def init_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GE2E run, 4 steps on the session's shards: the run others start from."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("init") / "run"
        quiet_train(shards, run, replace(BASE, steps=4, save_every=4, lr=0.05), TINY)
    finally:
        torch.set_num_threads(before)
    return run


@pytest.fixture
def first_step_state(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the trainee holds when its step loop starts (step 0): the encoder's and the loss's weights,
    the optimizer's state and the step, copied."""
    seen: dict[str, Any] = {}
    real = loop.StepLoop

    def spy(cfg, ctx, parts, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.update(step=parts.step, optimizer=parts.optimizer.state_dict()["state"],
                    model={k: v.detach().clone() for k, v in parts.model.state_dict().items()},
                    criterion={k: v.detach().clone() for k, v in parts.criterion.state_dict().items()})
        return real(cfg, ctx, parts, *args, **kw)

    monkeypatch.setattr(loop, "StepLoop", spy)
    return seen


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- what --init copies ---------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["ge2e", "aamsoftmax"])
def test_init_copies_the_encoder_and_nothing_else(shards: Path, init_run: Path, tmp_path: Path, loss: str,
                                                  first_step_state: dict[str, Any]) -> None:
    """At step 0 the encoder is the init run's, bit for bit; the loss's weights are new (GE2E's w and b
    at their starting values, a classifier over these shards' speakers), the optimizer is empty, the
    step is 0. No --model: the network (and features) come from the init run."""
    source = load_checkpoint(init_run)
    said = quiet_train(shards, tmp_path / "run", replace(BASE, steps=2, save_every=2, loss=loss), None, init=init_run)
    assert first_step_state["step"] == 0 and first_step_state["optimizer"] == {}
    assert same_tensors(first_step_state["model"], source["model"])
    criterion = first_step_state["criterion"]
    if loss == "ge2e":
        assert float(criterion["w"]) == 10.0 and float(criterion["b"]) == -5.0  # GE2E's starting values
        assert float(source["criterion"]["w"]) != 10.0  # the init run's moved: it was not copied
    else:
        (classifier,) = [v for v in criterion.values() if v.dim() == 2]
        assert classifier.shape == (16, TINY.embed_dim)  # one row per speaker of these shards' index
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 2 and state["model_config"] == source["model_config"]
    assert state["feature_config"] == source["feature_config"] and state["train_config"]["loss"] == loss
    started = [line for line in said if line.startswith("starting from the encoder of")]
    assert len(started) == 1 and "(step 4)" in started[0]


def test_the_checkpoint_records_where_the_run_started(shards: Path, init_run: Path, tmp_path: Path) -> None:
    """``init``: the init checkpoint's absolute path, sha256 and step; a run without --init records None."""
    quiet_train(shards, tmp_path / "run", replace(BASE, steps=1, save_every=1), init=init_run)
    latest = ckpt_dir(init_run) / "latest.pt"
    assert load_checkpoint(tmp_path / "run")["init"] == {"path": str(latest.resolve()), "sha256": sha256_file(latest),
                                                         "step": 4}
    assert load_checkpoint(init_run)["init"] is None
    # a checkpoint file works as well as a run folder
    step_file = ckpt_dir(init_run) / "step-000000004.pt"
    quiet_train(shards, tmp_path / "file", replace(BASE, steps=1, save_every=1), TINY, init=step_file)
    assert load_checkpoint(tmp_path / "file")["init"]["path"] == str(step_file.resolve())


def test_an_encoder_with_its_network_is_enough(shards: Path, init_run: Path, tmp_path: Path) -> None:
    """--init needs only ``model`` and ``model_config`` (e.g. converted weights), not a whole training checkpoint."""
    full = load_checkpoint(init_run)
    save_checkpoint({"step": 7, "model": full["model"], "model_config": full["model_config"],
                     "feature_config": full["feature_config"]}, tmp_path / "encoder", keep=1)
    quiet_train(shards, tmp_path / "run", replace(BASE, steps=1, save_every=1), init=tmp_path / "encoder")
    assert load_checkpoint(tmp_path / "run")["init"]["step"] == 7
    save_checkpoint({"step": 1, "model": full["model"]}, tmp_path / "bare", keep=1)
    with pytest.raises(DvectorError, match="lacks model_config"):
        quiet_train(shards, tmp_path / "run2", BASE, init=tmp_path / "bare")


# ---- --freeze-steps --------------------------------------------------------------------------------

@pytest.mark.parametrize("loss, optimizer", [("aamsoftmax", "adam"), ("ge2e", "sgd")])
def test_freeze_steps_keep_the_encoder_exactly_then_train_it(shards: Path, init_run: Path, tmp_path: Path,
                                                            loss: str, optimizer: str) -> None:
    """For K steps only the loss's weights move (Adam's moments, SGD's momentum and weight decay leave the
    encoder alone: it has no optimizer state); from step K+1 the encoder trains too."""
    cfg = replace(BASE, steps=5, save_every=1, loss=loss, optimizer=optimizer, weight_decay=0.01, freeze_steps=3)
    quiet_train(shards, tmp_path / "run", cfg, init=init_run)
    encoder = load_checkpoint(init_run)["model"]
    states = {step: load_checkpoint(ckpt_dir(tmp_path / "run") / f"step-{step:09d}.pt") for step in range(1, 6)}
    for step in (1, 2, 3):
        assert same_tensors(states[step]["model"], encoder), f"the encoder moved at step {step}"
    assert not same_tensors(states[1]["criterion"], states[3]["criterion"])  # the loss's weights did train
    for step in (4, 5):
        assert not any(torch.equal(states[step]["model"][k], encoder[k]) for k in encoder), step
    # while frozen, the optimizer holds state for the loss's parameters only (they follow the encoder's)
    n_encoder = len(list(build_encoder(TINY).parameters()))
    assert states[3]["optimizer"]["state"] and min(states[3]["optimizer"]["state"]) >= n_encoder
    assert min(states[5]["optimizer"]["state"]) < n_encoder


def test_freeze_steps_need_init(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(DvectorError, match="--freeze-steps 2 needs --init"):
        quiet_train(shards, tmp_path / "run", replace(BASE, freeze_steps=2), TINY)


# ---- continuing an --init run ---------------------------------------------------------------------

def test_continuing_an_init_run_matches_a_straight_one(shards: Path, init_run: Path, tmp_path: Path) -> None:
    """An --init run stopped inside its frozen steps and continued with -c (given --init again: it is not
    loaded again, with a note) ends bit for bit where an uninterrupted one does; the record is carried."""
    cfg = replace(BASE, steps=6, save_every=1, freeze_steps=2)
    quiet_train(shards, tmp_path / "straight", cfg, init=init_run)
    quiet_train(shards, tmp_path / "split", replace(cfg, steps=1), init=init_run)
    said = quiet_train(shards, tmp_path / "split", cfg, resume=tmp_path / "split", init=init_run)
    assert any("--init" in line and "used only when a run starts" in line for line in said)
    assert not any(line.startswith("starting from the encoder") for line in said)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    assert a["step"] == b["step"] == 6
    assert_same_weights(a, b)
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and a["loader"] == b["loader"]
    assert a["init"] == b["init"] and b["init"]["step"] == 4


# ---- refusals ----------------------------------------------------------------------------------------

def test_another_model_than_the_init_runs_is_refused(shards: Path, init_run: Path, tmp_path: Path) -> None:
    with pytest.raises(DvectorError, match=r"--model attentive differs from the 'tiny' network of --init") as info:
        quiet_train(shards, tmp_path / "run", BASE, ModelConfig.preset("attentive"), init=init_run)
    assert "\n" not in str(info.value)
    quiet_train(shards, tmp_path / "same", replace(BASE, steps=1, save_every=1), TINY, init=init_run)  # the same: fine


@pytest.fixture(scope="module")
def other_front_end_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of the default mel width (40) but another f_min: other features, the same shape."""
    base = tmp_path_factory.mktemp("fmin")
    write_corpus(base / "corpus", 6, 4, seed=13, duration_s=(1.0, 1.5))
    build_shards([str(base / "corpus")], base / "shards",
                 BuildConfig(min_shards=2, block_size=4, features=FeatureConfig(f_min=100.0)), workers=1)
    return base / "shards"


def test_shards_of_other_features_are_refused(init_run: Path, tmp_path: Path, other_front_end_shards: Path,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """Another mel width or any other feature setting: one line that names build-shards --features, for
    --init and for -c alike (nothing trained, nothing written)."""
    fix = f"`dvector build-shards ROOT... -o OUT --features {init_run}`"
    for shards, what in ((narrow_shards(tmp_path_factory), "24 mel bands"), (other_front_end_shards, "f_min 100.0")):
        for kw in ({"init": init_run}, {"resume": init_run}):
            with pytest.raises(DvectorError) as info:
                quiet_train(shards, tmp_path / "run", replace(BASE, steps=8), TINY, **kw)
            message = str(info.value)
            assert "\n" not in message and what in message and fix in message, message
            assert not (tmp_path / "run").exists()


# ---- several processes -------------------------------------------------------------------------------

@pytest.mark.slow
def test_freeze_steps_under_ddp(shards: Path, init_run: Path, tmp_path: Path) -> None:
    """Two CPU processes (torchrun, gloo): the encoder's gradients, all-reduced and then dropped, leave it
    exactly the init run's for the frozen steps on every rank, and the run goes on past them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dvector",
               "train", str(shards), str(run), "--init", str(init_run), "--freeze-steps", "2", "--loss", "aamsoftmax",
               "-i", "3", "-s", "1", "--keep", "10", "-n", "4", "-m", "4", "-l", "40", "-w", "0", "--threads", "1",
               "--valid-every", "1000", "--augment", "none"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    encoder = load_checkpoint(init_run)["model"]
    states = {step: load_checkpoint(ckpt_dir(run) / f"step-{step:09d}.pt") for step in (1, 2, 3)}
    assert states[1]["loader"]["world"] == 2
    assert same_tensors(states[2]["model"], encoder) and not same_tensors(states[1]["criterion"], states[2]["criterion"])
    assert not any(torch.equal(states[3]["model"][k], encoder[k]) for k in encoder)
