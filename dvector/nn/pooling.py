"""What the encoders share: per-utterance mean normalisation, masks of valid frames, and attentive
statistics pooling over time.

- ``subtract_mean``: each row's per-band log-mel mean over its valid frames, subtracted (the
  ``input_norm == "mean"`` step of every encoder: a gain on the waveform never reaches the network).
- ``valid_frames``: the ``(B, 1, T)`` mask of frames before each row's length; ``downsample_lengths``:
  lengths after a stride-``s`` convolution with kernel 3 and padding 1 (``ceil(length / s)``).
- ``AttentiveStatsPool``: attentive statistics pooling (Okabe et al. 2018): a small network scores
  every channel of every frame, a softmax over time turns the scores into weights, and the weighted
  mean and standard deviation per channel are concatenated, ``(B, C, T) -> (B, 2C)``. With
  ``global_context`` (ECAPA-TDNN, Desplanques et al. 2020) the scorer also sees the utterance's plain
  mean and standard deviation beside each frame. With ``lengths`` padded frames get weight exactly 0
  (their scores are set to -inf before the softmax), and the global context is taken over valid frames.

Statistics are computed in float32 (also under bf16 autocast): a variance in bf16 loses most of its bits.
Everything here is TorchScript-friendly.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

STD_EPS = 1e-5  # floor of a variance before its square root (a constant channel has std sqrt(1e-5), not 0)


def subtract_mean(mels: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """``mels (B, T, n_mels)`` less each row's per-band mean over time; with ``lengths``, the mean of the
    valid frames only (padded frames are left as they are)."""
    if lengths is None:
        return mels - mels.mean(dim=1, keepdim=True)  # (B, T, n_mels)
    B, T = mels.size(0), mels.size(1)
    counts = lengths.to(mels.device).view(B, 1, 1)  # (B, 1, 1)
    valid = torch.arange(T, device=mels.device).view(1, T, 1) < counts  # (B, T, 1)
    zeros = torch.zeros_like(mels)
    mean = torch.where(valid, mels, zeros).sum(dim=1, keepdim=True) / counts.to(mels.dtype)  # (B, 1, n_mels)
    return torch.where(valid, mels - mean, mels)  # (B, T, n_mels)


def zero_padding(mels: Tensor, lengths: Tensor) -> Tensor:
    """``mels (B, T, n_mels)`` with every frame past its row's length set to 0 (after mean normalisation,
    each row's mean): what a convolution reads past a row's end no longer depends on the padding."""
    valid = valid_frames(lengths.to(mels.device), mels.size(1)).transpose(1, 2)  # (B, T, 1)
    return mels.masked_fill(~valid, 0.0)  # (B, T, n_mels)


def check_input(mels: Tensor, lengths: Optional[Tensor], n_mels: int) -> None:
    """Assertions (TorchScript keeps them) on ``mels (B, T, n_mels)`` and ``lengths (B,)`` in ``[1, T]``."""
    assert mels.dim() == 3 and mels.size(2) == n_mels, (
        f"the encoder expects mels of shape (B, T, {n_mels}), got {list(mels.shape)}"
    )
    B, T = mels.size(0), mels.size(1)
    if lengths is not None:
        assert lengths.shape == (B,), f"lengths must have shape ({B},), got {list(lengths.shape)}"
        assert bool(((lengths >= 1) & (lengths <= T)).all()), f"lengths must lie in [1, {T}]"


def valid_frames(lengths: Tensor, T: int) -> Tensor:
    """``(B, 1, T)`` bool: True where frame ``t < lengths[b]``."""
    time = torch.arange(T, device=lengths.device).view(1, 1, T)  # (1, 1, T)
    return time < lengths.view(-1, 1, 1)  # (B, 1, T)


def downsample_lengths(lengths: Tensor, stride: int) -> Tensor:
    """Valid frames after a kernel-3, padding-1, stride-``stride`` convolution: ``ceil(lengths / stride)``."""
    return torch.div(lengths + (stride - 1), stride, rounding_mode="floor")


def weighted_stats(x: Tensor, weights: Tensor, eps: float = STD_EPS) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation ``(B, C)`` of ``x (B, C, T)`` under ``weights`` summing to 1
    over time (``(B, C, T)`` or ``(B, 1, T)``); zero-weight frames contribute exactly nothing. ``eps``
    floors the variance."""
    mean = (x * weights).sum(dim=2)  # (B, C)
    var = (weights * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2)  # (B, C)
    return mean, var.clamp(min=eps).sqrt()


class AttentiveStatsPool(nn.Module):
    """``forward(x (B, C, T)[, lengths (B,)]) -> (B, 2C)``: attention-weighted mean and std per channel.

    Scorer: ``Conv1d(C or 3C -> bottleneck, 1)`` + ReLU + BN + tanh + ``Conv1d(bottleneck -> C, 1)``
    (SpeechBrain's layout); parameters ``(C_in + 1) * b + 2b + (b + 1) * C`` with ``C_in = 3C`` under
    ``global_context``, else ``C``.
    """

    def __init__(self, channels: int, bottleneck: int = 128, global_context: bool = False) -> None:
        super().__init__()
        self.global_context: bool = global_context
        self.std_eps: float = STD_EPS
        scorer_in = 3 * channels if global_context else channels
        self.scorer = nn.Sequential(
            nn.Conv1d(scorer_in, bottleneck, kernel_size=1),
            nn.ReLU(),
            nn.BatchNorm1d(bottleneck),
            nn.Tanh(),
            nn.Conv1d(bottleneck, channels, kernel_size=1),
        )

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        x = x.float()  # (B, C, T): statistics in float32, also under autocast
        B, T = x.size(0), x.size(2)
        mask: Optional[Tensor] = None
        if lengths is not None:
            mask = valid_frames(lengths.to(x.device), T)  # (B, 1, T)
        scorer_in = x
        if self.global_context:
            if mask is None:
                uniform = torch.full((B, 1, T), 1.0 / T, dtype=x.dtype, device=x.device)  # (B, 1, T)
            else:
                counts = mask.sum(dim=2, keepdim=True).to(x.dtype)  # (B, 1, 1)
                uniform = mask.to(x.dtype) / counts  # (B, 1, T)
            mean, std = weighted_stats(x, uniform, self.std_eps)  # (B, C) each
            context = torch.cat([mean, std], dim=1).unsqueeze(2).expand(-1, -1, T)  # (B, 2C, T)
            scorer_in = torch.cat([x, context], dim=1)  # (B, 3C, T)
        scores = self.scorer(scorer_in).float()  # (B, C, T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=2)  # (B, C, T), zero past each row's length
        mean, std = weighted_stats(x, weights, self.std_eps)  # (B, C) each
        return torch.cat([mean, std], dim=1)  # (B, 2C)
