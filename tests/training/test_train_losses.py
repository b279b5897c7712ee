"""Training with every loss of ``--loss``: it runs, learns, saves the loss's own parameters (a classifier
sized from the index's speaker table) and resumes exactly, margin warm-up included.

Tiny model, tiny synthetic shards (16 speakers), one torch thread, batches of N=4, M=4, L=40.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dvector.config import LOSSES, ModelConfig, TrainConfig
from dvector.errors import DvectorError
from dvector.training.checkpoint import load_checkpoint
from dvector.training.loop import StepLog, train
from train_helpers import N_SPEAKERS, assert_same_weights, ckpt_dir

TINY = ModelConfig.preset("tiny")
BASE = TrainConfig(steps=12, save_every=6, decay_every=5, valid_every=6, log_every=1, n_speakers=4, n_utterances=4,
                   seg_len=(40, 40), workers=0, keep_checkpoints=3, augment=replace(TrainConfig().augment, kinds=()))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # exact resume: runs with the same thread count


def run(shards: Path, model_dir: Path, cfg: TrainConfig, resume: Path | None = None,
        model: ModelConfig = TINY) -> list[StepLog]:
    logs: list[StepLog] = []
    train(str(shards), model_dir, cfg, model, resume=str(resume) if resume else None, on_log=logs.append,
          say=lambda message: None)
    return logs


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_and_saves_its_parameters(shards: Path, tmp_path: Path, loss: str) -> None:
    cfg = replace(BASE, loss=loss, subcentres=2 if loss == "aamsoftmax" else 1)
    logs = run(shards, tmp_path / "run", cfg)
    assert len(logs) == 12 and all(np.isfinite(e.loss) for e in logs)
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 12 and state["train_config"]["loss"] == loss
    assert state["train_config"]["optimizer"] == "auto"
    kind = "sgd" if loss in ("ge2e", "contrast") else "adam"
    assert cfg.optimizer_kind == kind
    assert ("betas" in state["optimizer"]["param_groups"][0]) == (kind == "adam")  # Adam's, not SGD's
    criterion = state["criterion"]
    classifiers = [v for v in criterion.values() if v.dim() == 2]
    if loss == "aamsoftmax":  # one row per speaker of the index (x 2 sub-centres), embed_dim wide
        assert [tuple(v.shape) for v in classifiers] == [(2 * N_SPEAKERS, TINY.embed_dim)]
        assert all(e.margin is not None and np.isnan(e.w) for e in logs)
    elif loss == "softmaxproto":
        assert [tuple(v.shape) for v in classifiers] == [(N_SPEAKERS, TINY.embed_dim)]
    else:
        assert not classifiers and all(e.w > 0 for e in logs)


def test_aamsoftmax_margin_warms_up_and_resumes_exactly(shards: Path, tmp_path: Path) -> None:
    cfg = replace(BASE, loss="aamsoftmax", margin=0.3, margin_warmup=8, subcentres=2, weight_decay=1e-4)
    straight = run(shards, tmp_path / "straight", cfg)
    margins = [e.margin for e in straight]
    # the margin of the step taken (begin_step(s) before step s+1): 0.3 * min(1, s / 8)
    assert margins == pytest.approx([0.3 * min(1.0, s / 8) for s in range(12)])
    run(shards, tmp_path / "split", replace(cfg, steps=6))
    resumed = run(shards, tmp_path / "split", cfg, resume=ckpt_dir(tmp_path / "split") / "latest.pt")
    assert [e.margin for e in resumed] == pytest.approx(margins[6:])
    a, b = (load_checkpoint(tmp_path / d) for d in ("straight", "split"))
    assert_same_weights(a, b)  # encoder and classifier alike


def test_classifier_loss_learns(shards: Path, tmp_path: Path) -> None:
    cfg = replace(BASE, loss="aamsoftmax", steps=40, save_every=40, valid_every=40, decay_every=1000, lr=0.01)
    losses = np.array([e.loss for e in run(shards, tmp_path / "run", cfg)])
    assert losses[-10:].mean() < 0.9 * losses[:10].mean()


def test_classifier_loss_needs_the_index(shards: Path, tmp_path: Path) -> None:
    urls = [str(p) for p in sorted(shards.glob("shard-*.tar"))]
    lone = tmp_path / "lone"
    lone.mkdir()
    for url in urls:  # the shards without their index.json
        (lone / Path(url).name).symlink_to(url)
    with pytest.raises(DvectorError, match="index"):
        train([str(p) for p in sorted(lone.glob("*.tar"))], tmp_path / "run", replace(BASE, loss="aamsoftmax"),
              TINY, say=lambda message: None)
