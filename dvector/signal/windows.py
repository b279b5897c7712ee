"""Windows over an utterance's log-mels, shared by the eager embedding and the exported module.

An utterance of at most L frames (the training segment length) is one window, as it is; a longer
one is cut into L-frame windows with hop L // 2, plus one window ending exactly at its last frame
when the regular ones miss it. Each window's embedding is unit length; they are averaged and
normalised again. Everything here is TorchScript-compatible, so both paths run the same code.
"""

import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvector.config import NORM_EPS

WINDOW_BATCH = 256  # windows per network call (bounds memory on very long audio)

with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; it is still what loads without dvector
    warnings.simplefilter("ignore", DeprecationWarning)

    @torch.jit.interface
    class MelEncoder(nn.Module):
        """What ``embed_windows`` needs of a network: ``forward(mels (B, T, n_mels)) -> (B, D)`` unit rows."""

        def forward(self, mels: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
            pass


def window_starts(T: int, L: int) -> List[int]:
    """First frames of the windows of ``L`` frames over ``T`` frames, hop ``L // 2``.

    ``T <= L``: one window, ``[0]`` (the whole utterance, as it is). Otherwise ``0, hop, 2 hop, ...``
    while a window fits, plus ``T - L`` when the last regular window ends before ``T``.
    """
    assert L >= 1, "window length L must be >= 1 frame"
    if T <= L:
        return [0]
    hop = max(1, L // 2)
    starts: List[int] = []
    start = 0
    while start + L <= T:
        starts.append(start)
        start += hop
    if starts[-1] + L < T:
        starts.append(T - L)
    return starts


def window_batch(mel: Tensor, L: int) -> Tensor:
    """The windows of ``mel (T, n_mels)`` as one batch ``(B, min(T, L), n_mels)``."""
    assert mel.dim() == 2, "mel must have shape (T, n_mels)"
    T = mel.size(0)
    if T <= L:
        return mel.unsqueeze(0)  # (1, T, n_mels)
    starts = torch.tensor(window_starts(T, L), dtype=torch.long, device=mel.device)  # (B,)
    rows = starts.view(-1, 1) + torch.arange(L, dtype=torch.long, device=mel.device).view(1, -1)  # (B, L)
    return mel[rows]  # (B, L, n_mels)


def pool_embeddings(embeds: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Average unit-length window embeddings ``(B, D)`` and normalise again: ``(D,)``."""
    return F.normalize(embeds.mean(dim=0), p=2.0, dim=0, eps=eps)


def window_embeddings(model: MelEncoder, mel: Tensor, L: int, batch_size: int = WINDOW_BATCH) -> Tensor:
    """Unit-length embeddings ``(B, D)`` of the windows of ``mel (T, n_mels)`` (see ``window_starts``)."""
    windows = window_batch(mel, L)  # (B, L', n_mels)
    parts: List[Tensor] = []
    with torch.no_grad():
        for i in range(0, windows.size(0), batch_size):
            parts.append(model.forward(windows[i:i + batch_size], None))  # (b, D)
    return torch.cat(parts, dim=0)  # (B, D)


def embed_windows(model: MelEncoder, mel: Tensor, L: int, batch_size: int = WINDOW_BATCH) -> Tensor:
    """The utterance embedding ``(D,)`` of ``mel (T, n_mels)``: windows, network, average, normalise.

    ``model`` is a ``DVector`` (eager or scripted) in eval mode; ``L`` is the training segment
    length (``seg_len`` hi). Gradients are off inside.
    """
    return pool_embeddings(window_embeddings(model, mel, L, batch_size))
