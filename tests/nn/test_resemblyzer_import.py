"""The "resemblyzer" preset's network (a Linear + ReLU head on the last frame) and the strict mapping of
Resemblyzer's state dict onto it (dvector.nn.resemblyzer), on synthetic weights: no Resemblyzer needed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dvector.config import ModelConfig
from dvector.errors import DvectorError
from dvector.nn import resemblyzer as rz
from dvector.nn.model import DVector, count_parameters

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def fake_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict laid out as Resemblyzer's pretrained.pt ``model_state``, random values."""
    torch.manual_seed(seed)
    lstm = torch.nn.LSTM(40, 256, 3, batch_first=True)
    linear = torch.nn.Linear(256, 256)
    state = {"similarity_weight": torch.tensor([10.0]), "similarity_bias": torch.tensor([-5.0])}
    state.update({f"lstm.{k}": v for k, v in lstm.state_dict().items()})
    state.update({f"linear.{k}": v for k, v in linear.state_dict().items()})
    return state


def reference_forward(state: dict[str, torch.Tensor], mels: torch.Tensor) -> torch.Tensor:
    """Resemblyzer's VoiceEncoder.forward, written out: last hidden state of the top layer, Linear, ReLU, L2."""
    lstm = torch.nn.LSTM(40, 256, 3, batch_first=True)
    lstm.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("lstm.")})
    _, (hidden, _) = lstm(mels)
    raw = torch.relu(hidden[-1] @ state["linear.weight"].T + state["linear.bias"])
    return raw / torch.norm(raw, dim=1, keepdim=True)


def test_head_defaults_keep_old_records() -> None:
    assert "head" not in ModelConfig().to_dict() and "head" not in ModelConfig.preset("paper").to_dict()
    assert ModelConfig().hash() == "e788eb68a74d22ec" and ModelConfig.preset("paper").hash() == "6f81cb2b32419216"
    old = ModelConfig.preset("paper").to_dict()
    assert ModelConfig.from_dict(old) == ModelConfig.preset("paper")
    cfg = ModelConfig.preset("resemblyzer")
    assert cfg.to_dict()["head"] == "linear-relu" and ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs", [dict(head="relu"), dict(head="linear-relu", pooling="attention"),
                                    dict(head="linear-relu", arch="ecapa", channels=64)])
def test_bad_heads_are_refused(kwargs: dict) -> None:
    with pytest.raises(DvectorError, match="head"):
        ModelConfig(**kwargs)


def test_old_presets_build_as_before() -> None:
    paper = DVector(ModelConfig.preset("paper"))
    assert isinstance(paper.embedding, torch.nn.Identity) and not paper.relu_head
    assert count_parameters(DVector(ModelConfig.preset("attentive"))) == 1423873


def test_mapped_weights_compute_voice_encoder_forward() -> None:
    state = fake_state()
    loaded = rz.load_resemblyzer(state)
    assert (loaded.similarity_weight, loaded.similarity_bias, loaded.step) == (10.0, -5.0, None)
    assert count_parameters(loaded.model) == sum(v.numel() for k, v in state.items() if not k.startswith("sim"))
    mels = torch.rand(3, 160, 40)
    with torch.no_grad():
        ours, ref = loaded.model(mels), reference_forward(state, mels)
        scripted = torch.jit.script(loaded.model)(mels)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scripted, ref, atol=1e-6, rtol=1e-5)
    assert bool((ours >= 0).all())  # after the ReLU


def test_reads_a_checkpoint_file(tmp_path) -> None:
    path = tmp_path / "pretrained.pt"
    torch.save({"step": 12, "model_state": fake_state(1), "optimizer_state": {}}, path)
    loaded = rz.load_resemblyzer(path)
    assert loaded.step == 12 and loaded.source == str(path) and loaded.config == ModelConfig.preset("resemblyzer")
    assert not loaded.model.training


def test_every_problem_is_named_in_one_error() -> None:
    state = fake_state()
    del state["lstm.bias_hh_l2"]
    state["linear.weight"] = torch.zeros(128, 256)
    state["linear.scale"] = torch.ones(1)
    state["similarity_bias"] = 3.0
    with pytest.raises(DvectorError) as info:
        rz.load_resemblyzer(state)
    message = str(info.value)
    for part in ("missing lstm.bias_hh_l2", "linear.weight has shape (128, 256), expected (256, 256)",
                 "unexpected linear.scale", "similarity_bias is a float"):
        assert part in message
    assert len(message.splitlines()) == 1


def test_unreadable_inputs(tmp_path) -> None:
    with pytest.raises(DvectorError, match="no such file"):
        rz.load_resemblyzer(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DvectorError, match="cannot read"):
        rz.load_resemblyzer(bad)
    with pytest.raises(DvectorError, match="dict of tensors"):
        rz.load_resemblyzer({"model_state": [1, 2]})


def test_missing_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DvectorError, match=r"pip install 'dvector\[resemblyzer\]'"):
        rz.resemblyzer_weights_path()
    with pytest.raises(DvectorError, match=r"pip install 'dvector\[resemblyzer\]'"):
        rz.load_resemblyzer()


def test_installed_package_file_is_found_without_importing_it() -> None:
    import sys

    if importlib.util.find_spec("resemblyzer") is None:
        pytest.skip("resemblyzer is not installed (the extra dvector[resemblyzer])")
    imported_before = "resemblyzer" in sys.modules
    path = rz.resemblyzer_weights_path()
    assert path.name == "pretrained.pt" and path.is_file()
    assert imported_before or "resemblyzer" not in sys.modules
