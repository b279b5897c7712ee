"""Thin ResNet-34 over the log-mel "image", with attentive statistics pooling over time.

The layout of the VoxCeleb trainer's ``ResNetSE34V2`` (clovaai/voxceleb_trainer): a 3x3 stem, then
four stages of squeeze-excitation basic blocks, ``[3, 4, 6, 3]`` blocks of widths ``c, 2c, 4c, 8c``
(``c = channels``: 32 is that trainer's "half" ResNet, 16 a quarter), the first stage at stride 1
and the others starting with a stride-2 block (frequency and time both halve). Shapes for a batch
``(B, T, n_mels)``, with ``F' = ceil(n_mels / 8)`` and ``T' = ceil(T / 8)``:

=============  ====================================================  ==============================
block          what                                                   output
=============  ====================================================  ==============================
input          mean-normalised log-mels, as a 1-channel image         ``(B, 1, n_mels, T)``
``stem``       Conv2d(1 -> c, 3x3) + ReLU + BN                        ``(B, c, n_mels, T)``
stage 1        3 blocks, stride 1                                     ``(B, c, n_mels, T)``
stage 2        4 blocks, the first at stride 2                        ``(B, 2c, n_mels/2, T/2)``
stage 3        6 blocks, the first at stride 2                        ``(B, 4c, n_mels/4, T/4)``
stage 4        3 blocks, the first at stride 2                        ``(B, 8c, F', T')``
flatten        channels x frequency per frame                         ``(B, 8c F', T')``
``pool``       attentive statistics pooling (no global context)       ``(B, 16c F')``
``embedding``  Linear(16c F' -> embed_dim), then L2 normalisation     ``(B, embed_dim)``
=============  ====================================================  ==============================

A block: Conv2d(3x3, stride) + BN + ReLU, Conv2d(3x3) + BN, squeeze-excitation (mean over frequency
and valid frames, Linear(w -> w/8) + ReLU, Linear(w/8 -> w) + sigmoid), plus the input (through a
1x1 Conv2d + BN where the shape changes), ReLU. Convolutions in blocks have no bias (BN follows).

Parameters at 40 mels (``count_parameters``): "resnet34" (c = 32, 256-d) 6,389,068 and
"resnet34-quarter" (c = 16, 256-d) 1,846,566. ``tests/nn/test_encoders.py`` asserts both. At 80
mels F' doubles, and so do the pooling's and the embedding layer's inputs.

``lengths``: frames past each row's length are set to 0 after mean normalisation (garbage padding
gives exactly what zero padding gives); valid frames halve (rounding up) at each stride-2 stage; the
squeeze-excitation means and the pooling use only each row's valid frames. But a 3x3 convolution
near a row's end still reads the (zero) padded frames, and training-mode BN statistics include them:
a padded row's embedding is close to, not equal to, the same row unpadded. ``lengths`` equal to
``T`` gives what no ``lengths`` gives.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from dvector.config import NORM_EPS, ModelConfig
from dvector.nn.pooling import (AttentiveStatsPool, check_input, downsample_lengths, subtract_mean, valid_frames,
                                 zero_padding)

STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_STRIDES = (1, 2, 2, 2)
SE_REDUCTION = 8
ATTENTION_CHANNELS = 128


class SEBasicBlock(nn.Module):
    """``forward(x (B, w_in, F, T), mask (B, 1, 1, T') float or None) -> (B, w, F', T')``."""

    def __init__(self, w_in: int, w: int, stride: int) -> None:
        super().__init__()
        self.stride: int = stride
        self.conv1 = nn.Conv2d(w_in, w, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        squeezed = max(1, w // SE_REDUCTION)
        self.se_down = nn.Linear(w, squeezed)
        self.se_up = nn.Linear(squeezed, w)
        self.shortcut: Optional[nn.Module] = None
        if stride != 1 or w_in != w:
            self.shortcut = nn.Sequential(nn.Conv2d(w_in, w, 1, stride=stride, bias=False), nn.BatchNorm2d(w))

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, w, F', T')
        out = self.bn2(self.conv2(out))  # (B, w, F', T')
        if mask is None:
            squeeze = out.mean(dim=(2, 3))  # (B, w)
        else:
            squeeze = (out * mask).sum(dim=(2, 3)) / (mask.sum(dim=(2, 3)) * out.size(2))  # (B, w)
        gate = self.se_up(F.relu(self.se_down(squeeze))).sigmoid()  # (B, w)
        out = out * gate.unsqueeze(2).unsqueeze(3)  # (B, w, F', T')
        shortcut = self.shortcut
        residual = x if shortcut is None else shortcut(x)  # (B, w, F', T')
        return F.relu(out + residual)


def reduced_bands(n_mels: int) -> int:
    """Frequency bins left after the stride-2 stages (each rounds up): 40 -> 5, 80 -> 10."""
    bands = n_mels
    for stride in STAGE_STRIDES:
        bands = (bands + stride - 1) // stride
    return bands


class ThinResNet(nn.Module):
    """Thin ResNet-34: ``forward(mels (B, T, n_mels)[, lengths (B,)]) -> (B, embed_dim)``, unit length.

    ``config.channels`` is the first stage's width (the others double it). Parameters at 40 mels:
    6,389,068 ("resnet34", 32), 1,846,566 ("resnet34-quarter", 16). With ``lengths`` padded frames
    are zeroed and the pooling ignores frames past each row's (downsampled) length exactly; the
    convolutions near a row's end still read the zeros (see the module docstring).
    """

    __jit_ignored_attributes__ = ["config"]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.n_mels: int = config.n_mels
        self.embed_dim: int = config.embed_dim
        self.mean_norm: bool = config.input_norm == "mean"
        self.norm_eps: float = NORM_EPS
        c = config.channels
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(c))
        blocks = []
        w_in = c
        for i, (n, stride) in enumerate(zip(STAGE_BLOCKS, STAGE_STRIDES)):
            w = c * 2 ** i
            for j in range(n):
                blocks.append(SEBasicBlock(w_in, w, stride if j == 0 else 1))
                w_in = w
        self.blocks = nn.ModuleList(blocks)
        features = w_in * reduced_bands(config.n_mels)
        self.pool = AttentiveStatsPool(features, ATTENTION_CHANNELS, global_context=False)
        self.embedding = nn.Linear(2 * features, config.embed_dim)

    def forward(self, mels: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        check_input(mels, lengths, self.n_mels)
        if self.mean_norm:
            mels = subtract_mean(mels, lengths)
        if lengths is not None:
            lengths = lengths.to(mels.device)
            mels = zero_padding(mels, lengths)  # (B, T, n_mels)
        x = self.stem(mels.transpose(1, 2).unsqueeze(1))  # (B, c, n_mels, T)
        for block in self.blocks:
            mask: Optional[Tensor] = None
            if lengths is not None:
                if block.stride > 1:
                    lengths = downsample_lengths(lengths, block.stride)
                T = (x.size(3) + block.stride - 1) // block.stride
                mask = valid_frames(lengths, T).unsqueeze(1).to(mels.dtype)  # (B, 1, 1, T')
            x = block(x, mask)  # (B, w, F', T')
        B, T = x.size(0), x.size(3)
        frames = x.reshape(B, -1, T)  # (B, 8c F', T')
        embeds = self.embedding(self.pool(frames, lengths))  # (B, D)
        return F.normalize(embeds, p=2.0, dim=-1, eps=self.norm_eps)  # (B, D)
