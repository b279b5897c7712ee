"""Utterance embeddings from a trained model: sliding windows, averaged, normalised.

The embedding of an utterance (the definition the TorchScript export reproduces):

1. decode, downmix, resample to the model's feature rate (``audio``);
2. VAD trim with the checkpoint's ``vad_config`` and float32 log-mel (``process.waveform_to_mel``,
   the code build-shards uses, without the float16 rounding of stored shards); where the VAD
   leaves less than one analysis window, the untrimmed audio (as the export does);
3. windows of ``L`` frames (``L`` = the longest training segment, ``train_config.seg_len[1]``),
   hop ``L // 2``: starts ``0, hop, 2 hop...`` while ``start + L <= T``, plus one window ending
   exactly at ``T`` if the last one does not reach it; an utterance of ``T <= L`` frames is one
   window, as it is;
4. each window through the model (unit length), mean, L2-normalised.

``per_window`` skips the VAD, so that window times are positions in the original audio (what
diarization needs), and returns the window embeddings with their start and end seconds.

``load`` takes a run folder (``checkpoints/best.pt``, else ``latest.pt``), a checkpoint file, or an
exported bundle (``dvector.pt`` + ``dvector.json``, loaded with ``torch.jit.load``; its ``forward``
takes a waveform).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dvector.signal.audio import DecodeError, decode, resample, to_mono
from dvector.training.checkpoint import checkpoint_dir, load_checkpoint, resolve_checkpoint
from dvector.config import FeatureConfig, ModelConfig, VadConfig
from dvector.errors import DvectorError
from dvector.signal.windows import WINDOW_BATCH, embed_windows, window_embeddings, window_starts
from dvector.signal.features import log_mel, min_samples
from dvector.nn.model import DVector
from dvector.signal.process import SkipUtterance, waveform_to_mel
from dvector.shards.format import sha256_file

EXPORT_MODULE = "dvector.pt"
EXPORT_META = "dvector.json"


# ---- the windowing: the export's code, shared, so both paths cut and pool windows identically ----

class ShapeBuckets(torch.nn.Module):
    """Runs a d-vector network on batches padded to a few shapes: the batch to a power of two (at
    most ``WINDOW_BATCH``), a window shorter than ``L`` frames to ``L`` with its true length given.

    oneDNN builds an LSTM kernel for every new input shape (about a second on a busy CPU), so
    embedding many files with their own window counts and lengths would spend most of its time
    building kernels. Padding changes nothing: rows are independent, the LSTM runs forward in time,
    and padded frames get no attention weight ("last" pooling reads the last true frame).
    """

    def __init__(self, model: torch.nn.Module, L: int) -> None:
        super().__init__()
        self.model = model
        self.L = int(L)

    def forward(self, mels: Tensor, lengths: Tensor | None = None) -> Tensor:
        B, T = mels.size(0), mels.size(1)
        if lengths is None and T < self.L:
            lengths = torch.full((B,), T, dtype=torch.long)
            mels = F.pad(mels, (0, 0, 0, self.L - T))  # (B, L, n_mels)
        bucket = 1 << (B - 1).bit_length() if B <= WINDOW_BATCH else B
        if bucket > B:
            mels = torch.cat([mels, mels[-1:].expand(bucket - B, -1, -1)])  # (bucket, T', n_mels)
            if lengths is not None:
                lengths = torch.cat([lengths, lengths[-1:].expand(bucket - B)])
        device = next(iter(self.model.parameters()), mels).device
        return self.model(mels.to(device), lengths)[:B].float().cpu()  # (B, D)


# ---- the embedder --------------------------------------------------------------------------------

def _display(path: Any) -> str:
    return os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)


@dataclass
class WindowEmbeddings:
    vectors: np.ndarray  # (K, D) float32, unit rows
    starts_s: np.ndarray  # (K,) seconds from the start of the audio
    ends_s: np.ndarray  # (K,)

    def __iter__(self):  # noqa: ANN204 - lets ``vectors, starts, ends = embedder.per_window(x)`` work
        return iter((self.vectors, self.starts_s, self.ends_s))


class Embedder:
    """A loaded model that turns audio into d-vectors; make one with ``dvector.load(path)``.

    ``embed(source)`` -> (D,) unit vector; ``source`` is an audio file path or a
    ``(waveform, sample_rate)`` pair (numpy or torch; mono ``(samples,)`` or ``(samples, channels)``,
    ``(channels, samples)`` with up to 8 channels is recognised too).
    """

    def __init__(self, model: torch.nn.Module, features: FeatureConfig, vad: VadConfig, seg_len: int,
                 info: dict[str, Any], scripted: torch.nn.Module | None = None, threads: int | None = None) -> None:
        self.model = model.eval()  # DVector: mels (B, T, n_mels) -> (B, D); a scripted one for exports
        self.features = features
        self.vad = vad
        self.seg_len = int(seg_len)  # L: frames per window
        self.info = info  # the model's identity: path, kind, step, sha256, configs
        self.scripted = scripted  # an exported bundle's waveform -> embedding module, if loaded from one
        self.runner = ShapeBuckets(self.model, self.seg_len)
        self.threads = threads  # torch CPU threads while embedding (None: leave torch's setting)

    @contextmanager
    def _torch_threads(self) -> Iterator[None]:
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

    @classmethod
    def from_model(cls, model: DVector, features: FeatureConfig | None = None, vad: VadConfig | None = None,
                   seg_len: int = 160, name: str = "in-memory model", threads: int | None = None) -> "Embedder":
        """An embedder for a network in memory (e.g. an untrained one, for a baseline EER)."""
        features = features or FeatureConfig(n_mels=model.n_mels)
        vad = vad or VadConfig()
        info = {"kind": "model", "path": name, "step": None, "sha256": None, "best_eer": None,
                "embed_dim": model.embed_dim, "seg_len": int(seg_len), "feature_config": features.to_dict(),
                "vad_config": vad.to_dict()}
        return cls(model, features, vad, seg_len, info, threads=threads)

    @property
    def dim(self) -> int:
        return int(self.info["embed_dim"])

    @property
    def sample_rate(self) -> int:
        return self.features.sample_rate

    def __repr__(self) -> str:
        step = self.info.get("step")
        return (f"Embedder({self.info['kind']} {self.info['path']}" + (f", step {step}" if step is not None else "")
                + f", D={self.dim}, L={self.seg_len})")

    # -- audio in --------------------------------------------------------------------------------

    def waveform(self, source: Any) -> np.ndarray:
        """Mono float32 audio at the feature rate from a path or a ``(waveform, sample_rate)`` pair."""
        if isinstance(source, tuple):
            if len(source) != 2:
                raise DvectorError("give audio as a path or as a (waveform, sample_rate) pair")
            data, rate = source
            if isinstance(data, torch.Tensor):
                data = data.detach().cpu().numpy()
            data = np.asarray(data, dtype=np.float32)
            if data.ndim == 2 and data.shape[0] <= 8 < data.shape[1]:
                data = data.T  # (channels, samples), as torchaudio gives it
            if data.ndim not in (1, 2):
                raise DvectorError(f"a waveform must be (samples,) or (samples, channels), got shape {data.shape}")
            where = "the waveform"
            rate = int(rate)
        else:
            path = Path(source)
            where = _display(path)
            if not path.is_file():
                raise DvectorError(f"{where}: no such file")
            try:
                data, rate = decode(path)
            except DecodeError as exc:
                raise DvectorError(f"{where}: {exc}") from exc
        if data.shape[0] == 0:
            raise DvectorError(f"{where}: no audio samples")
        if not np.all(np.isfinite(data)):
            raise DvectorError(f"{where}: audio holds NaN or infinite samples")
        if rate <= 0:
            raise DvectorError(f"{where}: sample rate must be positive, got {rate}")
        return resample(to_mono(data), rate, self.sample_rate)

    def mel(self, source: Any) -> np.ndarray:
        """Float32 log-mel (T, n_mels) of ``source`` after VAD: what ``embed`` cuts into windows.

        Where the VAD finds less than one analysis window of speech, the whole audio is used (as
        the exported module does); audio shorter than one analysis window is an error.
        """
        wav = self.waveform(source)
        self._check_length(wav, source)
        try:
            mel, _ = waveform_to_mel(wav, self.features, self.vad)
        except SkipUtterance:
            mel = log_mel(wav, self.features)  # (almost) no speech found: embed it all, like the export
        return mel

    @staticmethod
    def _where(source: Any) -> str:
        return "the waveform" if isinstance(source, tuple) else _display(source)

    def _check_length(self, wav: np.ndarray, source: Any) -> None:
        need = min_samples(self.features)
        if wav.shape[0] < need:
            raise DvectorError(f"{self._where(source)}: too short: {wav.shape[0]} samples at {self.sample_rate} Hz, "
                               f"less than one analysis window ({need} samples)")

    # -- embeddings out --------------------------------------------------------------------------

    def embed_mel(self, mel: np.ndarray | Tensor) -> np.ndarray:
        """The embedding (D,) of log-mel features (T, n_mels), e.g. a shard's stored (VAD-trimmed) mel."""
        with self._torch_threads(), torch.inference_mode():
            return self._embed_mel(mel)

    def _embed_mel(self, mel: np.ndarray | Tensor) -> np.ndarray:
        x = torch.as_tensor(np.asarray(mel, dtype=np.float32) if not isinstance(mel, Tensor) else mel.float())
        if x.dim() != 2 or x.size(1) != self.features.n_mels or x.size(0) < 1:
            raise DvectorError(f"mel must be (frames >= 1, {self.features.n_mels}), got {list(x.shape)}")
        if self.scripted is not None and isinstance(self.model, _NoWindows):
            return self.scripted.embed_mel(x.to(next(iter(self.scripted.parameters())).device)).cpu().numpy()
        return embed_windows(self.runner, x, self.seg_len).numpy()

    def embed(self, source: Any) -> np.ndarray:
        """Unit-length float32 embedding (D,) of one utterance (a path or ``(waveform, sample_rate)``)."""
        with self._torch_threads(), torch.inference_mode():
            return self._embed(source)

    def _embed(self, source: Any) -> np.ndarray:
        if self.scripted is not None:
            wav = self.waveform(source)
            self._check_length(wav, source)
            try:
                device = next(iter(self.scripted.parameters()), torch.empty(0)).device
                out = self.scripted(torch.from_numpy(np.ascontiguousarray(wav)).to(device))
            except Exception as exc:  # TorchScript raises its own error types
                message = str(exc).strip().splitlines()
                raise DvectorError(f"{self._where(source)}: the exported model failed: "
                                   f"{message[-1] if message else type(exc).__name__}") from exc
            return out.detach().float().reshape(-1).cpu().numpy()
        return embed_windows(self.runner, torch.from_numpy(self.mel(source)), self.seg_len).numpy()

    __call__ = embed

    def per_window(self, source: Any) -> WindowEmbeddings:
        """Window embeddings (K, D) of the whole audio, without VAD, with start and end seconds.

        Windows are ``L`` frames with hop ``L // 2``, laid out as in ``embed``; a window of frames
        ``[s, s + L)`` spans ``s * hop_s`` to ``(s + L) * hop_s`` seconds, the last one clipped to
        the audio's end; audio shorter than one window gives one window over all of it.
        """
        with self._torch_threads(), torch.inference_mode():
            return self._per_window(source)

    def _per_window(self, source: Any) -> WindowEmbeddings:
        wav = self.waveform(source)
        self._check_length(wav, source)
        mel = torch.from_numpy(log_mel(wav, self.features))  # (T, n_mels)
        vectors = window_embeddings(self.runner, mel, self.seg_len).numpy()  # (K, D)
        T, L = mel.size(0), self.seg_len
        hop_s = self.features.hop_length / self.sample_rate
        duration = wav.shape[0] / self.sample_rate
        starts = np.asarray(window_starts(T, L), dtype=np.float64)
        starts_s = starts * hop_s
        ends_s = np.minimum((starts + min(T, L)) * hop_s, duration)
        return WindowEmbeddings(vectors, starts_s, ends_s)

    embed_windows = per_window


# ---- loading -------------------------------------------------------------------------------------

def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``) holds code; a ``torch.save`` checkpoint does not."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _is_export(path: Path) -> Path | None:
    """The ``dvector.pt`` of an exported bundle at ``path`` (its folder or the file), else None."""
    if path.is_dir():
        if (path / EXPORT_MODULE).is_file() and (path / EXPORT_META).is_file():
            return path / EXPORT_MODULE
        return None
    if path.is_file() and _is_torchscript(path):
        return path
    return None


def _checkpoint_file(path: Path) -> Path:
    """A run folder's best checkpoint (else its latest), or a checkpoint file as given."""
    if path.is_dir():
        for best in (checkpoint_dir(path) / "best.pt", path / "best.pt"):
            if best.is_file():
                return best
    return resolve_checkpoint(path)


def _from_checkpoint(path: Path, device: str, threads: int | None) -> Embedder:
    file = _checkpoint_file(path)
    state = load_checkpoint(file, map_location="cpu")
    try:
        model_cfg = ModelConfig.from_dict(state["model_config"])
        features = FeatureConfig.from_dict(state["feature_config"]) if state.get("feature_config") else \
            FeatureConfig(n_mels=model_cfg.n_mels)
        vad = VadConfig.from_dict(state["vad_config"]) if state.get("vad_config") else VadConfig()
        seg_len = int(state["train_config"]["seg_len"][1])
        model = DVector(model_cfg)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise DvectorError(f"{file}: not a usable dvector checkpoint ({type(exc).__name__}: {exc})") from exc
    info = {
        "kind": "checkpoint", "path": str(file), "step": int(state["step"]), "sha256": sha256_file(file),
        "best_eer": state.get("best_eer"), "embed_dim": model_cfg.embed_dim, "seg_len": seg_len,
        "model_config": model_cfg.to_dict(), "feature_config": features.to_dict(), "vad_config": vad.to_dict(),
        "train_seed": int(state["train_config"].get("seed", 0)),
    }
    return Embedder(model.to(device), features, vad, seg_len, info, threads=threads)


def untrained_twin(embedder: Embedder) -> Embedder:
    """The same network as a checkpoint's, initialised as its training run started it (same seed):
    the baseline that shows what training bought."""
    if "model_config" not in embedder.info:
        raise DvectorError("an untrained baseline needs a checkpoint or run folder (it records the network)")
    torch.manual_seed(int(embedder.info.get("train_seed", 0)))
    model = DVector(ModelConfig.from_dict(embedder.info["model_config"]))
    return Embedder.from_model(model, embedder.features, embedder.vad, embedder.seg_len,
                               name=f"untrained twin of {embedder.info.get('path')}", threads=embedder.threads)


def _find(meta: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` found at the top of ``meta`` or one level down."""
    for name in names:
        if name in meta:
            return meta[name]
    for value in meta.values():
        if isinstance(value, dict):
            for name in names:
                if name in value:
                    return value[name]
    return None


def _from_export(module_path: Path, device: str, threads: int | None) -> Embedder:
    from dvector.use.export import load_exported

    scripted, meta = load_exported(module_path)  # the record stored inside dvector.pt
    meta_path = module_path.with_suffix(".json")
    if not meta_path.is_file():
        meta_path = module_path.parent / EXPORT_META
    if meta_path.is_file():
        try:
            meta = {**meta, **json.loads(meta_path.read_text(encoding="utf-8"))}
        except (OSError, ValueError) as exc:
            raise DvectorError(f"cannot read {meta_path}: {exc}") from exc
    scripted = scripted.to(device).eval()
    feature_dict = _find(meta, "feature_config", "features")
    vad_dict = _find(meta, "vad_config", "vad")
    try:
        features = FeatureConfig.from_dict(feature_dict) if isinstance(feature_dict, dict) else \
            FeatureConfig(sample_rate=int(getattr(scripted, "sample_rate", 16000)))
        vad = VadConfig.from_dict(vad_dict) if isinstance(vad_dict, dict) else VadConfig()
    except DvectorError as exc:
        raise DvectorError(f"{module_path}: {exc}") from exc
    seg_len = _find(meta, "seg_len") or getattr(scripted, "seg_len", None)
    if isinstance(seg_len, (list, tuple)):
        seg_len = seg_len[-1]
    # the scripted DVector inside the bundle serves per_window
    inner: torch.nn.Module | None = None
    for _, sub in scripted.named_modules():
        if getattr(sub, "original_name", None) == "DVector":
            inner = sub
            break
    embed_dim = _find(meta, "embed_dim") or getattr(scripted, "embed_dim", None)
    if embed_dim is None:
        with torch.inference_mode():
            embed_dim = int(scripted(torch.zeros(max(min_samples(features), features.sample_rate))).numel())
    info = {
        "kind": "export", "path": str(module_path), "step": _find(meta, "step"), "sha256": sha256_file(module_path),
        "best_eer": _find(meta, "best_eer"), "embed_dim": int(embed_dim), "seg_len": seg_len,
        "feature_config": features.to_dict(), "vad_config": vad.to_dict(),
        "source_checkpoint": _find(meta, "source_checkpoint"),
    }
    model = inner if inner is not None else _NoWindows(module_path)
    return Embedder(model, features, vad, int(seg_len or 1), info, scripted=scripted, threads=threads)


class _NoWindows(torch.nn.Module):
    """Stands in for the network when an exported bundle does not expose it."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def forward(self, mels: Tensor) -> Tensor:  # noqa: ARG002
        raise DvectorError(f"{self.path} takes waveforms only: per-window and mel embeddings need the checkpoint")


def load(path: str | os.PathLike[str], device: str = "cpu", threads: int | None = None) -> Embedder:
    """An ``Embedder`` from a run folder, a checkpoint file, or an exported bundle (folder or dvector.pt).

    ``threads``: torch CPU threads while embedding (None: torch's current setting).
    """
    p = Path(path)
    if not p.exists():
        raise DvectorError(f"model {p} does not exist (give a run folder, a checkpoint, or an exported folder)")
    exported = _is_export(p)
    if exported is not None:
        return _from_export(exported, device, threads)
    return _from_checkpoint(p, device, threads)


def model_identity(embedder: Embedder) -> dict[str, Any]:
    """What the .npz and eval.json record about the model."""
    from dvector import __version__

    keys = ("kind", "path", "step", "sha256", "best_eer", "embed_dim", "seg_len", "feature_config", "vad_config",
            "source_checkpoint")
    return {**{k: embedder.info.get(k) for k in keys}, "dvector_version": __version__}
