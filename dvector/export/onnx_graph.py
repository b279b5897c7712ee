"""ONNX export: waveform in, unit-length d-vector out, front-end and VAD inside the graph, no custom ops.

``dvector export RUN --format onnx -o DIR`` writes ``DIR/dvector.onnx`` (opset 17, standard operators
only, checked with ``onnx.checker``), ``DIR/dvector.onnx.json`` (the TorchScript export's record with
format "dvector-onnx") and, with ``--quantize int8``, ``DIR/dvector.int8.onnx``
(``onnxruntime.quantization.quantize_dynamic``: the encoder's MatMul/Gemm/LSTM/Conv weights in int8;
the front-end stays float32). Input ``wav``: a 1-D
float32 waveform at the recorded sample rate, any length of at least one analysis window; output
``embedding``: ``(embed_dim,)``, unit length. The model's ``metadata_props`` hold sample_rate,
embed_dim, n_mels, seg_len, model, dvector_version and what the VAD does.

The graph (``OnnxEmbedding``), the same chain as the TorchScript module, written without
data-dependent Python control flow so that one traced graph serves every input length:

1. VAD (``GraphVad``): the project's adaptive-floor energy VAD as closed-form tensor operations.
   Frame energies, the 10th/95th percentiles (a sort), the noise-floor threshold rule and the
   "undecided" rule are the same. The floor recurrence ``floor[i] = min(e[i], floor[i-1] + rise)``
   becomes its unrolled form ``floor[i] = i * rise + min(initial + rise, min_{j<=i}(e[j] - j * rise))``
   in float64, the running minimum taken by doubling over the last ``2^K`` frames, where ``K`` makes
   ``2^K * rise`` exceed the 140 dB between the energy floor (-100 dB) and +40 dBFS (frame energies
   are capped there for the floor only): exact, not an approximation, for any audio under +40 dBFS.
   The numba kernel accumulates the same sum in float32 step by step, so a frame whose energy lies
   within rounding distance of its threshold can fall the other way. Short-burst removal is a morphological
   opening (erosion then dilation by ``min_speech`` frames, which removes exactly the runs shorter
   than it), pre-roll/hang-over a dilation, and pause shortening a windowed "any speech in the last
   ``max_pause`` frames" test: all equal to the kernels. As in the TorchScript module, where the VAD
   keeps less than one analysis window the whole input is embedded.
2. log-mel (``GraphLogMel``): reflect padding, the windowed DFT as a strided ``Conv`` with cosine and
   sine kernels (ONNX has no complex tensors), power, the project's mel filterbank as a ``MatMul``,
   log with the same floor: the numpy front-end's values up to float32 summation order.
3. windows: starts ``0, hop, 2 hop, ...`` of ``L`` frames, and the extra window ending at the last
   frame, computed for every candidate start with weight 1 for a real window and 0 otherwise (no
   loops); the encoder runs on all of them at once, and the weighted sum is normalised (the
   direction of the mean of ``embed``);
4. an utterance of ``T < L`` frames is one window, run as ``dvector.load(...).embed`` runs it (an
   LSTM's zero-padded to ``L`` with ``lengths = T``, a convolutional encoder's as it is); the graph
   computes it always (one more window) and selects it with ``Where`` when ``T < L``.

Exported with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): the dynamo
exporter cannot export the encoders' ``assert bool(tensor)`` checks on ``lengths``
(GuardOnDataDependentSymNode), while tracing evaluates them once and emits ``nn.LSTM`` as one ONNX
``LSTM`` node.
"""

from __future__ import annotations

import importlib.util

import copy
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvector.config import NORM_EPS, VERSION, FeatureConfig, VadConfig
from dvector.errors import DvectorError
from dvector.files import atomic_write, sha256_file
from dvector.signal.features import analysis_window, mel_filterbank, min_samples
from dvector.signal.vad import FLOOR_PERCENTILE, LOUD_PERCENTILE, _frames
from dvector.training.checkpoint import load_checkpoint
from dvector.inference.bundle import checkpoint_settings, find_checkpoint
from dvector.export.torchscript import embedding_module, export_record

ONNX_FILE = "dvector.onnx"
INT8_FILE = "dvector.int8.onnx"
RECORD_FILE = "dvector.onnx.json"  # not dvector.json: a TorchScript export may share the folder
OPSET = 17
ENERGY_FLOOR_DB = -100.0  # 10 log10(1e-10): the quietest frame energy the VAD computes
ENERGY_CAP_DB = 40.0  # frame energies above this are capped when tracking the noise floor
MAX_DOUBLINGS = 32  # a floor that never rises needs the minimum over the whole file: 2^32 frames
VAD_NOTE = ("adaptive-floor energy VAD of dvector.signal.vad in closed form (same percentiles, threshold rule, "
            "runs, pre-roll, hang-over, pauses); noise floor in float64 instead of the kernel's float32 recurrence")


def install_hint() -> str:
    return "the ONNX export needs onnx, onnxscript and onnxruntime: pip install 'dvector[onnx]'"


# ---- the graph ----------------------------------------------------------------------------------


class GraphLogMel(nn.Module):
    """``dvector.signal.features.log_mel`` as ONNX-friendly ops: ``(n,) -> (1 + n // hop, n_mels)``."""

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        n_fft = cfg.fft_size
        self.hop = cfg.hop_length
        self.half = n_fft // 2
        self.log_floor = float(cfg.log_floor)
        k = np.arange(n_fft // 2 + 1)[:, None] * np.arange(n_fft)[None, :]  # (F, n_fft)
        angle = 2.0 * np.pi * (k % n_fft) / n_fft
        window = analysis_window(cfg).astype(np.float64)
        kernels = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window])  # (2F, n_fft)
        self.register_buffer("dft", torch.from_numpy(kernels.astype(np.float32)).unsqueeze(1))  # (2F, 1, n_fft)
        self.register_buffer("filterbank", torch.from_numpy(mel_filterbank(cfg).copy()))  # (F, n_mels)

    def forward(self, wav: Tensor) -> Tensor:
        padded = F.pad(wav.view(1, 1, -1), (self.half, self.half), mode="reflect")  # (1, 1, n + 2 half)
        spec = F.conv1d(padded, self.dft, stride=self.hop)[0]  # (2F, frames)
        re, im = spec.chunk(2, dim=0)  # (F, frames) each
        power = re * re + im * im
        mel = torch.matmul(power.transpose(0, 1), self.filterbank)  # (frames, n_mels)
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
        """``(frames,)`` float64 dB of each ``frame_len`` frame; the last, partial frame counts too."""
        n = wav.size(0)
        fl = self.frame_len
        count = (n + fl - 1) // fl
        squares = torch.cat([wav * wav, wav.new_zeros(fl)])[: count * fl].to(torch.float64).reshape(-1, fl)
        sizes = torch.clamp(n - torch.arange(count) * fl, max=fl).to(torch.float64)  # (frames,)
        return 10.0 * torch.log10(squares.sum(dim=1) / sizes + 1e-10)

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
    """``forward(wav (n,) float32) -> (embed_dim,)`` unit length: VAD, log-mel, windows, encoder, pooling."""

    def __init__(self, encoder: nn.Module, features: FeatureConfig, vad: VadConfig, seg_len: int) -> None:
        super().__init__()
        self.encoder = exportable(encoder.eval())
        self.vad = GraphVad(vad, features.sample_rate) if vad.enabled else None
        self.log_mel = GraphLogMel(features)
        self.min_samples = min_samples(features)
        self.seg_len = int(seg_len)
        self.hop = max(1, self.seg_len // 2)
        self.n_mels = features.n_mels
        self.pad_short = isinstance(getattr(encoder, "lstm", None), nn.LSTM)
        self.eval()

    def forward(self, wav: Tensor) -> Tensor:
        wav = wav.to(torch.float32)
        if self.vad is not None:
            wav = wav[torch.nonzero(self.vad(wav, self.min_samples)).flatten()]
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
    return OnnxEmbedding(eager.model, settings.features, settings.vad, settings.seg_len)


def export_onnx(checkpoint_or_run: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                quantize: str | None = None) -> list[Path]:
    """Write ``out_dir/dvector.onnx`` (and ``dvector.int8.onnx`` with ``quantize="int8"``); returns the paths."""
    onnx = _require_onnx()
    if quantize not in (None, "int8"):
        raise DvectorError(f"--quantize takes int8, got {quantize!r}")
    source = find_checkpoint(checkpoint_or_run)
    state = load_checkpoint(source)
    settings = checkpoint_settings(state)
    module = graph_module(state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / ONNX_FILE
    example = torch.randn(settings.features.sample_rate * 3, generator=torch.Generator().manual_seed(0)) * 0.1
    with atomic_write(target) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the encoders' asserts, the exporter's deprecation
        torch.onnx.export(module, (example,), str(tmp), dynamo=False, opset_version=OPSET, input_names=["wav"],
                          output_names=["embedding"], dynamic_axes={"wav": {0: "samples"}})
        model = onnx.load(str(tmp))
        record = export_record(state, source, module.hop)
        meta = {"sample_rate": settings.features.sample_rate, "embed_dim": settings.model.embed_dim,
                "n_mels": settings.features.n_mels, "seg_len": settings.seg_len, "model": settings.model.name,
                "arch": settings.model.arch, "dvector_version": VERSION, "step": record["step"],
                "vad": VAD_NOTE if settings.vad.enabled else "none", "min_samples": module.min_samples}
        share_weights(model)
        onnx.helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
        model.doc_string = "dvector speaker embedding: wav (samples,) float32 -> embedding (embed_dim,), unit length"
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
    written = [target]
    record.update({"format": "dvector-onnx", "model_file": ONNX_FILE, "opset": OPSET, "sha256": sha256_file(target)})
    if quantize == "int8":
        written.append(quantize_int8(target, out / INT8_FILE))
        record["int8_file"] = INT8_FILE
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return written


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


def quantize_int8(float_model: Path, target: Path) -> Path:
    """``quantize_dynamic`` of the encoder's nodes (int8 weights); the front-end and VAD stay float32.

    An LSTM encoder's second call (the one-window path of an utterance under ``L`` frames) has its own
    copy of the LSTM weights from the exporter and stays float: quantising one LSTM weight read by two
    nodes gives wrong outputs, so ``share_weights`` shares Conv weights only.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(float_model)).graph
    front = [node.name for node in graph.node if not node.name.startswith("/encoder")]  # also /encoder_1/
    # quantize_dynamic logs a suggestion to run its pre-processing first; that step's symbolic shape
    # inference fails on this graph (data-dependent lengths), and dynamic quantisation does not need it
    logging.disable(logging.WARNING)
    try:
        with atomic_write(target) as tmp:
            quantize_dynamic(str(float_model), str(tmp), weight_type=QuantType.QInt8, nodes_to_exclude=front,
                             op_types_to_quantize=["MatMul", "Gemm", "LSTM", "Conv"])
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
