"""The d-vector network: shapes, unit norms, TorchScript, parameter counts, padded batches, learning."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dvector.config import ModelConfig
from dvector.nn.loss import GE2ELoss, apply_paper_gradient_scale
from dvector.nn.model import DVector, count_parameters

PRESETS = ("paper", "attentive", "tiny")

pytestmark = [
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
    pytest.mark.filterwarnings("ignore:`torch.jit.(script|save|load)` is deprecated:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def models() -> dict[str, DVector]:
    torch.manual_seed(0)
    return {name: DVector(ModelConfig.preset(name)).eval() for name in PRESETS}


@pytest.mark.parametrize("name", PRESETS)
def test_shapes_and_unit_norm(models, name: str) -> None:
    model = models[name]
    assert model.config == ModelConfig.preset(name)
    with torch.no_grad():
        embeds = model(torch.randn(3, 17, 40))
    assert embeds.shape == (3, model.config.embed_dim)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("name", PRESETS)
def test_zero_input_stays_finite(models, name: str) -> None:
    mels = torch.zeros(2, 5, 40, requires_grad=True)
    embeds = models[name](mels)
    embeds.sum().backward()
    assert torch.isfinite(embeds).all() and torch.isfinite(mels.grad).all()


@pytest.mark.parametrize("name", PRESETS)
def test_torchscript_matches_eager(models, name: str) -> None:
    model = models[name]
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    mels = torch.randn(2, 13, 40)
    lengths = torch.tensor([13, 6])
    with torch.no_grad():
        for args in [(mels,), (mels, lengths)]:
            expected = model(*args)
            torch.testing.assert_close(scripted(*args), expected)
            torch.testing.assert_close(loaded(*args), expected)


def test_attentive_matches_original_parameter_count(models) -> None:
    # The original project's network, layer for layer: LSTM 40 -> 256 x 3, Linear(256, 256), Linear(256, 1).
    original = nn.ModuleList([nn.LSTM(40, 256, 3, batch_first=True), nn.Linear(256, 256), nn.Linear(256, 1)])
    assert count_parameters(models["attentive"]) == count_parameters(original) == 1_423_873  # "1.42 M"


def test_paper_preset_structure(models) -> None:
    model = models["paper"]
    assert model.lstm.hidden_size == 768 and model.lstm.proj_size == 256 and model.lstm.num_layers == 3
    assert isinstance(model.embedding, nn.Identity)  # LSTM output is already embed_dim: no extra layer
    assert model.score is None
    names = {n for n, p in model.named_parameters() if any(p is q for q in model.projection_parameters())}
    assert names == {"lstm.weight_hr_l0", "lstm.weight_hr_l1", "lstm.weight_hr_l2"}


def test_last_pooling_adds_layer_when_sizes_differ() -> None:
    model = DVector(ModelConfig.preset("paper", hidden_size=32, proj_size=16, embed_dim=8))
    assert isinstance(model.embedding, nn.Linear)
    assert model(torch.randn(2, 4, 40)).shape == (2, 8)


@pytest.mark.parametrize("name", PRESETS)
def test_padded_batch_matches_single_utterances(models, name: str) -> None:
    model = models[name]
    lengths = [9, 4, 15]
    utterances = [torch.randn(n, 40) for n in lengths]
    padded = torch.zeros(len(lengths), max(lengths), 40)
    for row, utt in enumerate(utterances):
        padded[row, : len(utt)] = utt
    with torch.no_grad():
        batch = model(padded, torch.tensor(lengths))
        singles = torch.cat([model(utt.unsqueeze(0)) for utt in utterances])
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-5)


def test_any_length_works(models) -> None:
    model = models["tiny"]
    with torch.no_grad():
        for n_frames in (1, 7, 160):
            assert model(torch.randn(2, n_frames, 40)).shape == (2, 64)


def test_rejects_wrong_mel_count(models) -> None:
    with pytest.raises(AssertionError, match="n_mels|40"):
        models["tiny"](torch.randn(2, 10, 80))


def test_tiny_model_learns_separable_speakers() -> None:
    torch.manual_seed(0)
    N, M, L = 4, 5, 30
    gen = torch.Generator().manual_seed(1)
    voices = torch.randn(N, 1, 1, 40, generator=gen)  # (N, 1, 1, n_mels): one spectrum per speaker
    # Each voice alternates in sign frame by frame: a constant spectrum alone would be removed by the
    # network's per-utterance mean normalisation (input_norm="mean"), as a recording channel is.
    alternate = (1.0 - 2.0 * (torch.arange(L) % 2)).view(1, 1, L, 1)  # (1, 1, L, 1): +1, -1, +1, ...

    def batch() -> torch.Tensor:  # the voices are weak against the noise: an untrained net confuses them
        mels = voices * alternate + torch.randn(N, M, L, 40, generator=gen)  # (N, M, L, n_mels)
        return mels.view(N * M, L, 40)

    model = DVector(ModelConfig.preset("tiny"))
    criterion = GE2ELoss()
    params = list(model.parameters()) + list(criterion.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01)
    fixed = batch()
    with torch.no_grad():
        before = criterion(model(fixed).view(N, M, -1)).item()
    for _ in range(15):
        optimizer.zero_grad()
        loss = criterion(model(batch()).view(N, M, -1))  # (N, M, D) -> scalar
        loss.backward()
        apply_paper_gradient_scale(model, criterion)
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
    with torch.no_grad():
        after = criterion(model(fixed).view(N, M, -1)).item()
    assert before > 5.0 and after < 0.5 * before, (before, after)
