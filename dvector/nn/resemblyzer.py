"""Resemblyzer's pretrained voice encoder as a dvector model: its weights placed on a ``DVector`` built
from the "resemblyzer" preset, strictly (every tensor placed, every shape checked).

Resemblyzer (PyPI ``resemblyzer``, Apache-2.0) ships its GE2E encoder in the wheel as
``resemblyzer/pretrained.pt``: ``{"step", "model_state", "optimizer_state"}``, the model state
holding ``lstm.*`` (3 x 256 LSTM over 40 mels), ``linear.weight``/``linear.bias`` (256 -> 256, then
ReLU, then L2 normalisation: ``VoiceEncoder.forward``) and GE2E's ``similarity_weight`` and
``similarity_bias`` (w and b). The installed file is found without importing the package (importing it
pulls in webrtcvad and librosa). Its front end is ``FeatureConfig.preset("resemblyzer")`` (mel power,
no log, level raised to -30 dBFS) and its windows ``WindowConfig.preset("resemblyzer")``.

Owns: the name mapping and its checks. Imports only ``dvector.config``, ``dvector.errors`` and ``dvector.nn``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from dvector.config import ModelConfig
from dvector.errors import DvectorError
from dvector.nn.model import DVector

PRESET = "resemblyzer"
WEIGHTS_FILE = "pretrained.pt"
INSTALL_HINT = "pip install 'dvector[resemblyzer]'"
SIMILARITY_KEYS = ("similarity_weight", "similarity_bias")  # GE2E's w and b, shape (1,) each


@dataclass
class ResemblyzerModel:
    """Resemblyzer's encoder as a ``DVector`` (eval mode) and what else its file holds."""

    model: DVector
    similarity_weight: float  # GE2E's w
    similarity_bias: float  # GE2E's b
    step: int | None  # the training step the file records (None: a bare state dict)
    source: str  # where the weights came from

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def resemblyzer_weights_path() -> Path:
    """The installed package's ``pretrained.pt``, found with ``importlib`` without importing the package."""
    try:
        spec = importlib.util.find_spec("resemblyzer")
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise DvectorError(f"Resemblyzer is not installed; install it with: {INSTALL_HINT}")
    for folder in folders:
        path = Path(folder) / WEIGHTS_FILE
        if path.is_file():
            return path
    raise DvectorError(f"Resemblyzer is installed but {WEIGHTS_FILE} is missing from {', '.join(folders)}; "
                       f"reinstall it: {INSTALL_HINT}")


def read_resemblyzer_state(source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
                           ) -> tuple[dict[str, Any], int | None, str]:
    """``(state dict, step, where)`` of a Resemblyzer weights file (None: the installed package's), of its
    loaded checkpoint (``{"model_state": ...}``) or of a bare state dict. Files load with ``weights_only``."""
    if source is None or isinstance(source, (str, os.PathLike)):
        path = resemblyzer_weights_path() if source is None else Path(source)
        where = str(path)
        if not path.is_file():
            raise DvectorError(f"{where}: no such file (Resemblyzer's weights)")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises pickle, zip and unpickler errors of many types
            raise DvectorError(f"{where}: cannot read it as Resemblyzer's weights: {str(exc).splitlines()[0]}") from None
    else:
        loaded, where = source, "the given state dict"
    if not isinstance(loaded, Mapping):
        raise DvectorError(f"{where}: expected a dict of tensors, got {type(loaded).__name__}")
    state = loaded.get("model_state", loaded)
    if not isinstance(state, Mapping):
        raise DvectorError(f"{where}: its model_state is not a dict of tensors")
    step = loaded.get("step") if state is not loaded else None
    return dict(state), (int(step) if isinstance(step, int) else None), where


def source_key(name: str) -> str:
    """The Resemblyzer name of a ``DVector`` tensor: ``lstm.*`` as they are, ``embedding.*`` from ``linear.*``."""
    return "linear." + name[len("embedding."):] if name.startswith("embedding.") else name


def resemblyzer_to_dvector(state: Mapping[str, Any], config: ModelConfig | None = None, where: str = "the state dict",
                           ) -> tuple[dict[str, Tensor], float, float]:
    """Resemblyzer's ``model_state`` as a ``DVector`` state dict for ``config`` (default: the "resemblyzer"
    preset), with GE2E's ``(w, b)``. Every tensor must be placed and of the right shape, and nothing may be
    left over; otherwise one ``DvectorError`` lists every problem."""
    config = config or ModelConfig.preset(PRESET)
    target = DVector(config).state_dict()
    wanted = {source_key(name): (name, tuple(t.shape)) for name, t in target.items()}
    wanted.update({key: (key, (1,)) for key in SIMILARITY_KEYS})
    problems = [f"missing {key}" for key in wanted if key not in state]
    problems += [f"unexpected {key}" for key in state if key not in wanted]
    for key, (_, shape) in wanted.items():
        value = state.get(key)
        if key in state and not isinstance(value, Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif isinstance(value, Tensor) and tuple(value.shape) != shape:
            problems.append(f"{key} has shape {tuple(value.shape)}, expected {shape}")
    if problems:
        raise DvectorError(f"{where}: not Resemblyzer's voice encoder ({config.name}: {config.n_layers} x "
                           f"{config.hidden_size} LSTM, {config.embed_dim}-d): {'; '.join(problems)}")
    mapped = {name: state[key].detach().to(torch.float32).clone() for key, (name, _) in wanted.items()
              if key not in SIMILARITY_KEYS}
    w, b = (float(state[key].reshape(())) for key in SIMILARITY_KEYS)
    return mapped, w, b


def load_resemblyzer(source: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> ResemblyzerModel:
    """Resemblyzer's encoder as a ``DVector`` in eval mode: from a weights file, its loaded dict or a bare
    state dict; ``None``: the installed package's ``pretrained.pt`` (``pip install 'dvector[resemblyzer]'``)."""
    state, step, where = read_resemblyzer_state(source)
    mapped, w, b = resemblyzer_to_dvector(state, where=where)
    model = DVector(ModelConfig.preset(PRESET))
    model.load_state_dict(mapped, strict=True)
    return ResemblyzerModel(model.eval(), w, b, step, where)
