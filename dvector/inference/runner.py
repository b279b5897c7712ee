"""Running windows of log-mels through a network: what the ``Embedder`` and a live ``WindowStream``
share, apart from where the audio comes from.

``ShapeBuckets`` pads batches to a few shapes (so oneDNN builds few LSTM kernels); ``WindowRunner``
holds a network with its feature settings, window length ``L`` and torch thread count, runs windows
through it (``window_vectors``) and scopes the thread setting (``torch_threads``). The ``Embedder``
is a ``WindowRunner``; streaming needs only this part of it, so its import points here, one way.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dvector.config import FeatureConfig
from dvector.signal.windows import WINDOW_BATCH


class ShapeBuckets(torch.nn.Module):
    """Runs a d-vector network on batches padded to a few shapes: the batch to a power of two (at
    most ``WINDOW_BATCH``), a window shorter than ``L`` frames to ``L`` with its true length given
    (LSTMs only: the convolutional encoders get short windows as they are, as the export does).

    oneDNN builds an LSTM kernel for every new input shape (about a second on a busy CPU), so
    embedding many files with their own window counts and lengths would spend most of its time
    building kernels. Padding changes nothing: rows are independent, the LSTM runs forward in time,
    and padded frames get no attention weight ("last" pooling reads the last true frame).
    """

    def __init__(self, model: torch.nn.Module, L: int) -> None:
        super().__init__()
        self.model = model
        self.L = int(L)
        # only the LSTM ignores padding exactly; a convolution near a row's end would read the zeros
        self.pad_time = getattr(model, "original_name", type(model).__name__) == "DVector"

    def forward(self, mels: Tensor, lengths: Tensor | None = None) -> Tensor:
        B, T = mels.size(0), mels.size(1)
        if lengths is None and T < self.L and self.pad_time:
            lengths = torch.full((B,), T, dtype=torch.long)
            mels = F.pad(mels, (0, 0, 0, self.L - T))  # (B, L, n_mels)
        bucket = 1 << (B - 1).bit_length() if B <= WINDOW_BATCH else B
        if bucket > B:
            mels = torch.cat([mels, mels[-1:].expand(bucket - B, -1, -1)])  # (bucket, T', n_mels)
            if lengths is not None:
                lengths = torch.cat([lengths, lengths[-1:].expand(bucket - B)])
        device = next(iter(self.model.parameters()), mels).device
        return self.model(mels.to(device), lengths)[:B].float().cpu()  # (B, D)


class WindowRunner:
    """A network ``mels (B, T, n_mels) -> (B, D)`` with its features, window length ``L`` and threads."""

    def __init__(self, model: torch.nn.Module, features: FeatureConfig, seg_len: int, dim: int,
                 threads: int | None = None) -> None:
        self.model = model.eval()  # DVector: mels (B, T, n_mels) -> (B, D); a scripted one for exports
        self.features = features
        self.seg_len = int(seg_len)  # L: frames per window
        self.dim = int(dim)  # D
        self.runner = ShapeBuckets(self.model, self.seg_len)
        self.threads = threads  # torch CPU threads while embedding (None: leave torch's setting)

    @property
    def sample_rate(self) -> int:
        return self.features.sample_rate

    def window_vectors(self, mel: Tensor, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
        """Unit embeddings ``(len(ranges), D)`` of the frames ``[s, e)`` of ``mel (T, n_mels)`` for each
        range, one network call per ``WINDOW_BATCH`` windows of one length (diarization's windows)."""
        out = np.zeros((len(ranges), self.dim), dtype=np.float32)
        by_length: dict[int, list[int]] = {}
        for i, (s, e) in enumerate(ranges):
            by_length.setdefault(e - s, []).append(i)
        with self.torch_threads(), torch.inference_mode():
            for length, rows in by_length.items():
                for j in range(0, len(rows), WINDOW_BATCH):
                    part = rows[j:j + WINDOW_BATCH]
                    stack = torch.stack([mel[ranges[i][0]:ranges[i][0] + length] for i in part])  # (b, length, n_mels)
                    out[part] = self.runner(stack).numpy()  # (b, D)
        return out

    @contextmanager
    def torch_threads(self) -> Iterator[None]:
        """Run with ``self.threads`` torch threads, restoring the caller's setting afterwards.

        One thread is often much faster for these small batches on a busy CPU: OpenMP threads that
        wait for a descheduled partner can make a small LSTM call tens of times slower.
        """
        if not self.threads or self.threads == torch.get_num_threads():
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)
