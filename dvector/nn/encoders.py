"""Encoders by architecture: one place that turns a :class:`ModelConfig` into its network.

Every encoder maps log-mels ``(B, T, n_mels)`` (with optional ``lengths (B,)`` of valid frames) to
unit-length embeddings ``(B, embed_dim)``, subtracts each row's log-mel mean first when
``input_norm == "mean"``, scripts with TorchScript, and has ``n_mels`` and ``embed_dim`` attributes.
"""

from __future__ import annotations

from torch import nn

from dvector.config import ModelConfig
from dvector.errors import DvectorError
from dvector.nn.model import DVector

ENCODER_NAMES = ("DVector", "ECAPA", "ThinResNet")  # the classes, as a scripted module's original_name says


def build_encoder(config: ModelConfig) -> nn.Module:
    """The network ``config`` describes: the LSTM d-vector, ECAPA-TDNN or the thin ResNet-34."""
    if config.arch == "lstm":
        return DVector(config)
    if config.arch == "ecapa":
        from dvector.nn.ecapa import ECAPA
        return ECAPA(config)
    if config.arch == "resnet":
        from dvector.nn.resnet import ThinResNet
        return ThinResNet(config)
    raise DvectorError(f"unknown encoder architecture {config.arch!r}")
