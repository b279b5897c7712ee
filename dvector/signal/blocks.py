"""The front end of a long file in blocks, in bounded memory: the pieces :mod:`dvector.signal.process`
puts together for a file longer than ``LONG_FILE_S``.

:func:`feature_blocks` reads a file once more: decoded a block at a time, downmixed, resampled as a
stream (soxr's stream gives exactly the samples of its one-shot resampling), cut into blocks of a
fixed length. :class:`MelStream` takes the (VAD-trimmed) samples as they come and writes the
log-mel frames that :func:`dvector.signal.features.log_mel` gives for the whole signal (centred,
padded at both ends as it pads), given the signal's length beforehand. No I/O besides the decoding.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

import numpy as np
import soxr

from dvector.config import FeatureConfig
from dvector.signal.audio import DecodeError, decode_blocks, to_mono
from dvector.signal.features import MEL_CHUNK_FRAMES, mel_of_frames, n_frames


def exact_blocks(chunks: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The concatenation of ``chunks`` (1-D) in blocks of exactly ``size`` samples; the last may be shorter."""
    parts: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        parts.append(chunk)
        held += chunk.shape[0]
        if held < size:
            continue
        whole = np.concatenate(parts) if len(parts) > 1 else parts[0]
        cut = held - held % size
        for start in range(0, cut, size):
            yield whole[start:start + size]
        parts, held = [whole[cut:]], held - cut
    if held:
        yield np.concatenate(parts)


def feature_blocks(path, rate: int, features: FeatureConfig, speed: float,  # noqa: ANN001 - a Path
                   seconds: dict[str, float], counts: list[int]) -> Iterator[np.ndarray]:
    """Mono float32 audio of ``path`` (recorded at ``rate``) at the feature rate, as it is decoded: the
    samples :func:`~dvector.signal.audio.decode`, ``to_mono`` and ``resample`` give for the whole file
    (``speed`` as :func:`~dvector.signal.process.process_file` applies it). DecodeError for what cannot
    be decoded and for NaN or infinite samples. ``seconds`` collects the "decode" and "resample" time;
    ``counts[0]`` becomes the number of input frames read."""
    clock = time.perf_counter
    target = features.sample_rate
    in_rate = rate if speed == 1.0 else rate * speed
    stream = None if in_rate == target else soxr.ResampleStream(in_rate, target, 1, dtype="float32", quality="HQ")
    counts[0] = 0
    t0 = clock()
    with np.errstate(over="ignore", invalid="ignore"):
        for raw in decode_blocks(path):
            if not np.all(np.isfinite(raw)):
                raise DecodeError("audio holds NaN or infinite samples")
            counts[0] += raw.shape[0]
            mono = to_mono(raw)
            t1 = clock()
            seconds["decode"] = seconds.get("decode", 0.0) + t1 - t0
            out = stream.resample_chunk(mono, last=False) if stream is not None else mono
            t0 = clock()
            seconds["resample"] = seconds.get("resample", 0.0) + t0 - t1
            if out.shape[0]:
                yield out
        if stream is not None:
            out = stream.resample_chunk(np.zeros(0, np.float32), last=True)
            seconds["resample"] = seconds.get("resample", 0.0) + clock() - t0
            if out.shape[0]:
                yield out


class MelStream:
    """The log-mel frames of a signal of ``length`` samples that arrives in pieces (:meth:`push`, then
    :meth:`finish`), as :func:`~dvector.signal.features.log_mel` gives them for the whole signal, stored
    float16 in :attr:`out` ``(frames, n_mels)``. Holds the output and less than a frame of samples
    besides the piece being read. ``length`` must be at least ``min_samples``."""

    def __init__(self, length: int, cfg: FeatureConfig):
        self.cfg, self.length, self.pad = cfg, length, cfg.fft_size // 2
        assert length >= self.pad + 1, "shorter than a frame: log_mel refuses it"
        self.out = np.empty((n_frames(length, cfg), cfg.n_mels), dtype=np.float16)
        self.done = 0  # frames written
        self.base = 0  # the padded signal's index of buf[0] (a multiple of the hop)
        self.buf = np.zeros(0, np.float32)  # padded samples not consumed yet
        self.head: list[np.ndarray] | None = []  # the first samples, until the left padding can be made
        self.tail = np.zeros(0, np.float32)  # the last pad + 1 samples seen: the right padding's source
        self.seen = 0

    def push(self, piece: np.ndarray) -> None:
        """The next samples of the signal (float32, 1-D)."""
        piece = np.asarray(piece, dtype=np.float32)
        self.seen += piece.shape[0]
        assert self.seen <= self.length, "more samples than the length given"
        keep = self.pad + 1
        self.tail = np.concatenate([self.tail, piece[-keep:]])[-keep:]
        if self.head is not None:
            self.head.append(piece)
            first = np.concatenate(self.head)
            if first.shape[0] < keep:
                self.head = [first]
                return
            self.head = None
            left = np.pad(first[:keep], (self.pad, 0), mode=self.cfg.pad_mode)[:self.pad]
            piece = np.concatenate([left, first])
        self.buf = np.concatenate([self.buf, piece]) if self.buf.shape[0] else piece
        self._frames(len(self.out))

    def finish(self) -> np.ndarray:
        """The right padding, the last frames; returns :attr:`out`."""
        assert self.seen == self.length and self.head is None, f"{self.seen} samples came of {self.length}"
        right = np.pad(self.tail, (0, self.pad), mode=self.cfg.pad_mode)[-self.pad:] if self.pad else self.tail[:0]
        self.buf = np.concatenate([self.buf, right])
        self._frames(len(self.out))
        assert self.done == len(self.out), f"{self.done} frames of {len(self.out)}"
        return self.out

    def _frames(self, limit: int) -> None:
        """Write every frame whose samples are all in the buffer, then drop the samples no later frame needs."""
        hop, n_fft = self.cfg.hop_length, self.cfg.fft_size
        end = self.base + self.buf.shape[0]
        ready = min(limit, (end - n_fft) // hop + 1 if end >= n_fft else 0)
        while self.done < ready:
            count = min(MEL_CHUNK_FRAMES, ready - self.done)
            first = self.done - self.base // hop  # the frame's index in the buffer
            mel_of_frames(self.buf, first, count, self.cfg, self.out[self.done:self.done + count])
            self.done += count
        drop = self.done * hop - self.base
        if drop > 0:
            self.buf = self.buf[drop:].copy()
            self.base += drop
