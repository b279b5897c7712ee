"""Streaming window embeddings: audio chunks of any size in, ``(start_s, end_s, vector)`` out as each
window completes. ``dvector.load(path).stream()`` returns a ``WindowStream``.

The windows are exactly those of the offline ``Embedder.per_window`` (``dvector embed --per-window``):
log-mel frames of the raw audio (no VAD: a live stream cannot see the future, and the offline VAD
looks at the whole file), windows of ``L`` frames at ``0, hop, 2 hop, ...`` (``hop = L // 2``) while
they fit, plus one ending at the last frame; audio under ``L`` frames is one window over all of it.

When is a window complete? Frames are centred (frame ``t`` reads samples ``t * hop_length - n_fft/2``
to ``t * hop_length + n_fft/2``, reflect-padded at the ends), so window ``[s, s + L)`` is final once
the samples up to ``(s + L - 1) * hop_length + n_fft / 2`` (and up to ``(s + L) * hop_length``, its end
time) have arrived: it is emitted then, with the same start and end as offline. The window ending at
the last frame, the last frames' reflect padding, and the single window of a short stream are only
known at the end: ``flush()`` emits them. So a stream emits the offline windows in order, each as
soon as no later sample can change it.

Each window's log-mels come from ``log_mel`` over a slice that starts at least ``n_fft / 2`` samples
before the window (on a frame boundary), so every frame inside the window is computed from the same
samples as offline; the network sees one window per call. The vectors therefore do not depend on
the chunk sizes at all (bit for bit), and equal the offline ones up to float rounding (the offline
path batches windows and computes all frames in one FFT call): cosine >= 0.99999 in the tests.

Features that raise a quiet recording's level (``FeatureConfig.raise_to_dbfs``, an imported
Resemblyzer encoder's) take it offline from the whole file; a stream takes it from everything up to
each window's last sample, which no chunking changes. The windows ``flush()`` emits see the whole
stream, as offline; earlier ones may differ from offline by that gain.

Audio at another rate than the model's is resampled on the fly (``soxr.ResampleStream``); its
output is close to, not bit-equal to, the offline whole-file resampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, List

import numpy as np
import torch

from dvector.errors import DvectorError
from dvector.signal.audio import MAX_RATE, MIN_RATE
from dvector.signal.features import level_gain, log_mel, min_samples
from dvector.inference.runner import WindowRunner
from dvector.signal.windows import window_embeddings, window_starts


PCM_BLOCK = 3200  # bytes read from a PCM pipe at a time: 0.1 s of 16-bit audio at 16 kHz


def check_stream_rate(sample_rate: int) -> None:
    """A DvectorError unless ``sample_rate`` is within the rates a file header may give
    (``signal.audio.MIN_RATE``-``MAX_RATE``): 1 Hz would make 3 s of input 13 hours."""
    if not MIN_RATE <= int(sample_rate) <= MAX_RATE:
        raise DvectorError(f"sample rate {sample_rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")


@dataclass(frozen=True)
class Window:
    start_s: float  # seconds from the start of the stream
    end_s: float
    vector: np.ndarray  # (D,) float32, unit length

    def __iter__(self):  # noqa: ANN204 - ``for start, end, vector in stream.push(chunk)``
        return iter((self.start_s, self.end_s, self.vector))


class WindowStream:
    """Window embeddings of a live stream: ``push(chunk) -> [Window]``, ``flush() -> [Window]`` at the end.

    ``chunk``: mono float samples (numpy or torch, any length, also 0) at ``sample_rate`` (default: the
    model's). ``windows(chunks)`` runs a whole iterable of chunks and yields as windows complete.
    """

    def __init__(self, embedder: WindowRunner, sample_rate: int | None = None) -> None:
        self.embedder = embedder
        features = embedder.features
        self.rate = features.sample_rate
        self.hop_length = features.hop_length
        self.L = embedder.seg_len
        self.step = max(1, self.L // 2)  # frames between window starts
        half = features.fft_size // 2
        self.right = features.fft_size - half  # samples a frame reads after its centre (exclusive end)
        self.context = -(-half // self.hop_length)  # frames of left context so no frame sees the slice start
        self.hop_s = self.hop_length / self.rate
        self.buffer = np.zeros(0, np.float32)
        self.offset = 0  # the absolute index of buffer[0]
        self.total = 0  # samples received (at the model's rate)
        self.energy = 0.0  # their sum of squares: the level so far, for FeatureConfig.raise_to_dbfs
        self.next_start = 0  # the first frame of the next regular window
        self.emitted_upto = -1  # the last start emitted
        self.closed = False
        self.resampler = None
        if sample_rate is not None:
            check_stream_rate(sample_rate)
        if sample_rate is not None and int(sample_rate) != self.rate:
            import soxr

            self.resampler = soxr.ResampleStream(int(sample_rate), self.rate, 1, dtype="float32", quality="HQ")

    # -- audio in ------------------------------------------------------------------------------------

    def push(self, chunk: np.ndarray | torch.Tensor) -> List[Window]:
        """Add samples; returns the windows they completed (possibly none)."""
        if self.closed:
            raise DvectorError("this stream was flushed; start another with embedder.stream()")
        samples = self._samples(chunk)
        if self.resampler is not None:
            samples = self.resampler.resample_chunk(samples, last=False).astype(np.float32, copy=False)
        return self._add(samples)

    def flush(self) -> List[Window]:
        """End of the stream: the windows that needed its end (see the module docstring)."""
        if self.closed:
            return []
        out: List[Window] = []
        if self.resampler is not None:
            out.extend(self._add(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)))
        self.closed = True
        need = min_samples(self.embedder.features)
        if self.total < need:
            raise DvectorError(f"the stream is too short: {self.total} samples at {self.rate} Hz, less than one "
                               f"analysis window ({need} samples)")
        T = 1 + self.total // self.hop_length
        for start in window_starts(T, self.L):
            if start > self.emitted_upto:
                out.append(self._window(start, min(T, self.L), self.total))
        return out

    def windows(self, chunks: Iterable[np.ndarray | torch.Tensor]) -> Iterator[Window]:
        """Push every chunk, yielding windows as they complete, then flush."""
        for chunk in chunks:
            yield from self.push(chunk)
        yield from self.flush()

    # -- internals -----------------------------------------------------------------------------------

    def _samples(self, chunk: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.detach().cpu().numpy()
        data = np.asarray(chunk, dtype=np.float32).reshape(-1) if np.ndim(chunk) <= 1 else None
        if data is None:
            raise DvectorError(f"a stream takes mono chunks (samples,), got shape {np.shape(chunk)}")
        if not np.all(np.isfinite(data)):
            raise DvectorError("the stream holds NaN or infinite samples")
        return data

    def _add(self, samples: np.ndarray) -> List[Window]:
        self.buffer = np.concatenate([self.buffer, samples]) if samples.size else self.buffer
        self.total += samples.shape[0]
        self.energy += float(np.dot(samples.astype(np.float64), samples.astype(np.float64)))
        out: List[Window] = []
        while True:
            s = self.next_start
            last_centre = (s + self.L - 1) * self.hop_length
            if self.total < max(last_centre + self.right, (s + self.L) * self.hop_length):
                break
            out.append(self._window(s, self.L, last_centre + self.right))
            self.next_start += self.step
        # keep what a later window may read: the next regular one, or at flush the one ending at the end
        keep_from = max(0, self.next_start - self.step - self.context) * self.hop_length
        if keep_from > self.offset:
            self.buffer = self.buffer[keep_from - self.offset:]
            self.offset = keep_from
        return out

    def _window(self, start: int, frames: int, stop: int) -> Window:
        """The window of ``frames`` frames from frame ``start``, its log-mels from samples ``[a, stop)``."""
        first = max(0, start - self.context)  # the slice starts on this frame's centre
        a = first * self.hop_length
        audio = self.buffer[a - self.offset:stop - self.offset]
        if self.embedder.features.raise_to_dbfs:  # the level of the stream up to this window's last sample
            after = self.buffer[stop - self.offset:].astype(np.float64)
            gain = level_gain((self.energy - float(np.dot(after, after))) / max(1, stop),
                              self.embedder.features.raise_to_dbfs)
            audio = audio * np.float32(gain) if gain > 1.0 else audio
        mel = log_mel(audio, self.embedder.features)  # (frames', n_mels)
        rows = torch.from_numpy(np.ascontiguousarray(mel[start - first:start - first + frames]))  # (frames, n_mels)
        with self.embedder.torch_threads(), torch.inference_mode():
            vector = window_embeddings(self.embedder.runner, rows, self.L).numpy()[0]  # (D,)
        duration = self.total / self.rate
        starts = np.asarray([start], dtype=np.float64)
        self.emitted_upto = start
        return Window(float(starts[0] * self.hop_s), float(np.minimum((starts + frames) * self.hop_s, duration)[0]),
                      vector)


def pcm_windows(stream: WindowStream, source: BinaryIO, block: int = PCM_BLOCK) -> Iterator[Window]:
    """Window embeddings of raw 16-bit little-endian mono PCM read from ``source`` (e.g. stdin) until EOF.

    Reads what is available (``read1``), so windows come out while a live source is still writing.
    """
    read = getattr(source, "read1", source.read)
    left = b""
    while True:
        data = read(block)
        if not data:
            break
        data = left + data
        whole = len(data) // 2 * 2
        left = data[whole:]
        if whole:
            pcm = np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / 32768.0
            yield from stream.push(pcm)
    if left:
        raise DvectorError("the PCM stream ended in the middle of a sample (an odd number of bytes)")
    yield from stream.flush()
