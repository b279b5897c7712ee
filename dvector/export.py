"""Export: a self-contained TorchScript module, waveform in, unit-length utterance d-vector out.

``dvector export RUN -o DIR`` writes ``DIR/dvector.pt`` (TorchScript), ``DIR/dvector.json`` (what it
is and how it was made) and ``DIR/README.txt``. The module needs only torch::

    m = torch.jit.load("DIR/dvector.pt")
    emb = m(wav)  # wav: 1-D float32 tensor at m.sample_rate -> (embed_dim,), unit length

Inside the module, the same chain as the package's embedding, as torch code:

1. VAD trim (``TorchVad``): a torch twin of the numba kernels in ``dvector.vad``, the same
   float32 arithmetic step by step (frame energies, the numpy-style 10th percentile, the noise
   floor recurrence as a loop), so the keep masks are identical, not merely close;
2. log-mel (``TorchLogMel``): ``torch.stft`` with the same periodic Hann window and the same mel
   filterbank matrix (``dvector.features.mel_filterbank``, stored as a buffer) as
   ``dvector.features.log_mel``; equal to it up to FFT rounding (about 1e-5 in the log domain);
3. windows (``window_starts``, ``window_batch``): the training segment length L (``seg_len`` hi),
   hop L // 2; an utterance of at most L frames is one window as it is; otherwise windows start
   at 0, hop, 2 hop, ... while they fit, plus one ending exactly at the last frame when the
   regular ones miss it;
4. each window through the network (unit length), averaged, normalised again (``pool_embeddings``).

One deliberate difference: where the VAD leaves less than one analysis window of audio, the
package's numpy path refuses the utterance (``SkipUtterance``); the TorchScript module embeds the
untrimmed audio instead, so that a deployed model always answers. Audio shorter than one
analysis window (25 ms by default) is refused by both (``ValueError`` from the module).

``window_starts``, ``window_batch``, ``pool_embeddings``, ``window_embeddings`` and
``embed_windows`` are TorchScript-compatible and shared by the eager embedding (``embed.py``) and
the exported module, so both paths cut and pool windows with the same code.
"""

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from .checkpoint import checkpoint_dir, load_checkpoint, resolve_checkpoint
from .config import FeatureConfig, ModelConfig, VadConfig
from .errors import DvectorError
from .features import analysis_window, mel_filterbank, min_samples
from .model import NORM_EPS, DVector
from .vad import FLOOR_PERCENTILE, LOUD_PERCENTILE, _frames

EXPORT_FORMAT = "dvector-export"
EXPORT_VERSION = 1
MODEL_FILE = "dvector.pt"
META_FILE = "dvector.json"
README_FILE = "README.txt"
DEFAULT_SEG_LEN = 160
WINDOW_BATCH = 256  # windows per network call (bounds memory on very long audio)


# ---- windowing: shared by the eager embedding and the exported module ---------------------------


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


# ---- log-mel and VAD as torch code --------------------------------------------------------------


class TorchLogMel(nn.Module):
    """``dvector.features.log_mel`` in torch: ``forward(wav (n,)) -> (1 + n // hop, n_mels)`` float32."""

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        self.n_fft: int = cfg.fft_size
        self.hop_length: int = cfg.hop_length
        self.log_floor: float = float(cfg.log_floor)
        self.min_samples: int = min_samples(cfg)
        # the very arrays the numpy path uses: periodic Hann padded to n_fft, HTK filters
        self.register_buffer("window", torch.from_numpy(analysis_window(cfg).copy()))  # (n_fft,)
        self.register_buffer("filterbank", torch.from_numpy(mel_filterbank(cfg).copy()))  # (n_fft//2+1, n_mels)

    def forward(self, wav: Tensor) -> Tensor:
        assert wav.dim() == 1, "log-mel takes mono audio (samples,)"
        assert wav.size(0) >= self.min_samples, "audio is shorter than one analysis window"
        spec = torch.stft(wav.to(torch.float32), n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.n_fft,
                          window=self.window, center=True, pad_mode="reflect", normalized=False, onesided=True,
                          return_complex=True)  # (n_fft//2+1, frames) complex64
        power = spec.real.square() + spec.imag.square()  # (F, frames)
        mel = torch.matmul(power.transpose(0, 1), self.filterbank)  # (frames, n_mels)
        return torch.log(torch.clamp(mel, min=self.log_floor))


class TorchVad(nn.Module):
    """``dvector.vad.trim_silence`` in torch, kernel by kernel, with the same float32 arithmetic.

    ``keep_mask(wav) -> (frames,) bool`` equals ``dvector.vad.speech_frames``; ``forward(wav)``
    returns the kept samples (the whole input when the VAD is disabled).
    """

    def __init__(self, cfg: VadConfig, sample_rate: int) -> None:
        super().__init__()
        self.enabled: bool = bool(cfg.enabled)
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
        """``(frames,)`` float32 dB; squares in float32, sums in float64, like the numba kernel."""
        n = wav.size(0)
        fl = self.frame_len
        count = (n + fl - 1) // fl
        squares = F.pad(wav * wav, (0, count * fl - n)).to(torch.float64).view(count, fl)  # (frames, fl)
        sizes = torch.clamp(n - torch.arange(count, device=wav.device) * fl, max=fl).to(torch.float64)  # (frames,)
        return (10.0 * torch.log10(squares.sum(dim=1) / sizes + 1e-10)).to(torch.float32)

    def initial_floor(self, energy: Tensor) -> Tensor:
        """``np.percentile(energy, 10)``: 0-d float32."""
        return self.percentile_of(energy, self.percentile)

    def speech_threshold(self, energy: Tensor, initial: Tensor) -> float:
        """``dvector.vad.speech_threshold_db``: the threshold, lowered on noisy recordings."""
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
    """Clear runs of True shorter than ``min_len`` (``dvector.vad.remove_short_runs``)."""
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
    """Extend runs of True ``before`` frames earlier and ``after`` later (``dvector.vad.dilate``)."""
    n = mask.size(0)
    counts = torch.cumsum(mask.to(torch.long), dim=0)
    counts = torch.cat([torch.zeros(1, dtype=torch.long, device=mask.device), counts])  # (n + 1,): counts[k] = sum mask[:k]
    frame = torch.arange(n, device=mask.device)
    lo = torch.clamp(frame - after, min=0)
    hi = torch.clamp(frame + before + 1, max=n)
    return (counts[hi] - counts[lo]) > 0  # any True in mask[f - after : f + before + 1]


def keep_pauses(speech: Tensor, max_pause: int) -> Tensor:
    """Speech frames and the first ``max_pause`` frames of each inner pause (``dvector.vad.keep_mask``)."""
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


# ---- the exported module ------------------------------------------------------------------------


class EmbeddingModule(nn.Module):
    """Waveform to d-vector: ``forward(wav (n,) float32 at sample_rate) -> (embed_dim,)`` unit length.

    Also ``features(wav) -> (T, n_mels)`` (VAD then log-mel) and ``embed_mel(mel) -> (embed_dim,)``.
    """

    model: MelEncoder

    def __init__(self, model: DVector, features: FeatureConfig, vad: VadConfig, seg_len: int) -> None:
        super().__init__()
        if model.n_mels != features.n_mels:
            raise DvectorError(f"the network takes {model.n_mels} mels but the features give {features.n_mels}")
        if seg_len < 1:
            raise DvectorError(f"seg_len must be >= 1 frame, got {seg_len}")
        self.sample_rate: int = features.sample_rate
        self.n_mels: int = features.n_mels
        self.embed_dim: int = model.embed_dim
        self.seg_len: int = int(seg_len)
        self.hop: int = max(1, int(seg_len) // 2)
        self.hop_length: int = features.hop_length
        self.min_samples: int = min_samples(features)
        self.vad_enabled: bool = bool(vad.enabled)
        self.dvector_version: str = __version__
        self.log_mel = TorchLogMel(features)
        self.vad = TorchVad(vad, features.sample_rate)
        self.model = model.eval()
        self.eval()

    @torch.jit.export
    def features(self, wav: Tensor) -> Tensor:
        """``(T, n_mels)`` log-mel of the VAD-trimmed audio (the untrimmed audio when VAD leaves < 1 window)."""
        if wav.dim() != 1:
            raise ValueError("dvector: expected a 1-D (mono) waveform, got " + str(wav.dim()) + " dimensions")
        wav = wav.to(torch.float32)
        if wav.size(0) < self.min_samples:
            raise ValueError("dvector: audio of " + str(wav.size(0)) + " samples is shorter than one analysis window ("
                             + str(self.min_samples) + " samples at " + str(self.sample_rate) + " Hz)")
        trimmed = self.vad(wav)
        if trimmed.size(0) < self.min_samples:
            trimmed = wav  # too little speech found: embed the whole input rather than fail
        return self.log_mel(trimmed)

    @torch.jit.export
    def embed_mel(self, mel: Tensor) -> Tensor:
        """``(embed_dim,)`` unit-length embedding of ``mel (T, n_mels)`` by sliding windows."""
        return embed_windows(self.model, mel, self.seg_len)

    def forward(self, wav: Tensor) -> Tensor:
        return self.embed_mel(self.features(wav))


# ---- from a checkpoint to an exported bundle ----------------------------------------------------


def find_checkpoint(checkpoint_or_run: str | os.PathLike[str]) -> Path:
    """A checkpoint file as given; for a run folder, ``checkpoints/best.pt`` if present, else the latest."""
    p = Path(checkpoint_or_run)
    if p.is_dir():
        for candidate in (checkpoint_dir(p) / "best.pt", p / "best.pt"):
            if candidate.is_file():
                return candidate
    return resolve_checkpoint(p)


def configs_from_checkpoint(state: dict[str, Any]) -> Tuple[ModelConfig, FeatureConfig, VadConfig, int, List[str]]:
    """Model, feature and VAD settings and the window length L of a checkpoint, and which were defaulted.

    A checkpoint trained on shards without an index records no feature or VAD settings; the
    defaults (with the network's ``n_mels``) are used then and named in the returned list.
    """
    model_cfg = ModelConfig.from_dict(state["model_config"])
    defaulted: List[str] = []
    if state.get("feature_config"):
        features = FeatureConfig.from_dict(state["feature_config"])
    else:
        features = FeatureConfig(n_mels=model_cfg.n_mels)
        defaulted.append("feature_config")
    if state.get("vad_config"):
        vad = VadConfig.from_dict(state["vad_config"])
    else:
        vad = VadConfig()
        defaulted.append("vad_config")
    seg_len = (state.get("train_config") or {}).get("seg_len")
    if seg_len is None:
        L = DEFAULT_SEG_LEN
        defaulted.append("seg_len")
    else:
        L = int(seg_len[1]) if isinstance(seg_len, (list, tuple)) else int(seg_len)
    return model_cfg, features, vad, L, defaulted


def embedding_module(state: dict[str, Any]) -> EmbeddingModule:
    """The eager ``EmbeddingModule`` of a loaded checkpoint (what ``export_model`` scripts)."""
    model_cfg, features, vad, L, _ = configs_from_checkpoint(state)
    model = DVector(model_cfg)
    model.load_state_dict(state["model"])
    return EmbeddingModule(model, features, vad, L)


README_TEXT = """\
dvector: exported speaker-embedding model (d-vector, GE2E)

dvector.pt is a TorchScript module. It needs only PyTorch, not the dvector package:

    import torch
    m = torch.jit.load("dvector.pt")
    emb = m(wav)        # wav: 1-D float32 torch tensor, mono, at {sample_rate} Hz
                        # emb: ({embed_dim},) float32, unit length

    score = float(m(wav_a) @ m(wav_b))   # cosine similarity of two utterances

Resample to {sample_rate} Hz first (e.g. torchaudio.functional.resample or soxr) and mix down to
mono. Inside the module: energy VAD trimming, log-mel ({n_mels} mels), windows of {seg_len} frames
with 50% overlap, one unit-length embedding per window, averaged and normalised again. If the VAD
finds (almost) no speech, the whole input is embedded; audio shorter than {min_samples} samples
raises ValueError. Also available: m.features(wav) -> (frames, {n_mels}) log-mel after VAD,
m.embed_mel(mel) -> ({embed_dim},), and m.sample_rate, m.embed_dim, m.seg_len.

dvector.json records the settings, the source checkpoint and its training step; the same record
is stored inside dvector.pt (torch.jit.load(path, _extra_files={{"dvector.json": ""}})).
"""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def script_module(module: EmbeddingModule) -> torch.jit.ScriptModule:
    """``torch.jit.script`` without its deprecation warning (torch >= 2.10 deprecates TorchScript)."""
    # The network is scripted on its own first: scripting nn.LSTM through the interface-typed
    # attribute compiles the LSTM's overloaded forward wrongly (torch 2.13).
    eager = module.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            if not isinstance(eager, torch.jit.ScriptModule):
                module.model = torch.jit.script(eager)
            return torch.jit.script(module)
        finally:
            module.model = eager


def load_exported(path: str | os.PathLike[str]) -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """An exported module (``dvector.pt`` or its folder) and its metadata record."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise DvectorError(f"no exported model at {p}")
    extra = {META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
        raise DvectorError(f"cannot load exported model {p}: {exc}") from exc
    meta = json.loads(extra[META_FILE]) if extra[META_FILE] else {}
    return module, meta


def export_model(checkpoint_or_run: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Script the checkpoint's embedding chain into ``out_dir/dvector.pt``; returns that path.

    Also writes ``out_dir/dvector.json`` (settings, source, step, versions) and ``README.txt``.
    A run folder exports ``checkpoints/best.pt`` when it has one, else ``checkpoints/latest.pt``.
    """
    source = find_checkpoint(checkpoint_or_run)
    state = load_checkpoint(source)
    model_cfg, features, vad, L, defaulted = configs_from_checkpoint(state)
    module = embedding_module(state)
    scripted = script_module(module)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta: Dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model_file": MODEL_FILE,
        "sample_rate": features.sample_rate,
        "embed_dim": model_cfg.embed_dim,
        "n_mels": features.n_mels,
        "seg_len": L,
        "hop": module.hop,
        "features": features.to_dict(),
        "vad": vad.to_dict(),
        "model": model_cfg.to_dict(),
        "train": state.get("train_config"),
        "defaulted": defaulted,
        "source_checkpoint": str(source.resolve()),
        "step": int(state.get("step", 0)),
        "best_eer": state.get("best_eer"),
        "dvector_version": __version__,
        "torch_version": torch.__version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    target = out / MODEL_FILE
    tmp = out / f".{MODEL_FILE}.tmp-{os.getpid()}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(scripted, str(tmp), _extra_files={META_FILE: json.dumps(meta, indent=2)})
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta["sha256"] = _sha256(target)
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (out / README_FILE).write_text(README_TEXT.format(sample_rate=features.sample_rate, embed_dim=model_cfg.embed_dim,
                                                      n_mels=features.n_mels, seg_len=L,
                                                      min_samples=module.min_samples))
    return target
