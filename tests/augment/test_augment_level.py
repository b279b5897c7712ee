"""Channel colouring and gain are fixed per-band offsets: every preset's input normalisation (the
log-mel mean over time subtracted) removes them, which is why the default leaves them out; a
network without it (input_norm "none", runs made before it existed) does see them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dvector.augment import Augmenter, RowInfo
from dvector.config import DEFAULT_AUGMENT, AugmentConfig, FeatureConfig, ModelConfig
from dvector.nn.model import DVector


def embed(model: DVector, mels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(mels)).numpy()


@pytest.mark.parametrize("kind", ["channel", "gain"])
def test_fixed_offsets_change_no_embedding_of_a_mean_normalised_network(kind: str) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    mels = rng.normal(-4.0, 2.0, (12, 50, 40)).astype(np.float32)
    info = RowInfo([f"k{i}" for i in range(12)], [0] * 12, [0] * 12, np.arange(12))
    out = mels.copy()
    Augmenter(AugmentConfig(kinds=(kind,), **{f"{kind}_prob": 1.0}), FeatureConfig(), 1)(out, info)
    assert np.abs(out - mels).max() > 0.3  # the inputs did change
    preset = ModelConfig.preset("tiny")
    assert preset.input_norm == "mean"
    model = DVector(preset).eval()
    cos = (embed(model, mels) * embed(model, out)).sum(1)
    assert np.all(1 - cos < 1e-5)
    plain = DVector(replace(preset, input_norm="none")).eval()
    assert np.any(1 - (embed(plain, mels) * embed(plain, out)).sum(1) > 1e-3)


def test_the_default_kinds_leave_out_what_the_presets_cannot_see() -> None:
    assert "channel" not in DEFAULT_AUGMENT and "gain" not in DEFAULT_AUGMENT
    assert AugmentConfig().kinds == DEFAULT_AUGMENT
