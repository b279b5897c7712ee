"""The ONNX graph's front end: level, VAD, log-mel and Resemblyzer's partial windows as closed-form tensor
operations without data-dependent Python control flow, so that one traced graph serves every input length
(``dvector.export.onnx_graph`` puts them together with the encoder and exports them).

1. Level (``GraphLevel``): ``dvector.signal.features.raise_level``, the waveform's whole-file RMS (float64)
   raised to ``FeatureConfig.raise_to_dbfs`` when quieter, as a ``Where`` on the gain; the same float32 product.
2. VAD (``GraphVad``): the project's adaptive-floor energy VAD. Frame energies (float64 squares, each frame's
   mean subtracted first with ``VadConfig.remove_dc``, rounded to float32 as the numba kernel stores them),
   the 10th/95th percentiles (a sort), the noise-floor threshold rule and the "undecided" rule are the same.
   The floor recurrence ``floor[i] = min(e[i], floor[i-1] + rise)`` becomes its unrolled form
   ``floor[i] = i * rise + min(initial + rise, min_{j<=i}(e[j] - j * rise))`` in float64, the running minimum
   taken by doubling over the last ``2^K`` frames, where ``K`` makes ``2^K * rise`` exceed the 140 dB between
   the energy floor (-100 dB) and +40 dBFS (frame energies are capped there for the floor only): exact, not an
   approximation, for any audio under +40 dBFS. The numba kernel accumulates the same sum in float32 step by
   step, so a frame whose energy lies within rounding distance of its threshold can fall the other way.
   Short-burst removal is a morphological opening (erosion then dilation by ``min_speech`` frames, which
   removes exactly the runs shorter than it), pre-roll/hang-over a dilation, and pause shortening a windowed
   "any speech in the last ``max_pause`` frames" test: all equal to the kernels. Where the VAD keeps less than
   one analysis window the whole input is kept.
3. log-mel (``GraphLogMel``): reflect or constant (zero) padding, the windowed DFT as a strided ``Conv`` with
   cosine and sine kernels (ONNX has no complex tensors), power, the configured mel filterbank
   (``dvector.signal.features.mel_filterbank``: HTK or Slaney) as a ``MatMul``, and the log with the same
   floor unless ``compression="none"``: the numpy front-end's values up to float32 summation order.
4. Partial windows (``partial_layout``): ``dvector.signal.windows.partial_windows`` as scalar tensor
   arithmetic on the speech's length (the last start, whether the last window is dropped for coverage, the
   length to zero-pad to), the starts one ``Range``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvector.config import FeatureConfig, VadConfig, WindowConfig
from dvector.signal.features import analysis_window, mel_filterbank
from dvector.signal.vad import FLOOR_PERCENTILE, LOUD_PERCENTILE, _frames

ENERGY_FLOOR_DB = -100.0  # 10 log10(1e-10): the quietest frame energy the VAD computes
ENERGY_CAP_DB = 40.0  # frame energies above this are capped when tracking the noise floor
MAX_DOUBLINGS = 32  # a floor that never rises needs the minimum over the whole file: 2^32 frames


class GraphLevel(nn.Module):
    """``dvector.signal.features.raise_level`` as graph ops: ``forward(wav (n,) float32) -> (n,)``, raised to
    ``cfg.raise_to_dbfs`` when its RMS (float64, whole input) is lower; as it is for silence or non-finite audio."""

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        self.target = 10.0 ** (float(cfg.raise_to_dbfs) / 20.0)

    def forward(self, wav: Tensor) -> Tensor:
        rms = torch.sqrt(torch.mean(wav.to(torch.float64).square()))  # 0-d float64
        gain = self.target / rms  # inf for silence, 0 for infinite audio, NaN for NaN
        gain = torch.where((rms > 0.0) & (gain > 1.0), gain, torch.ones_like(gain))
        return wav * gain.to(torch.float32)  # float32 times float32(gain), as numpy does


def partial_layout(n: Tensor, hop: int, windows: WindowConfig, step: int) -> tuple[Tensor, Tensor]:
    """``partial_windows(n, hop, frames, step, min_coverage)`` for a 0-d int64 ``n``: ``(padded, starts)``,
    the 0-d length to zero-pad to and the ``(B,)`` window starts, by scalar tensor operations."""
    frames = windows.frames
    n_frames = torch.div(n, hop, rounding_mode="floor") + 1
    limit = torch.clamp(n_frames - frames + step + 1, min=1)  # candidates: range(0, limit, step)
    last = torch.div(limit - 1, step, rounding_mode="floor") * step
    coverage = (n - last * hop).to(torch.float64) / float(frames * hop)
    drop = (coverage < windows.min_coverage) & (last > 0)  # the last window, mostly padding, unless the only one
    last = last - drop.to(torch.int64) * step
    padded = torch.maximum(n, (last + frames) * hop)
    return padded, torch.arange(0, last + 1, step)


class GraphLogMel(nn.Module):
    """``dvector.signal.features.log_mel`` as ONNX-friendly ops: ``(n,) -> (1 + n // hop, n_mels)``."""

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        n_fft = cfg.fft_size
        self.hop = cfg.hop_length
        self.half = n_fft // 2
        self.log_floor = float(cfg.log_floor)
        self.pad_mode = cfg.pad_mode  # "reflect" or "constant" (zeros)
        self.compress = cfg.compression == "log"
        k = np.arange(n_fft // 2 + 1)[:, None] * np.arange(n_fft)[None, :]  # (F, n_fft)
        angle = 2.0 * np.pi * (k % n_fft) / n_fft
        window = analysis_window(cfg).astype(np.float64)
        kernels = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window])  # (2F, n_fft)
        self.register_buffer("dft", torch.from_numpy(kernels.astype(np.float32)).unsqueeze(1))  # (2F, 1, n_fft)
        self.register_buffer("filterbank", torch.from_numpy(mel_filterbank(cfg).copy()))  # (F, n_mels)

    def forward(self, wav: Tensor) -> Tensor:
        padded = F.pad(wav.view(1, 1, -1), (self.half, self.half), mode=self.pad_mode)  # (1, 1, n + 2 half)
        spec = F.conv1d(padded, self.dft, stride=self.hop)[0]  # (2F, frames)
        re, im = spec.chunk(2, dim=0)  # (F, frames) each
        power = re * re + im * im
        mel = torch.matmul(power.transpose(0, 1), self.filterbank)  # (frames, n_mels)
        if not self.compress:
            return mel  # the mel power itself (compression "none")
        return torch.log(torch.clamp(mel, min=self.log_floor))


def window_any(mask: Tensor, before: int, after: int) -> Tensor:
    """``out[f] = any(mask[f - before : f + after + 1])`` (clipped to the ends), by prefix sums: ``(n,)`` bool."""
    counts = F.pad(torch.cumsum(mask.to(torch.int64), dim=0), (1, 0))  # (n + 1,): counts[k] = sum(mask[:k])
    n = counts.size(0) - 1
    frame = torch.arange(n)
    last = counts.new_full((1,), 0) + n
    hi = torch.minimum(frame + after + 1, last)
    lo = torch.clamp(frame - before, min=0)
    return (counts[hi] - counts[lo]) > 0


class GraphVad(nn.Module):
    """The adaptive-floor VAD as a static graph: ``forward(wav (n,)) -> (n,)`` bool, the samples to keep.

    See the module docstring for how each step maps to ``dvector.signal.vad``.
    """

    def __init__(self, cfg: VadConfig, sample_rate: int) -> None:
        super().__init__()
        self.frame_len = max(1, int(round(sample_rate * cfg.frame_ms / 1000)))
        self.remove_dc = bool(cfg.remove_dc)
        self.threshold_db = float(cfg.threshold_db)
        self.min_threshold_db = float(cfg.min_threshold_db)
        self.min_level_db = float(cfg.min_level_db)
        self.rise = float(cfg.floor_rise_db_per_s * cfg.frame_ms / 1000.0)
        self.min_speech = max(1, _frames(cfg.min_speech_ms, cfg.frame_ms))
        self.preroll = _frames(cfg.preroll_ms, cfg.frame_ms)
        self.hangover = _frames(cfg.hangover_ms, cfg.frame_ms)
        self.max_pause = _frames(cfg.max_pause_ms, cfg.frame_ms)
        span = (ENERGY_CAP_DB - ENERGY_FLOOR_DB) / self.rise if self.rise > 0 else float(2 ** MAX_DOUBLINGS)
        self.doublings = min(MAX_DOUBLINGS, max(1, math.ceil(math.log2(span + 1))))

    def energy_db(self, wav: Tensor) -> Tensor:
        """``(frames,)`` dB of each ``frame_len`` frame (the last, partial frame counts too), as the numba kernel:
        float64 squares (of each frame less its mean with ``remove_dc``) and sums, rounded to float32; as float64."""
        n = wav.size(0)
        fl = self.frame_len
        count = (n + fl - 1) // fl
        frames = torch.cat([wav, wav.new_zeros(fl)])[: count * fl].to(torch.float64).reshape(-1, fl)  # (frames, fl)
        sizes = torch.clamp(n - torch.arange(count) * fl, max=fl).to(torch.float64)  # (frames,)
        if self.remove_dc:
            mean = frames.sum(dim=1, keepdim=True) / sizes.unsqueeze(1)  # (frames, 1): the padding adds zeros
            valid = torch.arange(count * fl).reshape(-1, fl) < n  # (frames, fl)
            frames = torch.where(valid, frames - mean, torch.zeros_like(frames))
        energy = 10.0 * torch.log10((frames * frames).sum(dim=1) / sizes + 1e-10)
        return energy.to(torch.float32).to(torch.float64)

    @staticmethod
    def percentile(ordered: Tensor, q: float) -> Tensor:
        """``np.percentile(x, q)`` (linear) of the sorted ``ordered (n,)``: 0-d."""
        n = ordered.size(0)
        virtual = (torch.zeros(1, dtype=torch.float64) + (n - 1)) * (q / 100.0)  # (1,)
        below = torch.floor(virtual).to(torch.int64)
        above = torch.minimum(below + 1, below * 0 + (n - 1))
        gamma = virtual - below.to(torch.float64)
        a, b = ordered[below], ordered[above]
        return torch.where(gamma >= 0.5, b - (b - a) * (1.0 - gamma), a + (b - a) * gamma)[0]

    def running_floor(self, energy: Tensor, initial: Tensor) -> Tensor:
        """``floor[i] = min(e[i], floor[i-1] + rise)`` with ``floor[-1] = initial``, unrolled: ``(frames,)``."""
        n = energy.size(0)
        frame = torch.arange(n).to(torch.float64)
        g = torch.clamp(energy, max=ENERGY_CAP_DB) - frame * self.rise  # (frames,)
        for k in range(self.doublings):  # g[i] <- min(g[i - 2^k + 1 .. i]), then over 2^(k+1) frames
            shift = 2 ** k
            g = torch.minimum(g, F.pad(g, (shift, 0), value=float("inf"))[:n])
        return frame * self.rise + torch.minimum(g, initial + self.rise)

    def frame_mask(self, wav: Tensor) -> Tensor:
        """``(frames,)`` bool: ``dvector.signal.vad.speech_frames`` as tensor operations."""
        energy = self.energy_db(wav)  # (frames,) float64
        ordered, _ = torch.sort(energy)
        initial = self.percentile(ordered, FLOOR_PERCENTILE)
        loud = self.percentile(ordered, LOUD_PERCENTILE)
        undecided = (loud - initial < 2 * self.min_threshold_db) & (loud > self.min_level_db)
        threshold = torch.clamp(0.5 * (loud - initial), min=self.min_threshold_db, max=self.threshold_db)
        floor = self.running_floor(energy, initial)
        speech = (energy > floor + threshold) & (energy > self.min_level_db)
        m = self.min_speech
        whole = window_any(~speech, 0, m - 1)  # a non-speech frame in [f, f + m): no full run starts at f
        starts = ~whole & (torch.arange(speech.size(0)) + m <= speech.size(0))
        speech = window_any(starts, m - 1, 0)  # opening: runs of >= m frames survive, shorter ones vanish
        speech = window_any(speech, self.hangover, self.preroll)
        before = window_any(speech, self.max_pause, 0)  # speech in [f - max_pause, f]
        earlier = F.pad(torch.cumsum(speech.to(torch.int64), 0), (1, 0))[:-1] > 0  # speech before f
        later = torch.flip(F.pad(torch.cumsum(torch.flip(speech, [0]).to(torch.int64), 0), (1, 0))[:-1] > 0, [0])
        keep = speech | (before & earlier & later)
        return keep | undecided

    def forward(self, wav: Tensor, min_kept: int) -> Tensor:
        frame_of = torch.div(torch.arange(wav.size(0)), self.frame_len, rounding_mode="floor")  # (n,)
        keep = self.frame_mask(wav)[frame_of]  # (n,)
        return keep | (keep.to(torch.int64).sum() < min_kept)  # too little speech: keep everything
