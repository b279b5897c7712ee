"""The d-vector network: an LSTM over log-mel frames, pooled to one unit-length embedding.

Two poolings, chosen by ``ModelConfig.pooling``:

- ``"last"`` (the GE2E paper): the LSTM output of the last frame, then a ``Linear`` to
  ``embed_dim`` only when the LSTM output size differs from it. The "paper" preset (768 cells,
  ``proj_size=256``, ``embed_dim=256``) has no extra layer: its embedding is the last projected
  LSTM output. With ``ModelConfig.head="linear-relu"`` (the "resemblyzer" preset: Resemblyzer's
  ``VoiceEncoder``) it is always ``relu(Linear(last))``.
- ``"attention"`` (the original project's default): ``tanh(Linear(H, embed_dim))`` per frame,
  then a softmax over time of ``Linear(embed_dim, 1)`` scores weights the frames, summed.
  The "attentive" preset has the original's parameter count (1,423,873).

Input normalisation, chosen by ``ModelConfig.input_norm``: with ``"mean"`` (every preset) each row's
log-mel mean over time (over its valid frames when ``lengths`` is given) is subtracted per mel band
before the LSTM, as Kaldi's and WeSpeaker's per-utterance mean normalisation. A gain ``g`` on the
waveform adds ``20 log10 g`` dB to every log-mel bin, so the recording level (and a fixed channel
colouring) never reaches the encoder. It lives in ``forward`` so that training, validation, ``embed``,
per-window embeddings and the TorchScript export all apply it with the same code. ``"none"``: the
raw log-mels (checkpoints saved before the setting existed load with it, unchanged).

The output is L2-normalised with an eps, so even an all-zero embedding stays finite.
``forward`` is TorchScript-friendly (the export step scripts it): every branch is typed and
optional modules are refined with ``is not None``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvector.config import NORM_EPS, ModelConfig
from dvector.nn.pooling import subtract_mean


class DVector(nn.Module):
    """Speaker encoder: ``forward(mels (B, T, n_mels)[, lengths (B,)]) -> (B, embed_dim)``, unit length.

    ``lengths`` (optional) gives the number of valid frames of each row of a zero-padded batch;
    frames past it are ignored (the LSTM is unidirectional, so padding never reaches earlier
    frames; attention gives padded frames zero weight; "last" takes frame ``lengths - 1``).
    """

    # The dataclass is for Python users (checkpoints, export metadata), not for TorchScript.
    __jit_ignored_attributes__ = ["config"]

    def __init__(self, config: Optional[ModelConfig] = None) -> None:
        super().__init__()
        config = config if config is not None else ModelConfig.preset("attentive")
        self.config = config
        self.n_mels: int = config.n_mels
        self.embed_dim: int = config.embed_dim
        self.mean_norm: bool = config.input_norm == "mean"
        self.lstm = nn.LSTM(
            input_size=config.n_mels,
            hidden_size=config.hidden_size,
            num_layers=config.n_layers,
            batch_first=True,
            proj_size=config.proj_size,
        )
        lstm_out = config.proj_size if config.proj_size > 0 else config.hidden_size
        self.norm_eps: float = NORM_EPS
        self.relu_head: bool = config.head == "linear-relu"
        self.score = None
        if config.pooling == "attention":
            self.embedding = nn.Linear(lstm_out, config.embed_dim)
            self.score = nn.Linear(config.embed_dim, 1)
        elif lstm_out != config.embed_dim or self.relu_head:
            self.embedding = nn.Linear(lstm_out, config.embed_dim)
        else:
            self.embedding = nn.Identity()

    def forward(self, mels: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        assert mels.dim() == 3 and mels.size(2) == self.n_mels, (
            f"DVector expects mels of shape (B, T, {self.n_mels}), got {list(mels.shape)}"
        )
        B, T = mels.size(0), mels.size(1)
        if lengths is not None:
            assert lengths.shape == (B,), f"lengths must have shape ({B},), got {list(lengths.shape)}"
            assert bool(((lengths >= 1) & (lengths <= T)).all()), f"lengths must lie in [1, {T}]"
        if self.mean_norm:
            mels = self.subtract_mean(mels, lengths)
        frames, _ = self.lstm(mels)  # (B, T, H)
        score = self.score
        if score is not None:
            frames = torch.tanh(self.embedding(frames))  # (B, T, D)
            scores = score(frames)  # (B, T, 1)
            if lengths is not None:
                time = torch.arange(T, device=mels.device).view(1, T, 1)  # (1, T, 1)
                padded = time >= lengths.to(mels.device).view(B, 1, 1)  # (B, T, 1)
                scores = scores.masked_fill(padded, float("-inf"))
            weights = torch.softmax(scores, dim=1)  # (B, T, 1)
            embeds = (frames * weights).sum(dim=1)  # (B, D)
        else:
            if lengths is None:
                last = frames[:, -1]  # (B, H)
            else:
                rows = torch.arange(B, device=mels.device)  # (B,)
                last = frames[rows, lengths.to(mels.device) - 1]  # (B, H)
            embeds = self.embedding(last)  # (B, D)
            if self.relu_head:
                embeds = F.relu(embeds)
        return F.normalize(embeds, p=2.0, dim=-1, eps=self.norm_eps)  # (B, D)

    def subtract_mean(self, mels: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """``mels`` less each row's per-band mean over time; with ``lengths``, the mean of the valid
        frames only (padded frames are left as they are: nothing reads them). The encoders' shared
        ``dvector.nn.pooling.subtract_mean``."""
        return subtract_mean(mels, lengths)  # (B, T, n_mels)

    @torch.jit.unused
    def projection_parameters(self) -> List[nn.Parameter]:
        """The parameters the paper's "projection" gradient scale (0.5) applies to.

        The LSTM projection weights (``weight_hr_l*``, present when ``proj_size > 0``: the
        "paper" preset), plus the embedding ``Linear`` (weight and bias) when the model has one
        (attention models, where the original project applied the 0.5 scale).
        """
        params = [p for name, p in self.lstm.named_parameters() if name.startswith("weight_hr_l")]
        if isinstance(self.embedding, nn.Linear):
            params.extend(self.embedding.parameters())
        return params


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (scalars) in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

