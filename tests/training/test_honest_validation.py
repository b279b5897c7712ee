"""Honest validation: trials pair speakers within one root (corpus) only, ties of a saturated EER
go to the lower minDCF and then the later step, and the summary says when validation is too easy.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

import dvector.training.steps as steps_module
from dvector.cli.summary import print_train_summary
from dvector.config import BuildConfig, ModelConfig, TrainConfig
from dvector.demo.synth import write_corpus
from dvector.metrics import all_pairs_scores, eer
from dvector.nn.model import DVector
from dvector.shards.build import build_shards
from dvector.stream import resolve_shards
from dvector.training.checkpoint import load_checkpoint
from dvector.training.loop import StepLog, TrainResult, train
from dvector.training.validation import (ValidationScores, ValidationSet, collect_validation, heldout_speakers,
                                         improves, perturbed_copies, validation_note, validation_scores)
from train_helpers import ckpt_dir

TINY = ModelConfig.preset("tiny")
BASE = TrainConfig(steps=20, save_every=10, decay_every=1000, valid_every=5, log_every=1, n_speakers=4,
                   n_utterances=4, seg_len=(40, 40), workers=0, keep_checkpoints=5)


@pytest.fixture(autouse=True)
def one_thread():  # noqa: ANN201
    torch.set_num_threads(1)
    yield


class MeanPool(torch.nn.Module):
    """A stand-in network: the unit-length time average of the input frames."""

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(mels.mean(dim=1), dim=-1)


def corpus_like(n_roots: int = 5, per_root: int = 2, utterances: int = 4, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Embeddings where each root (corpus) has its own direction and its speakers are indistinguishable
    within it: scoring pairs across roots looks easy, scoring within a root is chance."""
    rng = np.random.default_rng(seed)
    dim = n_roots + 4
    vectors, speakers, roots = [], [], []
    for r in range(n_roots):
        for s in range(per_root):
            for _ in range(utterances):
                v = np.zeros(dim)
                v[r] = 1.0
                v[n_roots:] = 0.05 * rng.standard_normal(4)  # no speaker information at all
                vectors.append(v / np.linalg.norm(v))
                speakers.append(r * per_root + s)
                roots.append(f"corpus{r}")
    return np.array(vectors, np.float32), np.array(speakers), np.array(roots)


# ---- pairs within a root -------------------------------------------------------------------------

def test_pairs_within_a_root_only() -> None:
    embeddings, speakers, roots = corpus_like()
    scores_all, labels_all = all_pairs_scores(embeddings, speakers)
    scores, labels = all_pairs_scores(embeddings, speakers, roots)
    assert labels.sum() == labels_all.sum() == 10 * 6  # every target pair is within a root: all kept
    assert (~labels).sum() == 5 * 4 * 4  # only the non-target pairs within a root
    assert eer(scores_all, labels_all)[0] < 0.15  # pairs across corpora flatter the network
    assert eer(scores, labels)[0] > 0.3  # within a corpus it knows nothing
    assert np.array_equal(all_pairs_scores(embeddings, speakers, None)[0], scores_all)


def test_validation_scores_use_the_roots() -> None:
    embeddings, speakers, roots = corpus_like()
    mels = torch.from_numpy(np.repeat(embeddings[:, None, :], 3, axis=1))  # MeanPool gives back the vector
    honest = validation_scores(MeanPool(), ValidationSet(mels, speakers, roots), torch.device("cpu"))
    mixed = validation_scores(MeanPool(), ValidationSet(mels, speakers), torch.device("cpu"))
    assert honest.eer > 0.3 and mixed.eer < 0.15 and honest.min_dcf >= mixed.min_dcf


def test_a_root_of_one_speaker_keeps_its_target_pairs_and_is_said_once() -> None:
    embeddings, speakers, roots = corpus_like(n_roots=3, per_root=2)
    keep = speakers != 5  # corpus2 now gives one speaker (4)
    data = ValidationSet(torch.zeros(int(keep.sum()), 2, 2), speakers[keep], roots[keep])
    assert data.speakers_per_root() == {"corpus0": 2, "corpus1": 2, "corpus2": 1}
    notes = data.root_notes()
    assert len(notes) == 1 and "corpus2" in notes[0] and "target pairs still count" in notes[0]
    assert data.pair_groups is not None
    _, labels = all_pairs_scores(embeddings[keep], data.speakers, data.pair_groups)
    assert labels.sum() == 5 * 6 and (~labels).sum() == 2 * 16
    assert validation_note(data, 0.1, 0.5) == ""  # two roots give non-target pairs: not narrow


def test_roots_of_one_speaker_each_fall_back_to_pairs_across_roots() -> None:
    embeddings, speakers, roots = corpus_like(n_roots=3, per_root=1)
    data = ValidationSet(torch.zeros(len(speakers), 2, 2), speakers, roots)
    assert data.pair_groups is None  # no non-target pair within a root: the cross-root ones are all there are
    assert "each of its 3 roots gives a single speaker" in data.root_notes()[0]
    assert validation_note(data, 0.0, 0.0).startswith("too easy to choose a checkpoint: no root")


def test_one_root_is_left_alone() -> None:
    _, speakers, _ = corpus_like(n_roots=2, per_root=2)
    merged = ValidationSet(torch.zeros(len(speakers), 2, 2), speakers, np.full(len(speakers), ""))
    assert merged.pair_groups is None and merged.root_notes() == [] and validation_note(merged, 0.05, 0.4) == ""


def test_speed_perturbed_copies_go_with_their_source() -> None:
    """A copy (ROOT/SPK@sp0.9) is never a validation speaker, and is kept out of training with its source."""
    ids = [f"r{r}/s{s}{suffix}" for r in range(2) for s in range(20) for suffix in ("", "@sp0.9", "@sp1.1")]
    index = {"speakers": [{"index": i, "id": name, "utterances": 5} for i, name in enumerate(ids)]}
    chosen = heldout_speakers(index, 0.1, seed=0)
    assert len(chosen) == 4 and all("@sp" not in ids[k] for k in chosen)  # a tenth of the 40 source speakers
    copies = perturbed_copies(index, chosen)
    assert sorted(ids[k] for k in copies) == sorted(f"{ids[k]}{x}" for k in chosen for x in ("@sp0.9", "@sp1.1"))
    plain = {"speakers": [{"index": i, "id": f"r/s{i}", "utterances": 5} for i in range(40)]}
    assert perturbed_copies(plain, heldout_speakers(plain, 0.1, seed=0)) == []


# ---- ties and the summary ------------------------------------------------------------------------

def test_ties_go_to_the_lower_min_dcf_then_the_later_step() -> None:
    assert improves(ValidationScores(0.1, 0.9), None, None)
    assert improves(ValidationScores(0.05, 0.9), 0.1, 0.2)  # a lower EER wins whatever its minDCF
    assert not improves(ValidationScores(0.2, 0.0), 0.1, 0.5)
    assert improves(ValidationScores(0.0, 0.3), 0.0, 0.4)  # a saturated EER: the lower minDCF
    assert improves(ValidationScores(0.0, 0.4), 0.0, 0.4)  # all equal: the later step
    assert not improves(ValidationScores(0.0, 0.5), 0.0, 0.4)
    assert improves(ValidationScores(0.0, 0.5), 0.0, None)  # an older checkpoint's best, minDCF unknown


def test_the_summary_says_when_validation_is_too_easy(tmp_path: Path) -> None:
    _, speakers, roots = corpus_like(n_roots=2, per_root=3)
    data = ValidationSet(torch.zeros(len(speakers), 2, 2), speakers, roots)
    note = validation_note(data, 0.0, 0.0)
    assert note.startswith("too easy to choose a checkpoint") and "saturated" in note
    assert validation_note(data, 0.0, 0.05) == ""  # minDCF still tells checkpoints apart
    result = TrainResult(tmp_path, 20, 20, 1.0, 0.0, 2.0, 0.1, best_min_dcf=0.0, best_step=20, validation_note=note)
    console = Console(record=True, width=300)
    print_train_summary(result, console)
    text = " ".join(console.export_text().split())
    assert "best valid EER 0.00% (minDCF 0.000, step 20)" in text
    assert "validation too easy to choose a checkpoint" in text
    plain = Console(record=True, width=300)
    print_train_summary(TrainResult(tmp_path, 20, 20, 1.0, 0.1, 2.0, 0.1), plain)
    plain_text = " ".join(plain.export_text().split())
    assert "best valid EER 10.00%" in plain_text and "too easy" not in plain_text


def scripted(monkeypatch: pytest.MonkeyPatch, by_step: dict[int, tuple[float, float]]) -> None:
    """Validation measures chosen by step (the network's own are not what these tests are about)."""
    def fake(model: Any, data: Any, device: Any) -> ValidationScores:
        return ValidationScores(*by_step[current["step"]])

    current = {"step": 0}
    real_validate = steps_module.StepLoop._validate

    def validate(self: Any) -> Any:
        current["step"] = self.parts.step
        return real_validate(self)

    monkeypatch.setattr(steps_module, "validation_scores", fake)
    monkeypatch.setattr(steps_module.StepLoop, "_validate", validate)


def run(shards: Path, model_dir: Path, cfg: TrainConfig = BASE, **kw: Any) -> tuple[TrainResult, list[StepLog], str]:
    logs: list[StepLog] = []
    said: list[str] = []
    result = train(str(shards), model_dir, cfg, TINY, on_log=logs.append, say=said.append, **kw)
    return result, logs, "\n".join(said)


def test_a_saturated_eer_never_freezes_best(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, {5: (0.0, 0.2), 10: (0.0, 0.1), 15: (0.0, 0.1), 20: (0.0, 0.3)})
    result, logs, _ = run(shards, tmp_path / "run")
    assert [(e.step, e.valid_eer, e.valid_min_dcf) for e in logs if e.valid_eer is not None] == [
        (5, 0.0, 0.2), (10, 0.0, 0.1), (15, 0.0, 0.1), (20, 0.0, 0.3)]
    best = torch.load(ckpt_dir(tmp_path / "run") / "best.pt", weights_only=True)
    assert best["step"] == 15 and best["best_eer"] == 0.0  # equal EER, equal minDCF: the later step
    assert best["best_valid"] == {"step": 15, "eer": 0.0, "min_dcf": 0.1}
    latest = load_checkpoint(tmp_path / "run")
    assert latest["best_valid"] == best["best_valid"] and latest["valid"] == {"eer": 0.0, "min_dcf": 0.3}
    assert (result.best_eer, result.best_min_dcf, result.best_step) == (0.0, 0.1, 15)
    assert result.validation_note == ""


def test_the_best_carries_over_a_resume(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, {5: (0.0, 0.0), 10: (0.0, 0.0), 15: (0.0, 0.0), 20: (0.1, 0.0)})
    run(shards, tmp_path / "run", replace(BASE, steps=10))
    result, _, _ = run(shards, tmp_path / "run", resume=tmp_path / "run")
    best = torch.load(ckpt_dir(tmp_path / "run") / "best.pt", weights_only=True)
    assert best["step"] == 15 and best["best_valid"] == {"step": 15, "eer": 0.0, "min_dcf": 0.0}
    assert result.best_step == 15 and "saturated" in result.validation_note


# ---- a run on two roots --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of two roots (alpha, beta: 8 synthetic speakers x 5 utterances each)."""
    base = tmp_path_factory.mktemp("two_roots")
    for name, seed in (("alpha", 1), ("beta", 2)):
        write_corpus(base / name, 8, 5, seed=seed, duration_s=(1.0, 1.5))
    build_shards([str(base / "alpha"), str(base / "beta")], base / "shards", BuildConfig(min_shards=4, block_size=5),
                 workers=1)
    return base / "shards"


def test_valid_shards_take_their_roots_from_the_index(two_roots: Path) -> None:
    source = resolve_shards(str(two_roots))
    data = collect_validation(source.urls, source.index, None, 3, 40)  # as --valid reads a set
    assert data.speakers_per_root() == {"alpha": 8, "beta": 8}
    ids = {s["index"]: s["id"] for s in source.index["speakers"]}
    assert all(ids[int(k)].startswith(f"{r}/") for k, r in zip(data.speakers, data.roots))


def test_training_on_two_roots_validates_within_each(two_roots: Path, tmp_path: Path) -> None:
    cfg = replace(BASE, steps=10, valid_every=5, valid_fraction=0.5, valid_utterances=5)
    result, logs, said = run(two_roots, tmp_path / "run", cfg)
    assert "validating on 8 held-out speakers of 2 roots (trials within a root)" in said
    state = load_checkpoint(tmp_path / "run")
    source = resolve_shards(str(two_roots))
    data = collect_validation(source.urls, source.index, state["heldout_speakers"], 5, 40)
    counts = data.speakers_per_root()
    assert sorted(counts) == ["alpha", "beta"] and all(n >= 2 for n in counts.values())
    model = DVector(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    final = validation_scores(model, data, torch.device("cpu"))
    logged = [e for e in logs if e.valid_eer is not None][-1]
    assert logged.step == 10 and logged.valid_eer == pytest.approx(final.eer)
    assert logged.valid_min_dcf == pytest.approx(final.min_dcf)
    embeddings = model.eval()(data.mels).detach().numpy()
    assert eer(*all_pairs_scores(embeddings, data.speakers, data.roots))[0] == pytest.approx(final.eer)
    assert state["valid"] == pytest.approx({"eer": final.eer, "min_dcf": final.min_dcf})
    assert result.best_eer is not None and result.best_min_dcf is not None
