"""Export: a self-contained TorchScript module, waveform in, unit-length utterance d-vector out.

``dvector export RUN -o DIR`` writes ``DIR/dvector.pt`` (TorchScript), ``DIR/dvector.json`` (what it
is and how it was made) and ``DIR/README.txt``. The module needs only torch::

    m = torch.jit.load("DIR/dvector.pt")
    emb = m(wav)  # wav: 1-D float32 tensor at m.sample_rate -> (embed_dim,), unit length

Inside the module, the same chain as the package's embedding, as torch code:

0. level (``TorchLevel``, only where ``FeatureConfig.raise_to_dbfs`` asks, as for the Resemblyzer import):
   the waveform raised to that RMS level when quieter, as ``dvector.signal.features.raise_level``;
1. VAD trim (``TorchVad``): a torch twin of the numba kernels in ``dvector.signal.vad``, the same
   arithmetic step by step (frame energies, around each frame's mean with ``remove_dc``, the numpy-style
   10th percentile, the noise floor recurrence as a loop), so the keep masks are identical, not merely close;
2. log-mel (``TorchLogMel``): ``torch.stft`` with the same periodic Hann window, padding and mel
   filterbank matrix (``dvector.signal.features.mel_filterbank``, stored as a buffer) as
   ``dvector.signal.features.log_mel``, and its log (or none, ``compression="none"``); equal to it up to
   FFT rounding (about 1e-5 in the log domain);
3. windows (``window_starts``, ``window_batch``): the training segment length L (``seg_len`` hi),
   hop L // 2; an utterance of at most L frames is one window as it is; otherwise windows start
   at 0, hop, 2 hop, ... while they fit, plus one ending exactly at the last frame when the
   regular ones miss it. With ``WindowConfig`` layout ``"partials"`` (the import's) instead
   Resemblyzer's: the speech zero-padded to the end of its last partial window before step 2
   (``partial_windows``), the windows at those starts (``embed_windows_at``);
4. each window through the network (unit length), averaged, normalised again (``pool_embeddings``).

One deliberate difference: where the VAD leaves less than one analysis window of audio, the
package's numpy path refuses the utterance (``SkipUtterance``); the TorchScript module embeds the
untrimmed audio instead, so that a deployed model always answers. Audio shorter than one
analysis window (25 ms by default) is refused by both (``ValueError`` from the module).

The torch twins live in ``dvector.signal.torch_frontend``; the windowing, shared with the eager embedding
(``dvector.inference.embedder``) so both paths cut and pool windows with the same code, in
``dvector.signal.windows``. The record (``dvector.json``) holds ``window_config`` where it is not the
default, so that ``dvector.load`` of the export knows the layout.
"""

import io
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvector.config import VERSION, FeatureConfig, VadConfig, WindowConfig
from dvector.errors import DvectorError
from dvector.files import json_text, output_folder, outputs_together, sha256_file, write_output
from dvector.nn.encoders import build_encoder
from dvector.nn.model import DVector
from dvector.signal.features import min_samples
from dvector.signal.torch_frontend import TorchLevel, TorchLogMel, TorchVad
from dvector.signal.windows import MelEncoder, embed_windows, embed_windows_at, partial_windows
from dvector.inference.bundle import EXPORT_META, EXPORT_MODULE, checkpoint_settings, load_model_checkpoint

EXPORT_FORMAT = "dvector-export"
EXPORT_VERSION = 1
MODEL_FILE = EXPORT_MODULE
META_FILE = EXPORT_META
README_FILE = "README.txt"






# ---- the exported module ------------------------------------------------------------------------


class EmbeddingModule(nn.Module):
    """Waveform to d-vector: ``forward(wav (n,) float32 at sample_rate) -> (embed_dim,)`` unit length.

    Also ``speech(wav) -> (n',)`` (level, then VAD), ``features(wav) -> (T, n_mels)`` (the features the
    windows are cut from) and ``embed_mel(mel) -> (embed_dim,)`` (overlapping windows of ``seg_len``).
    ``windows`` (default ``"overlap"``): with ``"partials"`` the speech is zero-padded to the end of its last
    partial window (``dvector.signal.windows.partial_windows``) before its features, as the eager embedding does.
    """

    model: MelEncoder

    def __init__(self, model: DVector, features: FeatureConfig, vad: VadConfig, seg_len: int,
                 windows: WindowConfig | None = None) -> None:
        super().__init__()
        windows = windows or WindowConfig()
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
        self.dvector_version: str = VERSION
        self.partials: bool = windows.layout == "partials"
        self.partial_frames: int = int(windows.frames) if self.partials else 0
        self.partial_step: int = windows.step_frames(features) if self.partials else 1
        self.min_coverage: float = float(windows.min_coverage)
        if features.raise_to_dbfs != 0.0:  # a submodule only where used: default exports stay as they were
            self.level = TorchLevel(features)
        self.log_mel = TorchLogMel(features)
        self.vad = TorchVad(vad, features.sample_rate)
        self.model = model.eval()
        self.eval()

    @torch.jit.export
    def speech(self, wav: Tensor) -> Tensor:
        """The samples the features are taken of: ``wav`` raised to the recorded level (where the features ask
        for it), VAD-trimmed; the whole (raised) input when the VAD keeps less than one analysis window."""
        if wav.dim() != 1:
            raise ValueError("dvector: expected a 1-D (mono) waveform, got " + str(wav.dim()) + " dimensions")
        wav = wav.to(torch.float32)
        if wav.size(0) < self.min_samples:
            raise ValueError("dvector: audio of " + str(wav.size(0)) + " samples is shorter than one analysis window ("
                             + str(self.min_samples) + " samples at " + str(self.sample_rate) + " Hz)")
        if hasattr(self, "level"):
            wav = self.level(wav)
        trimmed = self.vad(wav)
        if trimmed.size(0) < self.min_samples:
            trimmed = wav  # too little speech found: embed the whole input rather than fail
        return trimmed

    @torch.jit.export
    def features(self, wav: Tensor) -> Tensor:
        """``(T, n_mels)`` log-mel of ``speech(wav)``; with partial windows, of it zero-padded to their end."""
        trimmed = self.speech(wav)
        if self.partials:
            padded, _ = self.partial_layout(trimmed.size(0))
            trimmed = F.pad(trimmed, (0, padded - trimmed.size(0)))
        return self.log_mel(trimmed)

    def partial_layout(self, n_samples: int) -> Tuple[int, List[int]]:
        """``partial_windows`` with the recorded window settings: (samples to pad to, window starts)."""
        return partial_windows(n_samples, self.hop_length, self.partial_frames, self.partial_step, self.min_coverage)

    @torch.jit.export
    def embed_mel(self, mel: Tensor) -> Tensor:
        """``(embed_dim,)`` unit-length embedding of ``mel (T, n_mels)`` by sliding windows."""
        return embed_windows(self.model, mel, self.seg_len)

    def forward(self, wav: Tensor) -> Tensor:
        if not self.partials:
            return self.embed_mel(self.features(wav))
        trimmed = self.speech(wav)
        padded, starts = self.partial_layout(trimmed.size(0))
        mel = self.log_mel(F.pad(trimmed, (0, padded - trimmed.size(0))))  # (T, n_mels)
        return embed_windows_at(self.model, mel, starts, self.partial_frames)


# ---- from a checkpoint to an exported bundle ----------------------------------------------------


def embedding_module(state: dict[str, Any]) -> EmbeddingModule:
    """The eager ``EmbeddingModule`` of a loaded checkpoint (what ``export_model`` scripts)."""
    settings = checkpoint_settings(state)
    model = build_encoder(settings.model)
    model.load_state_dict(state["model"])
    return EmbeddingModule(model, settings.features, settings.vad, settings.seg_len, settings.windows)


README_TEXT = """\
dvector: exported speaker-embedding model (d-vector, GE2E)

dvector.pt is a TorchScript module. It needs only PyTorch, not the dvector package:

    import torch
    m = torch.jit.load("dvector.pt")
    emb = m(wav)        # wav: 1-D float32 torch tensor, mono, at {sample_rate} Hz
                        # emb: ({embed_dim},) float32, unit length

    score = float(m(wav_a) @ m(wav_b))   # cosine similarity of two utterances

Resample to {sample_rate} Hz first (e.g. torchaudio.functional.resample or soxr) and mix down to
mono. Inside the module: {front}, {mel}, {windows}, one unit-length embedding per window, averaged and normalised again. If the VAD
finds (almost) no speech, the whole input is embedded; audio shorter than {min_samples} samples
raises ValueError. Also available: m.features(wav) -> (frames, {n_mels}) log-mel after VAD,
m.embed_mel(mel) -> ({embed_dim},), and m.sample_rate, m.embed_dim, m.seg_len.

dvector.json records the settings, the source checkpoint and its training step; the same record
is stored inside dvector.pt (torch.jit.load(path, _extra_files={{"dvector.json": ""}})).
"""


def readme_phrases(features: FeatureConfig, windows: WindowConfig, seg_len: int) -> Dict[str, str]:
    """How README.txt words the front end, features and windows (a default export's text as it always was)."""
    front = "energy VAD trimming"
    if features.raise_to_dbfs != 0.0:
        front = f"the level raised to {features.raise_to_dbfs:g} dBFS\nwhen quieter, " + front
    mel = f"log-mel ({features.n_mels} mels)" if features.compression == "log" else f"mel power ({features.n_mels} mels)"
    text = f"windows of {seg_len} frames\nwith 50% overlap"
    if windows.layout == "partials":
        text = (f"Resemblyzer's partial windows\n({windows.frames} frames every {windows.step_frames(features)}, "
                "over the speech zero-padded to the last one's end)")
    return {"front": front, "mel": mel, "windows": text}


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


def export_record(state: dict[str, Any], source: Path, hop: int) -> Dict[str, Any]:
    """What an export records about itself (``dvector.json``): settings, source, step, versions.

    Shared by the TorchScript and the ONNX export (which overrides ``format`` and ``model_file``).
    """
    settings = checkpoint_settings(state)
    model_cfg, features, vad, L = settings.model, settings.features, settings.vad, settings.seg_len
    meta: Dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model_file": MODEL_FILE,
        "sample_rate": features.sample_rate,
        "embed_dim": model_cfg.embed_dim,
        "n_mels": features.n_mels,
        "seg_len": L,
        "hop": hop,
        "features": features.to_dict(),
        "vad": vad.to_dict(),
        "model": model_cfg.to_dict(),
        "train": state.get("train_config"),
        "defaulted": settings.defaulted,
        "source_checkpoint": str(source.resolve()),
        "step": int(state.get("step", 0)),
        "best_eer": state.get("best_eer"),
        "dvector_version": VERSION,
        "torch_version": torch.__version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if settings.windows != WindowConfig():  # recorded where it matters; a default record stays as it was
        meta["window_config"] = settings.windows.to_dict()
    return meta


def export_model(checkpoint_or_run: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Script the checkpoint's embedding chain into ``out_dir/dvector.pt``; returns that path.

    Also writes ``out_dir/dvector.json`` (settings, source, step, versions) and ``README.txt``.
    A run folder exports ``checkpoints/best.pt`` when it has one, else ``checkpoints/latest.pt``.
    ``out_dir`` is checked before the work; each file is written atomically, and a failure to write
    (a full disk, say) is one ``DvectorError`` line (the module is saved to memory first: torch's
    writer aborts the process when a file write fails).
    """
    source, state = load_model_checkpoint(checkpoint_or_run)
    out = output_folder(out_dir)
    settings = checkpoint_settings(state)
    model_cfg, features, L = settings.model, settings.features, settings.seg_len
    module = embedding_module(state)
    scripted = script_module(module)

    meta = export_record(state, source, module.hop)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, buffer, _extra_files={META_FILE: json_text(meta, indent=2)})
    with outputs_together(out / MODEL_FILE, out / META_FILE, out / README_FILE):
        target = write_output(out / MODEL_FILE, buffer.getvalue())
        meta["sha256"] = sha256_file(target)
        write_output(out / META_FILE, json_text(meta, indent=2))
        write_output(out / README_FILE, README_TEXT.format(
            sample_rate=features.sample_rate, embed_dim=model_cfg.embed_dim, n_mels=features.n_mels,
            min_samples=module.min_samples, **readme_phrases(settings.features, settings.windows, L)))
    return target
