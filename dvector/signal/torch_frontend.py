"""Level, log-mel and VAD as TorchScript-compatible torch code: twins of ``dvector.signal.features.raise_level``
and ``log_mel`` and of the numba kernels of ``dvector.signal.vad``, for the exported module (numba cannot be
scripted).

The VAD twin repeats the kernels' arithmetic step by step (frame energies from float64 squares, each
frame's mean subtracted first with ``VadConfig.remove_dc``; numpy-style float32 percentiles; the
noise-floor recurrence as a float32 loop), so its keep masks are identical to the numba ones, not
merely close; the log-mel twin uses ``torch.stft`` with the same window, padding and filterbank and
equals the numpy one up to FFT rounding. Tests check both.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvector.config import FeatureConfig, VadConfig
from dvector.signal.features import analysis_window, mel_filterbank, min_samples
from dvector.signal.vad import FLOOR_PERCENTILE, LOUD_PERCENTILE, _frames

class TorchLevel(nn.Module):
    """``dvector.signal.features.raise_level`` in torch: ``forward(wav (n,)) -> (n,)``, raised to
    ``cfg.raise_to_dbfs`` when quieter (the RMS in float64, as the numpy twin); as it is when that is 0 (off)."""

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        self.target_dbfs: float = float(cfg.raise_to_dbfs)

    def forward(self, wav: Tensor) -> Tensor:
        if self.target_dbfs == 0.0 or wav.numel() == 0:
            return wav
        rms = float(torch.sqrt(torch.mean(wav.to(torch.float64).square())))
        if not (rms > 0.0 and rms < float("inf")):
            return wav
        gain = 10.0 ** (self.target_dbfs / 20.0) / rms
        if gain > 1.0:
            return wav * gain
        return wav


class TorchLogMel(nn.Module):
    """``dvector.signal.features.log_mel`` in torch: ``forward(wav (n,)) -> (1 + n // hop, n_mels)`` float32."""

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        self.n_fft: int = cfg.fft_size
        self.hop_length: int = cfg.hop_length
        self.log_floor: float = float(cfg.log_floor)
        self.pad_mode: str = cfg.pad_mode  # "reflect" or "constant"
        self.compress: bool = cfg.compression == "log"
        self.min_samples: int = min_samples(cfg)
        # the very arrays the numpy path uses: periodic Hann padded to n_fft, the mel filters
        self.register_buffer("window", torch.from_numpy(analysis_window(cfg).copy()))  # (n_fft,)
        self.register_buffer("filterbank", torch.from_numpy(mel_filterbank(cfg).copy()))  # (n_fft//2+1, n_mels)

    def forward(self, wav: Tensor) -> Tensor:
        assert wav.dim() == 1, "log-mel takes mono audio (samples,)"
        assert wav.size(0) >= self.min_samples, "audio is shorter than one analysis window"
        spec = torch.stft(wav.to(torch.float32), n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.n_fft,
                          window=self.window, center=True, pad_mode=self.pad_mode, normalized=False, onesided=True,
                          return_complex=True)  # (n_fft//2+1, frames) complex64
        power = spec.real.square() + spec.imag.square()  # (F, frames)
        mel = torch.matmul(power.transpose(0, 1), self.filterbank)  # (frames, n_mels)
        if not self.compress:
            return mel
        return torch.log(torch.clamp(mel, min=self.log_floor))


class TorchVad(nn.Module):
    """``dvector.signal.vad.trim_silence`` in torch, kernel by kernel, with the same arithmetic.

    ``keep_mask(wav) -> (frames,) bool`` equals ``dvector.signal.vad.speech_frames``; ``forward(wav)``
    returns the kept samples (the whole input when the VAD is disabled).
    """

    def __init__(self, cfg: VadConfig, sample_rate: int) -> None:
        super().__init__()
        self.enabled: bool = bool(cfg.enabled)
        self.remove_dc: bool = bool(cfg.remove_dc)
        self.frame_len: int = max(1, int(round(sample_rate * cfg.frame_ms / 1000)))
        self.percentile: float = float(FLOOR_PERCENTILE)
        self.threshold_db: float = float(cfg.threshold_db)
        self.min_threshold_db: float = float(cfg.min_threshold_db)
        self.loud_percentile: float = float(LOUD_PERCENTILE)
        self.min_level_db: float = float(cfg.min_level_db)
        self.rise_db: float = float(cfg.floor_rise_db_per_s * cfg.frame_ms / 1000.0)  # per frame, as in vad.py
        self.min_speech: int = max(1, _frames(cfg.min_speech_ms, cfg.frame_ms))
        self.preroll: int = _frames(cfg.preroll_ms, cfg.frame_ms)
        self.hangover: int = _frames(cfg.hangover_ms, cfg.frame_ms)
        self.max_pause: int = _frames(cfg.max_pause_ms, cfg.frame_ms)

    def frame_energy_db(self, wav: Tensor) -> Tensor:
        """``(frames,)`` float32 dB, as the numba kernel computes it: the samples in float64, less each frame's
        mean with ``remove_dc``, squared and summed in float64."""
        n = wav.size(0)
        fl = self.frame_len
        count = (n + fl - 1) // fl
        sizes = torch.clamp(n - torch.arange(count, device=wav.device) * fl, max=fl).to(torch.float64)  # (frames,)
        frames = F.pad(wav, (0, count * fl - n)).to(torch.float64).view(count, fl)  # (frames, fl), zero-padded
        if self.remove_dc:
            mean = frames.sum(dim=1) / sizes  # (frames,): the padding adds zeros
            valid = torch.arange(count * fl, device=wav.device).view(count, fl) < n  # (frames, fl)
            frames = torch.where(valid, frames - mean.unsqueeze(1), torch.zeros_like(frames))
        return (10.0 * torch.log10((frames * frames).sum(dim=1) / sizes + 1e-10)).to(torch.float32)

    def initial_floor(self, energy: Tensor) -> Tensor:
        """``np.percentile(energy, 10)``: 0-d float32."""
        return self.percentile_of(energy, self.percentile)

    def speech_threshold(self, energy: Tensor, initial: Tensor) -> float:
        """``dvector.signal.vad.speech_threshold_db``: the threshold, lowered on noisy recordings."""
        loud = float(self.percentile_of(energy, self.loud_percentile))
        return min(self.threshold_db, max(self.min_threshold_db, 0.5 * (loud - float(initial))))

    def percentile_of(self, energy: Tensor, q: float) -> Tensor:
        """``np.percentile(energy, q)`` (linear), reproduced operation by operation: 0-d float32."""
        n = energy.size(0)
        ordered, _ = torch.sort(energy)
        virtual = (n - 1) * (q / 100.0)  # float64, as numpy
        below = int(virtual // 1.0)
        above = below + 1
        if virtual >= n - 1:
            below = n - 1
            above = n - 1
        gamma = virtual - float(below) if virtual < n - 1 else virtual + 1.0  # numpy's gamma (unused when equal)
        a = ordered[below]
        b = ordered[above]
        diff = b - a  # float32
        if gamma >= 0.5:
            return b - diff * torch.tensor(1.0 - gamma, dtype=torch.float32, device=energy.device)
        return a + diff * torch.tensor(gamma, dtype=torch.float32, device=energy.device)

    def noise_floor(self, energy: Tensor, initial: Tensor) -> Tensor:
        """``floor[i] = min(e[i], floor[i-1] + rise)``, ``floor[-1] = initial``, in float32 as numba does."""
        out = torch.empty_like(energy)
        rise = torch.tensor(self.rise_db, dtype=torch.float32, device=energy.device)
        floor = initial
        for i in range(energy.size(0)):
            floor = torch.minimum(energy[i], floor + rise)
            out[i] = floor
        return out

    def keep_mask(self, wav: Tensor) -> Tensor:
        """The per-frame keep mask, ``(ceil(n / frame_len),)`` bool."""
        assert wav.dim() == 1, "VAD takes mono audio (samples,)"
        wav = wav.to(torch.float32)
        if wav.size(0) == 0:
            return torch.zeros(0, dtype=torch.bool, device=wav.device)
        energy = self.frame_energy_db(wav)  # (frames,)
        initial = self.initial_floor(energy)
        loud = float(self.percentile_of(energy, self.loud_percentile))
        if loud - float(initial) < 2 * self.min_threshold_db and loud > self.min_level_db:
            return torch.ones(energy.size(0), dtype=torch.bool, device=wav.device)  # vad.undecided
        threshold = self.speech_threshold(energy, initial)
        floor = self.noise_floor(energy, initial)  # (frames,)
        speech = (energy > floor + threshold) & (energy > self.min_level_db)
        speech = remove_short_runs(speech, self.min_speech)
        speech = dilate(speech, self.preroll, self.hangover)
        return keep_pauses(speech, self.max_pause)

    def forward(self, wav: Tensor) -> Tensor:
        if not self.enabled or wav.size(0) == 0:
            return wav
        keep = self.keep_mask(wav)
        samples = keep.repeat_interleave(self.frame_len)[:wav.size(0)]  # (n,)
        return wav.to(torch.float32)[samples]


def remove_short_runs(mask: Tensor, min_len: int) -> Tensor:
    """Clear runs of True shorter than ``min_len`` (``dvector.signal.vad.remove_short_runs``)."""
    n = mask.size(0)
    edges = torch.diff(mask.to(torch.long), prepend=torch.zeros(1, dtype=torch.long, device=mask.device),
                       append=torch.zeros(1, dtype=torch.long, device=mask.device))  # (n + 1,)
    starts = torch.nonzero(edges == 1).flatten()
    stops = torch.nonzero(edges == -1).flatten()
    long_enough = (stops - starts) >= min_len
    delta = torch.zeros(n + 1, dtype=torch.long, device=mask.device)
    delta.index_add_(0, starts[long_enough], torch.ones_like(starts[long_enough]))
    delta.index_add_(0, stops[long_enough], -torch.ones_like(stops[long_enough]))
    return torch.cumsum(delta, dim=0)[:n] > 0


def dilate(mask: Tensor, before: int, after: int) -> Tensor:
    """Extend runs of True ``before`` frames earlier and ``after`` later (``dvector.signal.vad.dilate``)."""
    n = mask.size(0)
    counts = torch.cumsum(mask.to(torch.long), dim=0)
    counts = torch.cat([torch.zeros(1, dtype=torch.long, device=mask.device), counts])  # (n + 1,): counts[k] = sum mask[:k]
    frame = torch.arange(n, device=mask.device)
    lo = torch.clamp(frame - after, min=0)
    hi = torch.clamp(frame + before + 1, max=n)
    return (counts[hi] - counts[lo]) > 0  # any True in mask[f - after : f + before + 1]


def keep_pauses(speech: Tensor, max_pause: int) -> Tensor:
    """Speech frames and the first ``max_pause`` frames of each inner pause (``dvector.signal.vad.keep_mask``)."""
    n = speech.size(0)
    frame = torch.arange(n, device=speech.device)
    marked = torch.nonzero(speech).flatten()
    if marked.numel() == 0:
        return torch.zeros(n, dtype=torch.bool, device=speech.device)
    first = int(marked[0])
    last = int(marked[-1])
    last_speech, _ = torch.cummax(torch.where(speech, frame, torch.full_like(frame, -1)), dim=0)  # (n,)
    in_pause = frame - last_speech - 1  # position within the current pause
    inner = (frame > first) & (frame < last)
    return speech | (inner & (in_pause < max_pause))
