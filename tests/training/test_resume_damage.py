"""Continuing a run whose checkpoints are damaged, or onto shards of another feature size: the newest
readable checkpoint is used (and the user told which), or one clear error."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dvector.config import ModelConfig, TrainConfig
from dvector.errors import DvectorError
from dvector.training.checkpoint import load_checkpoint, load_resume_checkpoint
from dvector.training.loop import train
from train_helpers import assert_same_weights, ckpt_dir, narrow_shards

TINY = ModelConfig.preset("tiny")
CFG = TrainConfig(steps=6, save_every=2, decay_every=4, valid_every=1000, log_every=1, n_speakers=4, n_utterances=4,
                  seg_len=(40, 40), workers=0, keep_checkpoints=10, threads=1)



@pytest.fixture
def run(shards: Path, tmp_path: Path) -> Path:
    """A run with checkpoints at steps 2, 4 and 6 (latest.pt: step 6)."""
    model_dir = tmp_path / "run"
    train(str(shards), model_dir, CFG, TINY, say=lambda m: None)
    return model_dir


def step_file(model_dir: Path, step: int) -> Path:
    return ckpt_dir(model_dir) / f"step-{step:09d}.pt"


def replace_with_half(path: Path) -> None:
    """Put the first half of ``path``'s bytes in its place, as a new file (other links keep the whole)."""
    data = path.read_bytes()
    tmp = path.with_name(path.name + ".half")
    tmp.write_bytes(data[: len(data) // 2])
    os.replace(tmp, path)


@pytest.mark.parametrize("given", ["folder", "latest"])
def test_a_truncated_latest_falls_back_to_the_newest_step_file(shards: Path, run: Path, given: str) -> None:
    replace_with_half(ckpt_dir(run) / "latest.pt")
    said: list[str] = []
    resume = run if given == "folder" else ckpt_dir(run) / "latest.pt"
    result = train(str(shards), run, replace(CFG, steps=8), TINY, resume=resume, say=said.append)
    assert result.final_step == 8 and result.steps_done == 2
    text = "\n".join(said)
    assert "note:" in text and "latest.pt" in text and "cannot load checkpoint" in text
    assert f"continuing from {step_file(run, 6)} at step 6" in text
    # and it is the same run: a straight run to step 8 ends alike
    train(str(shards), run.parent / "straight", replace(CFG, steps=8), TINY, say=lambda m: None)
    assert_same_weights(load_checkpoint(run.parent / "straight"), load_checkpoint(run))


def test_a_latest_truncated_in_place_falls_back_past_its_step_file(run: Path) -> None:
    """latest.pt is a hard link to the newest step file: truncated in place, both are damaged."""
    latest = ckpt_dir(run) / "latest.pt"
    linked = os.path.samefile(latest, step_file(run, 6))
    os.truncate(latest, latest.stat().st_size // 3)
    said: list[str] = []
    state, path = load_resume_checkpoint(run, said.append)
    expected = 4 if linked else 6
    assert state["step"] == expected and path == step_file(run, expected)
    assert len(said) == 1 and said[0].startswith("note:") and str(path) in said[0]
    if linked:
        assert "step-000000006.pt cannot be read either" in said[0]


def test_no_readable_checkpoint_is_one_clear_error(run: Path) -> None:
    for p in ckpt_dir(run).glob("step-*.pt"):
        replace_with_half(p)
    (ckpt_dir(run) / "latest.pt").write_bytes(b"")
    with pytest.raises(DvectorError, match=r"latest\.pt.*no readable step-\*\.pt beside it") as info:
        load_resume_checkpoint(run, lambda m: None)
    assert "\n" not in str(info.value)


def test_a_damaged_step_file_named_on_its_own_is_an_error(run: Path) -> None:
    """Only latest.pt stands for "the newest": a numbered file asked for by name is used or refused."""
    replace_with_half(step_file(run, 4))
    with pytest.raises(DvectorError, match=r"cannot load checkpoint .*step-000000004\.pt"):
        load_resume_checkpoint(step_file(run, 4), lambda m: None)


def test_a_file_that_is_not_a_training_checkpoint_is_refused(run: Path, tmp_path: Path) -> None:
    state = load_checkpoint(run)
    del state["optimizer"]
    torch.save(state, tmp_path / "weights-only.pt")
    with pytest.raises(DvectorError, match="not a training checkpoint: it lacks optimizer"):
        load_resume_checkpoint(tmp_path / "weights-only.pt", lambda m: None)


def test_shards_of_another_feature_size_are_refused_at_start(run: Path, tmp_path_factory) -> None:
    narrow = narrow_shards(tmp_path_factory)
    with pytest.raises(DvectorError, match=r"these shards hold 24 mel bands per frame, but the network of .*"
                                           r"reads 40: continue on shards built with --n-mels 40"):
        train(str(narrow), run, replace(CFG, steps=8), TINY, resume=run, say=lambda m: None)


def test_batches_of_another_feature_size_without_an_index_are_one_clear_error(run: Path, tmp_path_factory,
                                                                             tmp_path: Path) -> None:
    """Shards without index.json say their feature size only in their batches."""
    bare = tmp_path / "no_index"
    bare.mkdir()
    for shard in narrow_shards(tmp_path_factory).glob("shard-*.tar"):
        shutil.copyfile(shard, bare / shard.name)
    urls = sorted(str(p) for p in bare.glob("shard-*.tar"))
    with pytest.raises(DvectorError, match="the batches hold 24 mel bands per frame, but the network reads 40"):
        train(urls, run, replace(CFG, steps=8), TINY, resume=run, say=lambda m: None)
