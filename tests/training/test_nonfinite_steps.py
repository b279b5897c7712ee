"""NaN or Inf in training: a step with a non-finite loss or gradient norm changes no weights and is
counted, ten in a row stop training with an error, and a checkpoint with non-finite weights is never
written; what was skipped shows in the checkpoint's counters and in TensorBoard.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from dvector.config import ModelConfig, TrainConfig
from dvector.errors import DvectorError
from dvector.shards.format import write_shard
from dvector.stream import iter_shard
from dvector.stream.loader import GE2ELoader
from dvector.training.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from dvector.training.loop import train
from dvector.training.steps import MAX_NONFINITE_IN_A_ROW
from dvector.training.validation import heldout_speakers
from train_helpers import assert_same_weights, ckpt_dir, numbered, trained_params

TINY = ModelConfig.preset("tiny")
BASE = TrainConfig(steps=8, save_every=1, decay_every=3, valid_every=1000, log_every=1, n_speakers=4,
                   n_utterances=4, seg_len=(40, 40), workers=0, momentum=0.9, keep_checkpoints=100, threads=1)



def poison_batches(monkeypatch: pytest.MonkeyPatch, bad: Any, value: float = float("nan")) -> None:
    """Make the loader's batches number ``n`` (1-based, counted per train() call) with ``bad(n)`` true all ``value``."""
    original = GE2ELoader.__iter__

    def batches(self: GE2ELoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for n, (mels, speakers) in enumerate(original(self), start=1):
            yield (torch.full_like(mels, value) if bad(n) else mels), speakers

    monkeypatch.setattr(GE2ELoader, "__iter__", batches)


def all_finite(state: dict[str, Any]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in trained_params(state).values())


def step_file(run: Path, step: int) -> Path:
    return ckpt_dir(run) / f"step-{step:09d}.pt"


def test_a_nan_batch_skips_its_step_and_is_counted(shards: Path, tmp_path: Path, monkeypatch) -> None:
    poison_batches(monkeypatch, lambda n: n in (3, 5))
    run, logs, said = tmp_path / "run", [], []
    result = train(str(shards), run, BASE, TINY, on_log=logs.append, say=said.append)
    assert result.final_step == 8 and result.skipped_steps == 2
    assert result.counters["skipped_steps"] == 2
    # the skipped steps left the weights as they were; the others changed them
    steps = {s: load_checkpoint(step_file(run, s)) for s in range(1, 9)}
    assert_same_weights(steps[2], steps[3])
    assert_same_weights(steps[4], steps[5])
    assert not torch.equal(steps[3]["model"]["embedding.weight"], steps[4]["model"]["embedding.weight"])
    assert all(all_finite(s) for s in steps.values())
    # the learning rate still follows the step (halved at 3 and 6), so a continued run computes the same rate
    assert steps[8]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.5 ** 2)
    assert [e.skipped_steps for e in logs] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert steps[8]["counters"]["skipped_steps"] == 2 and steps[8]["counters"]["sampling"]["uses"] > 0
    warnings = [m for m in said if "NaN or Inf" in m]
    assert len(warnings) == 2 and "step 3" in warnings[0] and "step 5" in warnings[1]


def test_inf_features_skip_the_step_too(shards: Path, tmp_path: Path, monkeypatch) -> None:
    poison_batches(monkeypatch, lambda n: n == 2, float("inf"))
    result = train(str(shards), tmp_path / "run", replace(BASE, steps=3), TINY, say=lambda m: None)
    assert result.skipped_steps == 1 and all_finite(load_checkpoint(tmp_path / "run"))


def test_ten_bad_steps_in_a_row_stop_training(shards: Path, tmp_path: Path, monkeypatch) -> None:
    poison_batches(monkeypatch, lambda n: n >= 3)
    run = tmp_path / "run"
    cfg = replace(BASE, steps=100, save_every=2)
    last = 2 + MAX_NONFINITE_IN_A_ROW
    with pytest.raises(DvectorError, match=rf"stopped at step {last}: {MAX_NONFINITE_IN_A_ROW} steps in a row .*NaN"):
        train(str(shards), run, cfg, TINY, say=lambda m: None)
    saved = numbered(run)
    assert saved == list(range(2, last, 2))  # every checkpoint up to the stop, none after
    first = load_checkpoint(step_file(run, 2))
    for step in saved:
        state = load_checkpoint(step_file(run, step))
        assert all_finite(state)
        assert_same_weights(first, state)  # no skipped step changed the weights
    assert load_checkpoint(run)["counters"]["skipped_steps"] == saved[-1] - 2


def test_a_run_continued_across_skipped_steps_is_exact(shards: Path, tmp_path: Path, monkeypatch) -> None:
    """Steps 5 and 6 of 8 skipped: continuing from step 5 (mid-streak) ends as the straight run does,
    and the streak goes on counting from the checkpoint."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    bad = {5, 6}  # batches of each train() call
    poison_batches(monkeypatch, lambda n: n in bad)
    train(str(shards), straight, BASE, TINY, say=lambda m: None)
    train(str(shards), split, replace(BASE, steps=5), TINY, say=lambda m: None)
    assert load_checkpoint(split)["counters"]["skipped_in_a_row"] == 1
    bad.clear()
    bad.add(1)  # batch 6 of the run is the first of the continued call
    result = train(str(shards), split, BASE, TINY, resume=split, say=lambda m: None)
    assert result.skipped_steps == 1
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert_same_weights(a, b)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and a["loader"] == b["loader"]
    assert a["counters"]["skipped_steps"] == b["counters"]["skipped_steps"] == 2
    assert load_checkpoint(step_file(split, 6))["counters"]["skipped_in_a_row"] == 2


def test_counters_add_up_over_continued_runs_and_reach_tensorboard(shards: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    poison_batches(monkeypatch, lambda n: n == 2)
    run = tmp_path / "run"
    first = train(str(shards), run, replace(BASE, steps=4), TINY, say=lambda m: None)
    second = train(str(shards), run, replace(BASE, steps=8), TINY, resume=run, say=lambda m: None)
    assert first.skipped_steps == second.skipped_steps == 1  # batch 2 of each call
    state = load_checkpoint(run)
    assert state["counters"]["skipped_steps"] == 2
    sampling = state["counters"]["sampling"]
    assert sampling["uses"] == first.sampling["uses"] + second.sampling["uses"] > 0
    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/skipped_steps" in tags and "data/uses" in tags and "data/utterances" in tags
    skipped = {e.step: e.value for e in events.Scalars("train/skipped_steps")}
    assert skipped[1] == 0 and skipped[2] == 1 and skipped[8] == 2


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path: Path) -> None:
    good = {"step": 5, "model": {"w": torch.ones(3)}, "criterion": {"w": torch.tensor(10.0)}}
    save_checkpoint(good, tmp_path, keep=5)
    for bad_value in (float("nan"), float("inf")):
        bad = {"step": 6, "model": {"w": torch.tensor([1.0, bad_value, 1.0])}, "criterion": {"w": torch.tensor(10.0)}}
        with pytest.raises(DvectorError, match=r"refusing to save the checkpoint of step 6: NaN or Inf in model\.w"):
            save_checkpoint(bad, tmp_path, keep=5)
    folder = checkpoint_dir(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "step-000000005.pt"]
    assert load_checkpoint(folder / "latest.pt")["step"] == 5


def test_training_refuses_to_save_nan_weights(shards: Path, tmp_path: Path, monkeypatch) -> None:
    """Weights that are non-finite anyway (here: a checkpoint spoiled by hand) stop training at the
    first save, with nothing written."""
    run = tmp_path / "run"
    train(str(shards), run, replace(BASE, steps=2), TINY, say=lambda m: None)
    state = load_checkpoint(run)
    state["model"]["embedding.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "spoiled.pt")
    with pytest.raises(DvectorError, match="refusing to save the checkpoint of step 3"):
        train(str(shards), tmp_path / "run2", replace(BASE, steps=4), TINY, resume=tmp_path / "spoiled.pt",
              say=lambda m: None)
    assert not (tmp_path / "run2" / "checkpoints").exists() or numbered(tmp_path / "run2") == []


def poisoned_copy(shards: Path, dest: Path) -> int:
    """A copy of ``shards`` whose first sample in a shard without validation speakers holds +Inf in
    every value (training reads it, validation does not); its speaker."""
    shutil.copytree(shards, dest)
    index = json.loads((dest / "index.json").read_text())
    heldout = set(heldout_speakers(index, 0.1, seed=0))
    entry = next(e for e in index["shards"] if not heldout & set(e["speakers"]))
    samples, poisoned = [], None
    for sample in iter_shard(str(dest / entry["name"])):
        meta = {k: v for k, v in sample.items() if not k.startswith("__") and k != "mel"}
        mel = np.asarray(sample["mel"], dtype=np.float16)
        if poisoned is None:
            mel, poisoned = np.full_like(mel, np.inf), int(sample["speaker_index"])
        samples.append((sample["__key__"], mel, meta))
    info = write_shard(dest / entry["name"], samples)
    entry.update(bytes=info.bytes, sha256=info.sha256)
    (dest / "index.json").write_text(json.dumps(index))
    assert poisoned is not None
    return poisoned


def test_a_shard_holding_an_inf_mel_never_spoils_the_model(shards: Path, tmp_path: Path) -> None:
    """Whether the stream skips the sample or the step is skipped, training ends with finite
    weights in every checkpoint, and the skip is counted."""
    bad_shards = tmp_path / "shards"
    poisoned_copy(shards, bad_shards)
    run = tmp_path / "run"
    result = train(str(bad_shards), run, replace(BASE, steps=32, save_every=8), TINY, say=lambda m: None)
    assert result.final_step == 32
    for step in numbered(run):
        assert all_finite(load_checkpoint(step_file(run, step)))
    state = load_checkpoint(run)
    skipped = state["counters"]["skipped_steps"] + state["counters"]["sampling"].get("bad_samples", 0)
    assert skipped >= 1
