"""Windows over an utterance's log-mels, shared by the eager embedding and the exported module.

Two layouts (``WindowConfig.layout``). ``"overlap"`` (dvector's): an utterance of at most L frames
(the training segment length) is one window, as it is; a longer one is cut into L-frame windows
with hop L // 2, plus one window ending exactly at its last frame when the regular ones miss it
(``window_starts``, ``window_batch``, ``embed_windows``). ``"partials"`` (Resemblyzer's
``embed_utterance``): ``partial_windows`` gives, from the waveform's length alone, the length to
zero-pad it to before its features and the windows' first frames; ``embed_windows_at`` embeds
those windows. Each window's embedding is unit length; they are averaged and normalised again.
Everything here is TorchScript-compatible, so both paths run the same code.
"""

import warnings
from typing import List, Optional, Tuple

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


def partial_windows(n_samples: int, hop_length: int, frames: int, step: int, min_coverage: float) -> Tuple[int, List[int]]:
    """Resemblyzer's ``VoiceEncoder.compute_partial_slices`` for a waveform of ``n_samples`` samples:
    ``(padded, starts)``. Zero-pad the waveform to ``padded`` samples (``>= n_samples``) before its
    features; the windows are frames ``[s, s + frames)`` for each ``s`` in ``starts``.

    Windows start every ``step`` frames (``WindowConfig.step_frames``: 77 at 1.3 per second) over the
    ``n_samples // hop_length + 1`` frames of the audio, as many as start at most ``step`` frames past the
    last whole one; the last is dropped when under ``min_coverage`` of its samples are audio, unless it
    is the only one (a clip under ``frames`` hops is one padded window).
    """
    assert hop_length >= 1 and 1 <= step <= frames and 0.0 < min_coverage <= 1.0, "bad partial window options"
    n_frames = n_samples // hop_length + 1  # = ceil((n_samples + 1) / hop_length), Resemblyzer's count
    starts: List[int] = []
    for start in range(0, max(1, n_frames - frames + step + 1), step):
        starts.append(start)
    coverage = float(n_samples - starts[-1] * hop_length) / float(frames * hop_length)
    if coverage < min_coverage and len(starts) > 1:
        starts = starts[:-1]
    return max(n_samples, (starts[-1] + frames) * hop_length), starts


def window_batch_at(mel: Tensor, starts: List[int], L: int) -> Tensor:
    """The windows ``mel[s : s + L]`` of ``mel (T, n_mels)`` as one batch ``(B, L, n_mels)``; each must fit."""
    assert mel.dim() == 2, "mel must have shape (T, n_mels)"
    assert len(starts) >= 1 and min(starts) >= 0 and max(starts) + L <= mel.size(0), "a window runs past the mel"
    first = torch.tensor(starts, dtype=torch.long, device=mel.device)  # (B,)
    rows = first.view(-1, 1) + torch.arange(L, dtype=torch.long, device=mel.device).view(1, -1)  # (B, L)
    return mel[rows]  # (B, L, n_mels)


def pool_embeddings(embeds: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Average unit-length window embeddings ``(B, D)`` and normalise again: ``(D,)``."""
    return F.normalize(embeds.mean(dim=0), p=2.0, dim=0, eps=eps)


def window_embeddings(model: MelEncoder, mel: Tensor, L: int, batch_size: int = WINDOW_BATCH) -> Tensor:
    """Unit-length embeddings ``(B, D)`` of the windows of ``mel (T, n_mels)`` (see ``window_starts``)."""
    return batch_embeddings(model, window_batch(mel, L), batch_size)


def window_embeddings_at(model: MelEncoder, mel: Tensor, starts: List[int], L: int,
                         batch_size: int = WINDOW_BATCH) -> Tensor:
    """Unit-length embeddings ``(B, D)`` of the windows ``mel[s : s + L]`` (``partial_windows``' starts)."""
    return batch_embeddings(model, window_batch_at(mel, starts, L), batch_size)


def embed_windows_at(model: MelEncoder, mel: Tensor, starts: List[int], L: int, batch_size: int = WINDOW_BATCH) -> Tensor:
    """The utterance embedding ``(D,)``: the windows ``mel[s : s + L]`` through ``model``, averaged,
    normalised (Resemblyzer's ``embed_utterance`` with ``partial_windows``' starts). Gradients are off."""
    return pool_embeddings(window_embeddings_at(model, mel, starts, L, batch_size))


def batch_embeddings(model: MelEncoder, windows: Tensor, batch_size: int = WINDOW_BATCH) -> Tensor:
    """``model`` over ``windows (B, L, n_mels)``, ``batch_size`` at a time, gradients off: ``(B, D)``."""
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
