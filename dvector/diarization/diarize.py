"""Speaker diarization ("who spoke when") with a trained d-vector model.

The recipe of Wang et al. 2018, "Speaker Diarization with LSTM", with a resegmentation pass:

1. speech: the project's energy VAD (``signal.vad``, the model's own ``vad_config``) marks 10 ms
   frames as speech; contiguous speech frames are regions;
2. window d-vectors: inside each region, windows of ``window_s`` (1.5 s) every ``hop_s`` (0.75 s),
   plus one ending at the region's end (a region shorter than a window is one window), each through
   the network (unit length); regions under ``min_region_s`` get no window of their own;
3. clustering of the windows (``diarization.clustering``: spectral with eigengap or AHC; K given or estimated);
4. resegmentation, so that turn boundaries are not quantised to the window hop: every ``step_s``
   (0.1 s) of speech gets a short window of ``reseg_window_s`` around it, scored by cosine against
   each speaker's centroid (the mean of its windows); a Viterbi pass over the steps picks the best
   speaker sequence with a cost of ``switch_penalty`` per change of speaker; each speech frame takes
   the label of its step;
5. turns: runs of one label; gaps under ``fill_gap_s`` between two turns of the same speaker are
   filled (short pauses within a turn).

One speaker at a time (overlapped speech goes to one of them). ``diarize_files`` runs the
recipe over many files, writing ``OUT/<stem>.rttm`` atomically and listing the files it skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dvector.files import output_folder
from dvector.errors import DvectorError
from dvector.signal.features import log_mel, min_samples
from dvector.signal.vad import speech_frames
from dvector.diarization.clustering import ClusterConfig, centroids, cluster
from dvector.inference.embedder import Embedder, EmbedError, load
from dvector.diarization.rttm import Turn, write_rttm


@dataclass(frozen=True)
class DiarizeConfig:
    """The recipe's settings (seconds); ``cluster`` says how many speakers and how to find them."""

    window_s: float = 1.5
    hop_s: float = 0.75
    min_region_s: float = 0.3
    reseg_window_s: float = 1.0  # 0: no resegmentation (each frame takes its nearest window's label)
    step_s: float = 0.1
    switch_penalty: float = 1.0
    fill_gap_s: float = 0.5
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        for name in ("window_s", "hop_s", "step_s"):
            if not getattr(self, name) > 0:
                raise DvectorError(f"--{name[:-2].replace('_', '-')} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("min_region_s", "reseg_window_s", "switch_penalty", "fill_gap_s"):
            if getattr(self, name) < 0:
                raise DvectorError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class Diarization:
    turns: list[Turn]
    n_speakers: int
    duration_s: float
    n_windows: int
    note: str = ""  # e.g. why fewer speakers were found than ``--speakers`` asked for


def speakers_note(asked: int | None, found: int, windows: int) -> str:
    """Why a recording has another number of speakers than ``asked`` (``--speakers``); "" when it has that many."""
    if asked is None or found == asked:
        return ""
    if windows == 0:
        return f"--speakers {asked}, but no speech was found"
    if windows < asked:
        return (f"--speakers {asked}, but only {windows} window(s) of speech to cluster: {found} speaker(s) "
                "found")
    return f"--speakers {asked}, but {found} speaker(s) found: the others won no stretch of speech"


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` index ranges of the runs of True in a 1-D boolean mask."""
    padded = np.concatenate([[False], mask.astype(bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def window_ranges(start: int, end: int, width: int, hop: int) -> list[tuple[int, int]]:
    """Windows ``[s, s + width)`` every ``hop`` over ``[start, end)``, plus one ending at ``end``
    when the regular ones stop short of it; a range shorter than ``width`` is one window."""
    if end - start <= width:
        return [(start, end)]
    out = [(s, s + width) for s in range(start, end - width + 1, max(1, hop))]
    if out[-1][1] < end:
        out.append((end - width, end))
    return out


def viterbi(scores: np.ndarray, penalty: float) -> np.ndarray:
    """The label sequence (T,) maximising ``sum scores[t, label_t] - penalty * changes``; scores (T, K)."""
    T, K = scores.shape
    back = np.zeros((T, K), dtype=np.int64)
    total = scores[0].astype(np.float64).copy()
    keep = np.arange(K)
    for t in range(1, T):
        best = int(np.argmax(total))
        stay = total >= total[best] - penalty
        back[t] = np.where(stay, keep, best)
        total = np.maximum(total, total[best] - penalty) + scores[t]
    path = np.zeros(T, dtype=np.int64)
    path[-1] = int(np.argmax(total))
    for t in range(T - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


def _turns(labels: np.ndarray, frame_s: float, fill_gap_s: float, file_id: str) -> list[Turn]:
    """Turns from per-frame labels (-1: no speech); a silence under ``fill_gap_s`` between two runs
    of the same speaker joins them (a short pause inside a turn), nothing else is filled."""
    labels = labels.copy()
    for s, e in _runs(labels == -1):
        if 0 < s and e < len(labels) and (e - s) * frame_s < fill_gap_s and labels[s - 1] == labels[e]:
            labels[s:e] = labels[e]
    turns = [Turn(s * frame_s, e * frame_s, f"SPEAKER_{k:02d}", file_id)
             for k in sorted(set(labels.tolist()) - {-1}) for s, e in _runs(labels == k)]
    return sorted(turns)


def diarize_waveform(embedder: Embedder, wav: np.ndarray, cfg: DiarizeConfig, file_id: str = "audio") -> Diarization:
    """Who spoke when in ``wav`` (mono float32 at the model's rate). Long because the five steps of
    the recipe (module text) share their frame grids; split, each would re-derive them."""
    rate = embedder.sample_rate
    duration = wav.shape[0] / rate
    vad = replace(embedder.vad, max_pause_ms=0.0)  # the speech frames themselves, pauses not kept
    if vad.enabled:
        speech, frame_len = speech_frames(wav, rate, vad)  # (F,) bool, 10 ms frames
    else:
        frame_len = max(1, int(round(rate * vad.frame_ms / 1000)))
        speech = np.ones(-(-wav.shape[0] // frame_len), dtype=bool)
    frame_s = frame_len / rate
    with np.errstate(over="ignore", invalid="ignore"):
        mel = torch.from_numpy(log_mel(embedder.level(wav), embedder.features))  # (T, n_mels), frame t at t * hop
    mel_s = embedder.features.hop_length / rate
    T = mel.size(0)

    def to_mel(seconds: float) -> int:
        return int(min(T, max(0, round(seconds / mel_s))))

    regions = [(s * frame_s, e * frame_s) for s, e in _runs(speech)]
    width, hop = max(1, round(cfg.window_s / mel_s)), max(1, round(cfg.hop_s / mel_s))
    ranges = [r for a, b in regions if b - a >= cfg.min_region_s
              for r in window_ranges(to_mel(a), max(to_mel(b), to_mel(a) + 1), width, hop)]
    if not ranges:
        return Diarization([], 0, duration, 0, speakers_note(cfg.cluster.speakers, 0, 0))
    vectors = embedder.window_vectors(mel, ranges)  # (N, D)
    labels = cluster(vectors, cfg.cluster)  # (N,)
    K = int(labels.max()) + 1
    centres_of = centroids(vectors, labels)  # (K, D) unit means; labels are 0..K-1

    frame_labels = np.full(speech.shape[0], -1, dtype=np.int64)
    centres = np.array([(s + e) / 2 * mel_s for s, e in ranges])  # window centres, seconds
    steps: list[tuple[int, int, int]] = []  # (first frame, end frame, region index) of each step
    reseg_width = max(1, round(cfg.reseg_window_s / mel_s))
    step_frames = max(1, round(cfg.step_s / frame_s))
    for r, (s, e) in enumerate(_runs(speech)):
        steps += [(f, min(f + step_frames, e), r) for f in range(s, e, step_frames)]
    mids = np.array([(f + g) / 2 * frame_s for f, g, _ in steps])  # step centres, seconds
    if K == 1 or cfg.reseg_window_s == 0:
        step_labels = labels[np.abs(mids[:, None] - centres[None, :]).argmin(axis=1)] if K > 1 else \
            np.zeros(len(steps), dtype=np.int64)
    else:
        fine = []
        for f, g, r in steps:  # a window of reseg_width frames around the step, inside its region
            a, b = to_mel(regions[r][0]), max(to_mel(regions[r][1]), to_mel(regions[r][0]) + 1)
            start = min(max(a, to_mel((f + g) / 2 * frame_s) - reseg_width // 2), max(a, b - reseg_width))
            fine.append((start, min(b, start + reseg_width)))
        scores = embedder.window_vectors(mel, fine) @ centres_of.T  # (steps, K) cosine
        step_labels = viterbi(scores, cfg.switch_penalty)
    for (f, g, _), k in zip(steps, step_labels):
        frame_labels[f:g] = k
    order = list(dict.fromkeys(step_labels.tolist()))  # the speakers left, by first appearance
    lookup = np.full(K, -1, dtype=np.int64)
    lookup[order] = np.arange(len(order))
    frame_labels = np.where(frame_labels >= 0, lookup[np.maximum(frame_labels, 0)], -1)
    return Diarization(_turns(frame_labels, frame_s, cfg.fill_gap_s, file_id), len(order), duration, len(ranges),
                       speakers_note(cfg.cluster.speakers, len(order), len(ranges)))


@dataclass
class DiarizeReport:
    written: list[tuple[str, Path, Diarization]] = field(default_factory=list)  # (input, rttm, result)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)


def diarize_files(model: str | os.PathLike[str] | Embedder, inputs: Sequence[str | os.PathLike[str]],
                  out_dir: str | os.PathLike[str], cfg: DiarizeConfig, threads: int | None = None,
                  on_start: Callable[[int], Any] | None = None, on_item: Callable[[str], Any] | None = None,
                  ) -> DiarizeReport:
    """Diarize each audio file of ``inputs`` into ``out_dir/<stem>.rttm``; a file that cannot be read
    (or shares its stem with an earlier input) is skipped with its reason, the others still done."""
    if not inputs:
        raise DvectorError("give at least one audio file to diarize")
    out = output_folder(out_dir)
    embedder = model if isinstance(model, Embedder) else load(model, threads=threads)
    report = DiarizeReport()
    seen: dict[str, str] = {}
    if on_start:
        on_start(len(inputs))
    for raw in inputs:  # the embedder runs its windows with its own threads (``threads`` when it loads here)
        name = os.fspath(raw)
        stem = Path(name).stem
        try:
            if stem in seen:
                raise EmbedError(name, f"same file name as {seen[stem]} (both would write {stem}.rttm)")
            seen[stem] = name
            wav = embedder.waveform(name)
            if wav.shape[0] < min_samples(embedder.features):  # what log_mel needs (the embedder's check)
                raise EmbedError(name, "too short to analyse")
            result = diarize_waveform(embedder, wav, cfg, file_id=stem)
            report.written.append((name, write_rttm(out / f"{stem}.rttm", result.turns, stem), result))
        except EmbedError as exc:
            report.skipped.append((name, exc.reason))
        except OSError as exc:
            report.skipped.append((name, f"cannot write its RTTM ({exc})"))
        if on_item:
            on_item(name)
    return report


@dataclass
class DiarizeRun:
    report: DiarizeReport
    config: DiarizeConfig
    note: str | None = None  # e.g. where the AHC threshold came from, when it is the default


def run_diarize(model: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]],
                out_dir: str | os.PathLike[str], speakers: int | None = None, min_speakers: int = 2,
                max_speakers: int = 8, method: str = "spectral", threshold: float | None = None,
                threads: int | None = None, on_start: Callable[[int], Any] | None = None,
                on_item: Callable[[str], Any] | None = None, **settings: float) -> DiarizeRun:
    """``dvector diarize``: the settings checked, the model loaded, ``diarize_files`` run.

    ``settings``: the ``DiarizeConfig`` fields in seconds (``window_s``, ``hop_s``...). AHC with the
    number of speakers unknown cuts at ``threshold`` (spectral with ``min_speakers`` 1 tests one
    voice against it), by default the EER threshold that ``dvector eval`` stored for ``model`` (a
    cosine calibrated on data).
    """
    note = None
    if (method == "ahc" or min_speakers == 1) and speakers is None and threshold is None:
        from dvector.evaluation.results import decision_threshold

        stored = decision_threshold(model)
        threshold, note = stored.value, stored.note
    bounds = dict(speakers=speakers, min_speakers=min_speakers, max_speakers=max_speakers)
    cluster_cfg = ClusterConfig(method=method, **bounds, **({"threshold": threshold} if threshold is not None else {}))
    cfg = DiarizeConfig(cluster=cluster_cfg, **settings)
    output_folder(out_dir)  # before the model is loaded
    embedder = load(model, threads=threads)
    report = diarize_files(embedder, inputs, out_dir, cfg, threads=threads, on_start=on_start, on_item=on_item)
    return DiarizeRun(report, cfg, note)
