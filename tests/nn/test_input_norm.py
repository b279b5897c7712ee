"""The network's input normalisation (``ModelConfig.input_norm``): per-row log-mel mean over time.

"mean" (the presets): a per-band constant added to a row's log-mels (a gain, a fixed channel
colouring) does not change its embedding, and padded rows with ``lengths`` take the mean of their
valid frames only. "none": exactly the forward of networks made before the setting existed, which
is what a checkpoint without the field loads as.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from dvector.config import ModelConfig
from dvector.errors import DvectorError
from dvector.nn.model import DVector

pytestmark = [
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
    pytest.mark.filterwarnings("ignore:`torch.jit.(script|save|load)` is deprecated:DeprecationWarning"),
]

SMALL = {
    "attention": dict(hidden_size=24, proj_size=0, n_layers=2, embed_dim=16, pooling="attention"),
    "last": dict(hidden_size=24, proj_size=8, n_layers=2, embed_dim=16, pooling="last"),
}


def small(pooling: str, input_norm: str, seed: int = 0) -> DVector:
    torch.manual_seed(seed)
    return DVector(ModelConfig(name="small", n_mels=12, input_norm=input_norm, **SMALL[pooling])).eval()


def old_forward(model: DVector, mels: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The network's forward as it was before ``input_norm`` existed (a copy of that code)."""
    B, T = mels.size(0), mels.size(1)
    frames, _ = model.lstm(mels)
    if model.score is not None:
        frames = torch.tanh(model.embedding(frames))
        scores = model.score(frames)
        if lengths is not None:
            padded = torch.arange(T).view(1, T, 1) >= lengths.view(B, 1, 1)
            scores = scores.masked_fill(padded, float("-inf"))
        embeds = (frames * torch.softmax(scores, dim=1)).sum(dim=1)
    else:
        last = frames[:, -1] if lengths is None else frames[torch.arange(B), lengths - 1]
        embeds = model.embedding(last)
    return F.normalize(embeds, p=2.0, dim=-1, eps=1e-12)


def test_presets_and_new_configs_use_mean_and_old_records_load_as_none() -> None:
    for name in ("paper", "attentive", "tiny"):
        cfg = ModelConfig.preset(name)
        assert cfg.input_norm == "mean"
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # a new checkpoint's record round-trips
        old = {k: v for k, v in cfg.to_dict().items() if k != "input_norm"}
        assert ModelConfig.from_dict(old).input_norm == "none"
    assert DVector().config.input_norm == "mean"  # the default network is the "attentive" preset
    # the field's own default is the old behaviour, so that a record without it means what it meant
    assert ModelConfig().input_norm == "none" and ModelConfig.from_dict({}).input_norm == "none"
    with pytest.raises(DvectorError, match="input_norm"):
        ModelConfig(input_norm="cmvn")


@pytest.mark.parametrize("pooling", sorted(SMALL))
def test_none_is_exactly_the_old_forward(pooling: str) -> None:
    model = small(pooling, "none")
    mels = torch.randn(3, 15, 12) * 4 - 7
    lengths = torch.tensor([15, 4, 9])
    with torch.no_grad():
        assert torch.equal(model(mels), old_forward(model, mels))
        assert torch.equal(model(mels, lengths), old_forward(model, mels, lengths))


@pytest.mark.parametrize("pooling", sorted(SMALL))
def test_mean_ignores_a_constant_per_band_and_row(pooling: str) -> None:
    model, raw = small(pooling, "mean"), small(pooling, "none")
    mels = torch.randn(3, 15, 12)
    shift = torch.randn(3, 1, 12) * 5  # a gain and a channel colouring per row
    with torch.no_grad():
        torch.testing.assert_close(model(mels + shift), model(mels), atol=1e-5, rtol=0)
        # the same as a raw network fed mean-subtracted log-mels
        torch.testing.assert_close(model(mels + shift), raw(mels - mels.mean(dim=1, keepdim=True)), atol=1e-5, rtol=0)
        assert not torch.allclose(raw(mels + shift), raw(mels), atol=1e-3)


@pytest.mark.parametrize("pooling", sorted(SMALL))
def test_padded_rows_with_lengths_match_unpadded(pooling: str) -> None:
    model = small(pooling, "mean")
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    rows = [torch.randn(n, 12) + 3 for n in (15, 4, 9, 1)]
    lengths = torch.tensor([r.size(0) for r in rows])
    padded = torch.stack([F.pad(r, (0, 0, 0, 15 - r.size(0)), value=50.0) for r in rows])  # padding is never read
    zeros = torch.stack([F.pad(r, (0, 0, 0, 15 - r.size(0))) for r in rows])
    with torch.no_grad():
        alone = torch.cat([model(r.unsqueeze(0)) for r in rows])
        for net in (model, scripted, loaded):
            torch.testing.assert_close(net(padded, lengths), alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(net(zeros, lengths), alone, atol=1e-5, rtol=0)
