"""ONNX export: waveform in, unit-length d-vector out, front-end and VAD inside the graph, no custom ops.

``dvector export RUN --format onnx -o DIR`` writes ``DIR/dvector.onnx`` (opset 17, standard operators
only, checked with ``onnx.checker``), ``DIR/dvector.onnx.json`` (the TorchScript export's record with
format "dvector-onnx") and, with ``--quantize int8``, ``DIR/dvector.int8.onnx``
(``onnxruntime.quantization.quantize_dynamic``: the encoder's MatMul/Gemm/LSTM/Conv weights in int8;
the front-end stays float32, and so does the encoder's first layer on mel power features). Input ``wav``:
a 1-D float32 waveform at the recorded sample rate, any length of at least one analysis window; output
``embedding``: ``(embed_dim,)``, unit length. The model's ``metadata_props`` hold sample_rate,
embed_dim, n_mels, seg_len, model, dvector_version and what the VAD does; ``features`` and ``windows``
(JSON) where those settings are not the defaults (the Resemblyzer import's).

The graph (``OnnxEmbedding``), the same chain as the TorchScript module, written without
data-dependent Python control flow so that one traced graph serves every input length:

1. level (where ``FeatureConfig.raise_to_dbfs`` asks), VAD and log-mel: ``dvector.export.onnx_frontend``
   (``GraphLevel``, ``GraphVad``, ``GraphLogMel``), each step's correspondence to the package's numpy and
   numba code told there. As in the TorchScript module, where the VAD keeps less than one analysis window
   the whole (raised) input is embedded.
2. windows, ``"overlap"`` (dvector's): starts ``0, hop, 2 hop, ...`` of ``L`` frames, and the extra window
   ending at the last frame, computed for every candidate start with weight 1 for a real window and 0
   otherwise (no loops); the encoder runs on all of them at once, and the weighted sum is normalised (the
   direction of the mean of ``embed``). An utterance of ``T < L`` frames is one window, run as
   ``dvector.load(...).embed`` runs it (an LSTM's zero-padded to ``L`` with ``lengths = T``, a convolutional
   encoder's as it is); the graph computes it always (one more window) and selects it with ``Where``.
3. windows, ``"partials"`` (Resemblyzer's, an imported encoder's): the speech zero-padded to the end of its
   last partial window (``onnx_frontend.partial_layout``: the length and the starts from the speech's length
   alone), its features, the windows at those starts (all ``frames`` long), their mean normalised.

Exported with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): the dynamo
exporter cannot export the encoders' ``assert bool(tensor)`` checks on ``lengths``
(GuardOnDataDependentSymNode), while tracing evaluates them once and emits ``nn.LSTM`` as one ONNX
``LSTM`` node.
"""

from __future__ import annotations

import importlib.util

import copy
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvector.config import NORM_EPS, VERSION, FeatureConfig, VadConfig, WindowConfig
from dvector.errors import DvectorError
from dvector.files import json_text, output_file, output_folder, outputs_together, sha256_file, write_output
from dvector.signal.features import min_samples
from dvector.inference.bundle import checkpoint_settings, load_model_checkpoint
from dvector.export.onnx_frontend import GraphLevel, GraphLogMel, GraphVad, partial_layout
from dvector.export.torchscript import embedding_module, export_record

__all__ = ["GraphVad", "OnnxEmbedding", "export_onnx", "onnx_embed", "onnx_session", "quantize_int8"]

ONNX_FILE = "dvector.onnx"
INT8_FILE = "dvector.int8.onnx"
RECORD_FILE = "dvector.onnx.json"  # not dvector.json: a TorchScript export may share the folder
OPSET = 17
VAD_NOTE = ("adaptive-floor energy VAD of dvector.signal.vad in closed form (same percentiles, threshold rule, "
            "runs, pre-roll, hang-over, pauses); noise floor in float64 instead of the kernel's float32 recurrence")


def install_hint() -> str:
    return "the ONNX export needs onnx, onnxscript and onnxruntime: pip install 'dvector[onnx]'"


# ---- the graph ----------------------------------------------------------------------------------


class UnrolledLSTM(nn.Module):
    """``nn.LSTM`` (batch first) with ``proj_size > 0`` as plain MatMuls unrolled over time.

    ONNX's ``LSTM`` operator has no projection, so the exporter refuses such an LSTM (the "paper"
    preset). The windows the graph feeds the encoder always have ``L`` frames, so the time axis is
    static and the recurrence unrolls into ``L`` steps per layer: the same gate arithmetic as
    ``torch.nn.LSTM`` (gates i, f, g, o; ``h = (o * tanh(c)) W_hr^T``). Returns ``(output, None)``.
    """

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        if lstm.bidirectional or not lstm.batch_first:
            raise DvectorError("the ONNX export unrolls only unidirectional batch-first LSTMs")
        self.layers = lstm.num_layers
        self.hidden = lstm.hidden_size
        self.proj = lstm.proj_size
        for k in range(self.layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
                self.register_buffer(f"{name}_l{k}", getattr(lstm, f"{name}_l{k}").detach().clone())

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        B, T = x.size(0), int(x.shape[1])
        for k in range(self.layers):
            w_hh, w_hr = getattr(self, f"weight_hh_l{k}"), getattr(self, f"weight_hr_l{k}")
            inputs = torch.matmul(x, getattr(self, f"weight_ih_l{k}").t()) + getattr(self, f"bias_ih_l{k}") \
                + getattr(self, f"bias_hh_l{k}")  # (B, T, 4H)
            h = x.new_zeros(B, self.proj)
            c = x.new_zeros(B, self.hidden)
            outs = []
            for t in range(T):
                i, f, g, o = (inputs[:, t] + torch.matmul(h, w_hh.t())).chunk(4, dim=1)  # (B, H) each
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.matmul(torch.sigmoid(o) * torch.tanh(c), w_hr.t())  # (B, P)
                outs.append(h)
            x = torch.stack(outs, dim=1)  # (B, T, P)
        return x, None


def exportable(encoder: nn.Module) -> nn.Module:
    """``encoder`` with every projected ``nn.LSTM`` replaced by an ``UnrolledLSTM`` (a copy; the rest shared)."""
    lstm = getattr(encoder, "lstm", None)
    if not isinstance(lstm, nn.LSTM) or lstm.proj_size == 0:
        return encoder
    twin = copy.copy(encoder)  # a shallow copy: the other submodules are the same objects
    twin._modules = dict(encoder._modules)
    twin.lstm = UnrolledLSTM(lstm)
    return twin


class OnnxEmbedding(nn.Module):
    """``forward(wav (n,) float32) -> (embed_dim,)`` unit length: level, VAD, log-mel, windows, encoder, pooling."""

    def __init__(self, encoder: nn.Module, features: FeatureConfig, vad: VadConfig, seg_len: int,
                 windows: WindowConfig | None = None) -> None:
        super().__init__()
        windows = windows or WindowConfig()
        self.encoder = exportable(encoder.eval())
        self.level = GraphLevel(features) if features.raise_to_dbfs != 0.0 else None
        self.vad = GraphVad(vad, features.sample_rate) if vad.enabled else None
        self.log_mel = GraphLogMel(features)
        self.min_samples = min_samples(features)
        self.seg_len = int(seg_len)
        self.hop = max(1, self.seg_len // 2)
        self.n_mels = features.n_mels
        self.pad_short = isinstance(getattr(encoder, "lstm", None), nn.LSTM)
        self.partials = windows if windows.layout == "partials" else None
        self.partial_step = windows.step_frames(features) if self.partials is not None else 0
        self.hop_length = features.hop_length
        self.eval()

    def forward(self, wav: Tensor) -> Tensor:
        wav = wav.to(torch.float32)
        if self.level is not None:
            wav = self.level(wav)
        if self.vad is not None:
            wav = wav[torch.nonzero(self.vad(wav, self.min_samples)).flatten()]
        if self.partials is not None:
            return self.partial_embedding(wav)
        mel = self.log_mel(wav)  # (T, n_mels)
        T, L = mel.size(0), self.seg_len
        starts = torch.arange(0, T, self.hop)  # (C,): candidates, a real window where it fits
        real = (starts + L <= T) | (starts == 0)
        last = (starts * real.to(torch.int64)).max()
        extra = torch.clamp(starts[:1] * 0 + (T - L), min=0)  # (1,): the window ending at the last frame
        needed = (last + L < T) & (extra > 0)
        starts = torch.cat([starts, extra])  # (B,)
        weights = torch.cat([real, needed]).to(torch.float32)  # (B,)
        padded = torch.cat([mel, mel.new_zeros(L, self.n_mels)])  # (T + L, n_mels): never read past it
        windows = padded[starts.view(-1, 1) + torch.arange(L).view(1, -1)]  # (B, L, n_mels)
        pooled = (self.encoder(windows) * weights.view(-1, 1)).sum(dim=0)  # (D,)
        short = self.short_embedding(mel, padded, starts[:1] * 0 + T)  # (D,): used when T < L
        out = torch.where(starts[:1] * 0 + T < L, short, pooled)  # (D,)
        return F.normalize(out, p=2.0, dim=0, eps=NORM_EPS)

    def short_embedding(self, mel: Tensor, padded: Tensor, T: Tensor) -> Tensor:
        """The one window of an utterance under ``L`` frames, as ``dvector.load(...).embed`` runs it: an
        LSTM gets it zero-padded to ``L`` with its length (padding is ignored exactly, and an unrolled
        LSTM needs ``L`` frames); a convolutional encoder gets the frames as they are. ``(D,)``."""
        L = self.seg_len
        if self.pad_short:
            return self.encoder(padded[:L].unsqueeze(0), torch.clamp(T, max=L))[0]
        return self.encoder(mel[:L].unsqueeze(0))[0]

    def partial_embedding(self, speech: Tensor) -> Tensor:
        """Resemblyzer's partials: ``speech (n,)`` zero-padded to the end of its last window, its features, the
        windows (each ``frames`` long, so no short path), their mean normalised: ``(D,)``."""
        frames, hop = self.partials.frames, self.hop_length
        n = torch.zeros((), dtype=torch.int64) + speech.size(0)  # 0-d, traced: the length of this input
        padded, starts = partial_layout(n, hop, self.partials, self.partial_step)  # 0-d, (B,)
        longer = torch.cat([speech, speech.new_zeros((frames + 1) * hop)])  # at least ``padded`` long
        mel = self.log_mel(longer[torch.arange(padded)])  # (T, n_mels): of exactly ``padded`` samples
        windows = mel[starts.view(-1, 1) + torch.arange(frames).view(1, -1)]  # (B, frames, n_mels)
        pooled = self.encoder(windows).mean(dim=0)  # (D,)
        return F.normalize(pooled, p=2.0, dim=0, eps=NORM_EPS)


# ---- from a checkpoint to dvector.onnx ----------------------------------------------------------


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise DvectorError(install_hint()) from exc
    if importlib.util.find_spec("onnxruntime") is None:  # the parity check and int8 need it
        raise DvectorError(install_hint())
    return onnx


def graph_module(state: dict[str, Any]) -> OnnxEmbedding:
    """The ``OnnxEmbedding`` of a loaded checkpoint (what ``export_onnx`` traces)."""
    eager = embedding_module(state)
    settings = checkpoint_settings(state)
    return OnnxEmbedding(eager.model, settings.features, settings.vad, settings.seg_len, settings.windows)


def export_onnx(checkpoint_or_run: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                quantize: str | None = None) -> list[Path]:
    """Write ``out_dir/dvector.onnx`` (and ``dvector.int8.onnx`` with ``quantize="int8"``); returns the paths.

    ``out_dir`` is checked before the work; the graph is made in memory and each file written
    atomically, a failure to write (a full disk, say) one ``DvectorError`` line."""
    onnx = _require_onnx()
    if quantize not in (None, "int8"):
        raise DvectorError(f"--quantize takes int8, got {quantize!r}")
    source, state = load_model_checkpoint(checkpoint_or_run)
    out = output_folder(out_dir)
    settings = checkpoint_settings(state)
    module = graph_module(state)
    target = out / ONNX_FILE
    example = torch.randn(settings.features.sample_rate * 3, generator=torch.Generator().manual_seed(0)) * 0.1
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the encoders' asserts, the exporter's deprecation
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["wav"],
                          output_names=["embedding"], dynamic_axes={"wav": {0: "samples"}})
    model = onnx.load_model_from_string(buffer.getvalue())
    record = export_record(state, source, module.hop)
    meta = {"sample_rate": settings.features.sample_rate, "embed_dim": settings.model.embed_dim,
            "n_mels": settings.features.n_mels, "seg_len": settings.seg_len, "model": settings.model.name,
            "arch": settings.model.arch, "dvector_version": VERSION, "step": record["step"],
            "vad": VAD_NOTE if settings.vad.enabled else "none", "min_samples": module.min_samples,
            **front_end_note(settings.features, settings.windows)}
    share_weights(model)
    onnx.helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    model.doc_string = "dvector speaker embedding: wav (samples,) float32 -> embedding (embed_dim,), unit length"
    onnx.checker.check_model(model, full_check=True)
    with outputs_together(target, out / RECORD_FILE, *([out / INT8_FILE] if quantize == "int8" else [])):
        write_output(target, model.SerializeToString())
        written = [target]
        record.update({"format": "dvector-onnx", "model_file": ONNX_FILE, "opset": OPSET, "sha256": sha256_file(target)})
        if quantize == "int8":
            written.append(quantize_int8(target, out / INT8_FILE, settings.features.compression == "none"))
            record["int8_file"] = INT8_FILE
        write_output(out / RECORD_FILE, json_text(record, indent=2))
    return written


def front_end_note(features: FeatureConfig, windows: WindowConfig) -> dict[str, Any]:
    """The metadata entries for front-end options off their defaults (none for a default export)."""
    note: dict[str, Any] = {}
    if set(features.to_dict()) != set(FeatureConfig().to_dict()):  # to_dict leaves those options out at their defaults
        note["features"] = json.dumps(features.to_dict(), sort_keys=True)
    if windows != WindowConfig():
        note["windows"] = json.dumps(windows.to_dict(), sort_keys=True)
    return note


def share_weights(model: Any) -> None:
    """Point every Conv that reads an ``Identity`` copy of an initializer at the initializer itself, in place.

    The graph runs the encoder twice (the windows, and the one-window path of a short utterance); the
    exporter gives the second call its weights through ``Identity`` nodes, which ``quantize_dynamic``
    cannot quantise (it needs a Conv's weight to be an initializer).
    """
    inits = {init.name for init in model.graph.initializer}
    outputs = {out.name for out in model.graph.output}
    alias = {node.output[0]: node.input[0] for node in model.graph.node
             if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs}
    used = set()
    for node in model.graph.node:
        if node.op_type != "Conv":  # the quantiser's LSTM handling goes wrong on a weight two LSTMs share
            continue
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
                used.add(name)
    readers = {name for node in model.graph.node for name in node.input}
    dead = [node for node in model.graph.node
            if node.op_type == "Identity" and node.output[0] in used and node.output[0] not in readers]
    for node in dead:
        model.graph.node.remove(node)


QUANTIZED_OPS = ["MatMul", "Gemm", "LSTM", "Conv"]


def quantize_int8(float_model: Path, target: Path, float_first_layer: bool = False) -> Path:
    """``quantize_dynamic`` of the encoder's nodes (int8 weights); the front-end and VAD stay float32.

    ``float_first_layer`` keeps the encoder's first quantisable node (the one that reads the features) float
    too: for mel power features (``compression="none"``, the Resemblyzer import), whose dynamic range one
    int8 scale per input cannot hold (cosine to the float model about 0.5 with it quantised, > 0.99 without).

    An LSTM encoder's second call (the one-window path of an utterance under ``L`` frames) has its own
    copy of the LSTM weights from the exporter and stays float: quantising one LSTM weight read by two
    nodes gives wrong outputs, so ``share_weights`` shares Conv weights only.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(float_model)).graph
    front = [node.name for node in graph.node if not node.name.startswith("/encoder")]  # also /encoder_1/
    if float_first_layer:
        front += [node.name for node in graph.node if node.name.startswith("/encoder/")
                  and node.op_type in QUANTIZED_OPS][:1]
    # quantize_dynamic logs a suggestion to run its pre-processing first; that step's symbolic shape
    # inference fails on this graph (data-dependent lengths), and dynamic quantisation does not need it
    logging.disable(logging.WARNING)
    try:
        with output_file(target) as tmp:
            quantize_dynamic(str(float_model), str(tmp), weight_type=QuantType.QInt8, nodes_to_exclude=front,
                             op_types_to_quantize=QUANTIZED_OPS)
    finally:
        logging.disable(logging.NOTSET)
    return target


def onnx_session(path: str | os.PathLike[str], threads: int = 1) -> Any:
    """An onnxruntime CPU session for ``path`` (``threads`` intra-op threads)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DvectorError(install_hint()) from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_embed(session: Any, wav: np.ndarray) -> np.ndarray:
    """The embedding ``(D,)`` of mono float32 ``wav`` at the model's rate, by an onnxruntime session."""
    return session.run(None, {"wav": np.ascontiguousarray(wav, dtype=np.float32)})[0]
