"""Synthetic two-speaker conversations for the diarization tests, and a stand-in network that
separates their voices without training (so a test checks the recipe, not a model)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dvector.demo.synth import Voice, speech
from dvector.diarization.rttm import Turn

RATE = 16000
VOICES = (Voice(90.0, 1.2, 4.0, 0.4, 0.02, (0.6, 0.1, 0.1, 0.1, 0.1)),
          Voice(250.0, 0.85, 5.5, 0.2, 0.12, (0.1, 0.6, 0.1, 0.1, 0.1)))


class MeanSpectrum(torch.nn.Module):
    """A stand-in network whose embedding is a window's mean log-mel shape: on these synthetic voices
    (different pitch and formants) it separates the speakers, so the test checks the recipe, not training."""

    n_mels, embed_dim = 40, 40

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = mels.mean(dim=1)  # (B, n_mels)
        return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)


def conversation(seed: int) -> tuple[np.ndarray, list[Turn]]:
    """Six alternating turns of 3-4 s with 0.5 s pauses, and their reference."""
    rng = np.random.default_rng(seed)
    parts, ref, t = [], [], 0.0
    for i, seconds in enumerate([3.5, 3.0, 4.0, 3.0, 3.5, 3.0]):
        parts.append(np.zeros(RATE // 2, np.float32))
        t += 0.5
        wav = speech(VOICES[i % 2], seconds, RATE, rng)
        parts.append(wav)
        ref.append(Turn(t, t + wav.size / RATE, f"s{i % 2}"))
        t += wav.size / RATE
    wav = np.concatenate(parts + [np.zeros(RATE // 2, np.float32)])
    return wav + (1e-4 * rng.standard_normal(wav.size)).astype(np.float32), ref
