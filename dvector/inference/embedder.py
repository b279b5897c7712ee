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

A model whose ``WindowConfig`` says ``"partials"`` (an imported Resemblyzer encoder) cuts instead as
Resemblyzer's ``embed_utterance`` does: the speech after VAD zero-padded to the end of its last
partial window (``signal.windows.partial_windows``), then its features, then those windows.
Features raise a quiet recording's level first where ``FeatureConfig.raise_to_dbfs`` asks.

``per_window`` skips the VAD, so that window times are positions in the original audio (what
diarization needs), and returns the window embeddings with their start and end seconds; ``stream()``
gives the same windows from audio arriving in chunks (``dvector.inference.streaming``).

``load`` takes a run folder (``checkpoints/best.pt``, else ``latest.pt``), a checkpoint file, or an
exported bundle (``dvector.pt`` + ``dvector.json``, loaded with ``torch.jit.load``; its ``forward``
takes a waveform).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dvector.config import VERSION, FeatureConfig, ModelConfig, VadConfig, WindowConfig
from dvector.errors import DvectorError
from dvector.files import sha256_file
from dvector.nn.encoders import ENCODER_NAMES, build_encoder
from dvector.nn.model import DVector
from dvector.corpus import Utterance
from dvector.signal.audio import DecodeError, decode, decode_utterance, resample, to_mono
from dvector.signal.features import log_mel, min_samples, raise_level
from dvector.signal.process import SkipUtterance, check_finite, speech_waveform, waveform_to_mel
from dvector.signal.windows import (embed_windows, embed_windows_at, partial_windows, window_embeddings,
                                    window_starts)
from dvector.inference.bundle import (checkpoint_settings, find_export, find_key, load_model_checkpoint, read_export,
                                     refuse_nonfinite)
from dvector.inference.runner import WindowRunner
from dvector.inference.streaming import WindowStream



class EmbedError(DvectorError):
    """One input could not be embedded: ``where`` (the file, or "the waveform") and ``reason``.

    The message is ``where: reason``; loops over many inputs list ``reason`` against their own key.
    """

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


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


class Embedder(WindowRunner):
    """A loaded model that turns audio into d-vectors; make one with ``dvector.load(path)``.

    ``embed(source)`` -> (D,) unit vector; ``source`` is an audio file path or a
    ``(waveform, sample_rate)`` pair (numpy or torch; mono ``(samples,)`` or ``(samples, channels)``,
    ``(channels, samples)`` with up to 8 channels is recognised too).
    """

    def __init__(self, model: torch.nn.Module, features: FeatureConfig, vad: VadConfig, seg_len: int,
                 info: dict[str, Any], scripted: torch.nn.Module | None = None, threads: int | None = None,
                 windows: WindowConfig | None = None) -> None:
        super().__init__(model, features, seg_len, int(info["embed_dim"]), threads)
        self.vad = vad
        self.windows = windows or WindowConfig()  # "overlap" (L frames, hop L // 2) or Resemblyzer's "partials"
        self.info = info  # the model's identity: path, kind, step, sha256, configs
        self.scripted = scripted  # an exported bundle's waveform -> embedding module, if loaded from one

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

    def __repr__(self) -> str:
        step = self.info.get("step")
        return (f"Embedder({self.info['kind']} {self.info['path']}" + (f", step {step}" if step is not None else "")
                + f", D={self.dim}, L={self.seg_len})")

    # -- audio in --------------------------------------------------------------------------------

    def waveform(self, source: Any) -> np.ndarray:
        """Mono float32 audio at the feature rate from a path, a ``(waveform, sample_rate)`` pair or a listed
        :class:`dvector.corpus.Utterance` (a Kaldi directory's or a manifest's: a segment, a command)."""
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
        elif isinstance(source, Utterance):  # a listed utterance: a segment, or a command's output
            where = source.source
            if not source.command and not source.path.is_file():
                raise EmbedError(where, f"no such file: {_display(source.path)}")
            try:
                data, rate = decode_utterance(source.path, source.start, source.end, source.command)
            except DecodeError as exc:
                raise EmbedError(where, str(exc)) from exc
        else:
            path = Path(source)
            where = _display(path)
            if not path.is_file():
                raise EmbedError(where, "a folder, not an audio file" if path.is_dir() else "no such file")
            try:
                data, rate = decode(path)
            except DecodeError as exc:
                raise EmbedError(where, str(exc)) from exc
        if data.shape[0] == 0:
            raise EmbedError(where, "no audio samples")
        if not np.all(np.isfinite(data)):
            raise EmbedError(where, "audio holds NaN or infinite samples")
        if rate <= 0:
            raise EmbedError(where, f"sample rate must be positive, got {rate}")
        try:
            return resample(to_mono(data), rate, self.sample_rate)
        except DecodeError as exc:  # a rate or length beyond the bounds
            raise EmbedError(where, str(exc)) from exc

    def mel(self, source: Any) -> np.ndarray:
        """Float32 log-mel (T, n_mels) of ``source`` after VAD: what ``embed`` cuts into windows.

        Where the VAD finds less than one analysis window of speech, the whole audio is used (as
        the exported module does); audio shorter than one analysis window is an error.
        """
        wav = self.waveform(source)
        self._check_length(wav, source)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked for, not warned about
            try:
                mel, _ = waveform_to_mel(wav, self.features, self.vad)
            except SkipUtterance:
                mel = log_mel(self.level(wav), self.features)  # (almost) no speech found: embed it all, like the export
        self._check_finite(mel, source)
        return mel

    def _check_finite(self, mel: np.ndarray, source: Any) -> None:
        try:
            check_finite(mel)
        except SkipUtterance as exc:
            raise EmbedError(self._where(source), str(exc)) from None

    @staticmethod
    def _where(source: Any) -> str:
        if isinstance(source, Utterance):
            return source.source
        return "the waveform" if isinstance(source, tuple) else _display(source)

    def _check_length(self, wav: np.ndarray, source: Any) -> None:
        need = min_samples(self.features)
        if wav.shape[0] < need:
            raise EmbedError(self._where(source), f"too short: {wav.shape[0]} samples at {self.sample_rate} Hz, "
                               f"less than one analysis window ({need} samples)")

    # -- embeddings out --------------------------------------------------------------------------

    def embed_mel(self, mel: np.ndarray | Tensor) -> np.ndarray:
        """The embedding (D,) of log-mel features (T, n_mels), e.g. a shard's stored (VAD-trimmed) mel."""
        with self.torch_threads(), torch.inference_mode():
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
        with self.torch_threads(), torch.inference_mode():
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
                raise EmbedError(self._where(source), "the exported model failed: "
                                   f"{message[-1] if message else type(exc).__name__}") from exc
            vector = out.detach().float().reshape(-1).cpu().numpy()
            if not np.all(np.isfinite(vector)):
                raise EmbedError(self._where(source), "the embedding holds NaN or infinite values "
                                 "(audio of huge amplitude?)")
            return vector
        if self.windows.layout == "partials":
            return self._embed_partials(source)
        return embed_windows(self.runner, torch.from_numpy(self.mel(source)), self.seg_len).numpy()

    __call__ = embed

    def level(self, wav: np.ndarray) -> np.ndarray:
        """``wav`` raised to the features' level (``FeatureConfig.raise_to_dbfs``; unchanged when off)."""
        return raise_level(wav, self.features.raise_to_dbfs)

    def _embed_partials(self, source: Any) -> np.ndarray:
        """Resemblyzer's ``embed_utterance`` on our VAD's speech: the speech zero-padded to the end of
        its last partial window, its features, the windows at ``partial_windows``' starts, pooled."""
        wav = self.waveform(source)
        self._check_length(wav, source)
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                speech, _ = speech_waveform(wav, self.features, self.vad)
            except SkipUtterance:
                speech = self.level(wav)  # (almost) no speech found: embed it all
            frames = self.windows.frames
            padded, starts = partial_windows(speech.shape[0], self.features.hop_length, frames,
                                             self.windows.step_frames(self.features), self.windows.min_coverage)
            mel = log_mel(np.pad(speech, (0, padded - speech.shape[0])), self.features)
        self._check_finite(mel, source)
        return embed_windows_at(self.runner, torch.from_numpy(mel), starts, frames).numpy()

    def per_window(self, source: Any) -> WindowEmbeddings:
        """Window embeddings (K, D) of the whole audio, without VAD, with start and end seconds.

        Windows are ``L`` frames with hop ``L // 2``, laid out as in ``embed``; a window of frames
        ``[s, s + L)`` spans ``s * hop_s`` to ``(s + L) * hop_s`` seconds, the last one clipped to
        the audio's end; audio shorter than one window gives one window over all of it.
        """
        with self.torch_threads(), torch.inference_mode():
            return self._per_window(source)

    def _per_window(self, source: Any) -> WindowEmbeddings:
        wav = self.waveform(source)
        self._check_length(wav, source)
        with np.errstate(over="ignore", invalid="ignore"):
            mel_np = log_mel(self.level(wav), self.features)
        self._check_finite(mel_np, source)
        mel = torch.from_numpy(mel_np)  # (T, n_mels)
        vectors = window_embeddings(self.runner, mel, self.seg_len).numpy()  # (K, D)
        T, L = mel.size(0), self.seg_len
        hop_s = self.features.hop_length / self.sample_rate
        duration = wav.shape[0] / self.sample_rate
        starts = np.asarray(window_starts(T, L), dtype=np.float64)
        starts_s = starts * hop_s
        ends_s = np.minimum((starts + min(T, L)) * hop_s, duration)
        return WindowEmbeddings(vectors, starts_s, ends_s)

    embed_windows = per_window

    def stream(self, sample_rate: int | None = None) -> "WindowStream":
        """Window embeddings of a live stream, each as soon as its window is complete: ``push(chunk)``
        returns the windows a chunk completed, ``flush()`` the rest. The windows and vectors are
        ``per_window``'s (no VAD); chunks at ``sample_rate`` (default: the model's) are resampled on
        the fly. See ``dvector.inference.streaming``."""
        return WindowStream(self, sample_rate)


# ---- loading -------------------------------------------------------------------------------------

def _from_checkpoint(path: Path, device: str, threads: int | None) -> Embedder:
    file, state = load_model_checkpoint(path)
    try:
        settings = checkpoint_settings(state)
        model = build_encoder(settings.model)
        model.load_state_dict(state["model"])
        step = int(state["step"])
    except DvectorError as exc:
        raise DvectorError(f"{file}: {exc}") from exc
    except (KeyError, TypeError, RuntimeError) as exc:
        raise DvectorError(f"{file}: not a usable dvector checkpoint ({type(exc).__name__}: {exc})") from exc
    model_cfg, features, vad, seg_len = settings.model, settings.features, settings.vad, settings.seg_len
    info = {
        "kind": "checkpoint", "path": str(file), "step": step, "sha256": sha256_file(file),
        "best_eer": state.get("best_eer"), "embed_dim": model_cfg.embed_dim, "seg_len": seg_len,
        "model_config": model_cfg.to_dict(), "feature_config": features.to_dict(), "vad_config": vad.to_dict(),
        "train_seed": int((state.get("train_config") or {}).get("seed", 0)),
        "window_config": settings.windows.to_dict(), "imported": state.get("imported"),
    }
    return Embedder(model.to(device), features, vad, seg_len, info, threads=threads, windows=settings.windows)


def untrained_twin(embedder: Embedder) -> Embedder:
    """The same network as a checkpoint's, initialised as its training run started it (same seed):
    the baseline that shows what training bought."""
    if "model_config" not in embedder.info:
        raise DvectorError("an untrained baseline needs a checkpoint or run folder (it records the network)")
    torch.manual_seed(int(embedder.info.get("train_seed", 0)))
    model = build_encoder(ModelConfig.from_dict(embedder.info["model_config"]))
    return Embedder.from_model(model, embedder.features, embedder.vad, embedder.seg_len,
                               name=f"untrained twin of {embedder.info.get('path')}", threads=embedder.threads)


def _scripted_network(scripted: torch.nn.Module) -> torch.nn.Module | None:
    """The scripted encoder inside an exported module (it serves per-window embeddings), if any."""
    for _, sub in scripted.named_modules():
        if getattr(sub, "original_name", None) in ENCODER_NAMES:
            return sub
    return None


def _from_export(module_path: Path, device: str, threads: int | None) -> Embedder:
    scripted, meta, settings = read_export(module_path)
    refuse_nonfinite([name for name, value in scripted.named_parameters()
                      if value.is_floating_point() and not bool(value.isfinite().all())], module_path)
    scripted = scripted.to(device).eval()
    features = settings.features
    embed_dim = find_key(meta, "embed_dim") or getattr(scripted, "embed_dim", None)
    if embed_dim is None:
        with torch.inference_mode():
            embed_dim = int(scripted(torch.zeros(max(min_samples(features), features.sample_rate))).numel())
    info = {
        "kind": "export", "path": str(module_path), "step": find_key(meta, "step"),
        "sha256": sha256_file(module_path), "best_eer": find_key(meta, "best_eer"), "embed_dim": int(embed_dim),
        "seg_len": settings.seg_len, "feature_config": features.to_dict(), "vad_config": settings.vad.to_dict(),
        "source_checkpoint": find_key(meta, "source_checkpoint"),
    }
    inner = _scripted_network(scripted)
    model = inner if inner is not None else _NoWindows(module_path)
    return Embedder(model, features, settings.vad, int(settings.seg_len or 1), info, scripted=scripted,
                    threads=threads, windows=settings.windows)


class _NoWindows(torch.nn.Module):
    """Stands in for the network when an exported bundle does not expose it."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def forward(self, mels: Tensor) -> Tensor:  # noqa: ARG002
        raise DvectorError(f"{self.path} takes waveforms only: per-window and mel embeddings need the checkpoint")


def load(path: str | os.PathLike[str], device: str = "cpu", threads: int | None = None) -> Embedder:
    """An ``Embedder`` from a run folder, a checkpoint file, or an exported bundle (folder or dvector.pt).

    ``threads``: torch CPU threads while embedding (None or 0: torch's current setting).
    """
    threads = threads or None
    p = Path(path)
    if not p.exists():
        raise DvectorError(f"model {p} does not exist (give a run folder, a checkpoint, or an exported folder)")
    exported = find_export(p)
    if exported is not None:
        return _from_export(exported, device, threads)
    return _from_checkpoint(p, device, threads)


def model_identity(embedder: Embedder) -> dict[str, Any]:
    """What the .npz and eval.json record about the model."""
    keys = ("kind", "path", "step", "sha256", "best_eer", "embed_dim", "seg_len", "feature_config", "vad_config",
            "window_config", "source_checkpoint", "imported")
    return {**{k: embedder.info.get(k) for k in keys}, "dvector_version": VERSION}
