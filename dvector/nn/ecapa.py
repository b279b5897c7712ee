"""ECAPA-TDNN (Desplanques, Thienpondt and Demuynck 2020, arXiv 2005.07143), as SpeechBrain and
WeSpeaker build it, over log-mel frames.

Layout for ``C = channels`` and ``n_mels`` mels (shapes for a batch ``(B, T, n_mels)``; time is
never downsampled, every convolution is zero-padded to keep ``T``):

====================  ==================================================  =====================
block                 what                                                 output
====================  ==================================================  =====================
input                 mean-normalised log-mels, transposed                 ``(B, n_mels, T)``
``stem``              Conv1d(n_mels -> C, k5) + ReLU + BN                  ``(B, C, T)``
``blocks[0..2]``      SE-Res2Block, k3, dilation 2 / 3 / 4, scale 8, SE 128 ``(B, C, T)`` each
``aggregate``         concat of the 3 blocks' outputs, Conv1d(3C -> 3C, k1) ``(B, 3C, T)``
                      + ReLU + BN (multi-layer feature aggregation)
``pool``              attentive statistics pooling with global context     ``(B, 6C)``
``pool_bn``           BatchNorm1d(6C)                                      ``(B, 6C)``
``embedding``         Linear(6C -> embed_dim), then L2 normalisation       ``(B, embed_dim)``
====================  ==================================================  =====================

An SE-Res2Block is: Conv1d(C -> C, k1) + ReLU + BN; Res2Net: the C channels split into 8 groups of
C/8, group 0 passed on, group i > 0 through Conv1d(C/8 -> C/8, k3, dilation d) + ReLU + BN after
adding group i-1's output; Conv1d(C -> C, k1) + ReLU + BN; squeeze-excitation (mean over valid
frames, Conv1d(C -> 128) + ReLU, Conv1d(128 -> C) + sigmoid, scales the channels); plus the input.
The paper's 1536 aggregation channels are ``3C`` for its ``C = 512``. The paper's last BN (after the
embedding layer) is left out: the embedding is L2-normalised anyway.

Parameters at 40 mels (``count_parameters``): "ecapa" (C = 512, 192-d) 6,091,648 and "ecapa-small"
(C = 256, 192-d) 1,998,752. ``tests/nn/test_encoders.py`` asserts both.

``lengths``: frames past each row's length are set to 0 after mean normalisation (so their values
never matter: garbage padding gives exactly what zero padding gives), and the squeeze-excitation
means and the pooling (its global context and its weights) use only each row's valid frames. But a
convolution near a row's end still reads the (zero) padded frames, and training-mode BN statistics
include them: a padded row's embedding is close to, not equal to, the same row unpadded.
``lengths`` equal to ``T`` for every row gives what no ``lengths`` gives.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvector.config import NORM_EPS, ModelConfig
from dvector.errors import DvectorError
from dvector.nn.pooling import AttentiveStatsPool, check_input, subtract_mean, valid_frames, zero_padding

RES2_SCALE = 8
SE_CHANNELS = 128
ATTENTION_CHANNELS = 128
DILATIONS = (2, 3, 4)


class TDNN(nn.Module):
    """Conv1d (zero-padded to keep T) + ReLU + BN: ``(B, C_in, T) -> (B, C_out, T)``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(F.relu(self.conv(x)))


class SERes2Block(nn.Module):
    """``forward(x (B, C, T), mask (B, 1, T) float or None) -> (B, C, T)``: see the module docstring."""

    def __init__(self, channels: int, kernel: int, dilation: int, scale: int = RES2_SCALE,
                 se_channels: int = SE_CHANNELS) -> None:
        super().__init__()
        width = channels // scale
        self.width: int = width
        self.reduce = TDNN(channels, channels, 1)
        self.res2 = nn.ModuleList([TDNN(width, width, kernel, dilation) for _ in range(scale - 1)])
        self.expand = TDNN(channels, channels, 1)
        self.se_down = nn.Conv1d(channels, se_channels, 1)
        self.se_up = nn.Conv1d(se_channels, channels, 1)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        out = self.reduce(x)  # (B, C, T)
        groups = torch.split(out, self.width, dim=1)  # scale x (B, C/8, T)
        ys: List[Tensor] = [groups[0]]
        i = 1
        for conv in self.res2:
            inp = groups[i] if i == 1 else groups[i] + ys[i - 1]  # (B, C/8, T)
            ys.append(conv(inp))
            i += 1
        out = self.expand(torch.cat(ys, dim=1))  # (B, C, T)
        if mask is None:
            squeeze = out.mean(dim=2, keepdim=True)  # (B, C, 1)
        else:
            squeeze = (out * mask).sum(dim=2, keepdim=True) / mask.sum(dim=2, keepdim=True)  # (B, C, 1)
        gate = torch.sigmoid(self.se_up(F.relu(self.se_down(squeeze))))  # (B, C, 1)
        return out * gate + x  # (B, C, T)


class ECAPA(nn.Module):
    """ECAPA-TDNN: ``forward(mels (B, T, n_mels)[, lengths (B,)]) -> (B, embed_dim)``, unit length.

    ``config.channels`` is C (a multiple of 8); ``config.embed_dim`` the embedding size. Parameters at
    40 mels: 6,091,648 ("ecapa", C = 512), 1,998,752 ("ecapa-small", C = 256). With ``lengths``
    padded frames are zeroed and the pooling ignores them exactly; the convolutions near a row's end
    still read the zeros (see the module docstring).
    """

    __jit_ignored_attributes__ = ["config"]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C = config.channels
        if C % RES2_SCALE != 0:
            raise DvectorError(f"ECAPA needs channels divisible by {RES2_SCALE}, got {C}")
        self.config = config
        self.n_mels: int = config.n_mels
        self.embed_dim: int = config.embed_dim
        self.mean_norm: bool = config.input_norm == "mean"
        self.norm_eps: float = NORM_EPS
        self.stem = TDNN(config.n_mels, C, 5)
        self.blocks = nn.ModuleList([SERes2Block(C, 3, d) for d in DILATIONS])
        self.aggregate = TDNN(len(DILATIONS) * C, len(DILATIONS) * C, 1)
        self.pool = AttentiveStatsPool(len(DILATIONS) * C, ATTENTION_CHANNELS, global_context=True)
        self.pool_bn = nn.BatchNorm1d(2 * len(DILATIONS) * C)
        self.embedding = nn.Linear(2 * len(DILATIONS) * C, config.embed_dim)

    def forward(self, mels: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        check_input(mels, lengths, self.n_mels)
        if self.mean_norm:
            mels = subtract_mean(mels, lengths)
        mask: Optional[Tensor] = None
        if lengths is not None:
            lengths = lengths.to(mels.device)
            mels = zero_padding(mels, lengths)  # (B, T, n_mels)
            mask = valid_frames(lengths, mels.size(1)).to(mels.dtype)  # (B, 1, T)
        x = self.stem(mels.transpose(1, 2))  # (B, C, T)
        outs: List[Tensor] = []
        for block in self.blocks:
            x = block(x, mask)  # (B, C, T)
            outs.append(x)
        x = self.aggregate(torch.cat(outs, dim=1))  # (B, 3C, T)
        pooled = self.pool_bn(self.pool(x, lengths))  # (B, 6C)
        embeds = self.embedding(pooled)  # (B, D)
        return F.normalize(embeds, p=2.0, dim=-1, eps=self.norm_eps)  # (B, D)
