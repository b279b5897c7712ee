"""Helpers shared by the training tests (tests/training, tests/cli): a session's synthetic shards,
checkpoint folders, and exact comparison of trained weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dvector.config import BuildConfig, FeatureConfig
from dvector.demo.synth import write_corpus
from dvector.shards.build import build_shards

N_SPEAKERS, N_UTTERANCES = 16, 10

_SHARDS: dict[str, Path] = {}


def session_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic shard folder, built once per session (tests/training and tests/cli share it)."""
    if "shards" not in _SHARDS:
        base = tmp_path_factory.mktemp("train_data")
        write_corpus(base / "corpus", N_SPEAKERS, N_UTTERANCES, seed=7, duration_s=(1.5, 3.0))
        build_shards([str(base / "corpus")], base / "shards", BuildConfig(min_shards=4, block_size=5), workers=1)
        _SHARDS["shards"] = base / "shards"
    return _SHARDS["shards"]


def narrow_shards(tmp_path_factory: pytest.TempPathFactory, n_mels: int = 24) -> Path:
    """A small shard folder (6 speakers x 4 utterances) of ``n_mels`` mel bands: another feature size
    than :func:`session_shards` (40), built once per session."""
    key = f"narrow{n_mels}"
    if key not in _SHARDS:
        base = tmp_path_factory.mktemp(key)
        write_corpus(base / "corpus", 6, 4, seed=11, duration_s=(1.0, 1.5))
        cfg = BuildConfig(min_shards=2, block_size=4, features=FeatureConfig(n_mels=n_mels))
        build_shards([str(base / "corpus")], base / "shards", cfg, workers=1)
        _SHARDS[key] = base / "shards"
    return _SHARDS[key]


def ckpt_dir(model_dir: Path) -> Path:
    return model_dir / "checkpoints"


def numbered(model_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in ckpt_dir(model_dir).glob("step-*.pt"))


def trained_params(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"criterion.{k}": v for k, v in state["criterion"].items()}}


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    pa, pb = trained_params(a), trained_params(b)
    assert pa.keys() == pb.keys()
    different = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not different, f"weights differ: {different}"
