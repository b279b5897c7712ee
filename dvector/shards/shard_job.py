"""What one shard's job is, whoever runs it: features for its utterances, then its bytes.

Owns :func:`process_chunk` (features for a chunk of utterances, in a worker), :class:`ShardContent`
(the one place that says what a shard's bytes are: its samples in plan order, its failures, its
tar and record) and :func:`build_one_shard` (a whole shard in one process: a Dask task), with the
process setup they share (:func:`keep_freed_memory`). The local build (:mod:`dvector.shards.build`,
chunks on a process pool, shards written by the parent) and the Dask build
(:mod:`dvector.shards.dask_build`, one task per shard) both import this module, never each other's
way round, so they agree on a shard's bytes by construction.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from dvector.config import BuildConfig, FeatureConfig, VadConfig
from dvector.errors import DvectorError
from dvector.files import display_path, write_json_atomic
from dvector.shards.build_folder import sidecar_path
from dvector.shards import reader
from dvector.shards.build_report import ShardTally
from dvector.shards.format import shard_name, write_shard
from dvector.shards.plan import PlannedUtterance, segment_bounds, segment_frames, segment_key
from dvector.signal.process import SkipUtterance, process_file
from dvector.signal.vad import warm_up

CHUNK_UTTERANCES = 16  # utterances per task: work is spread by utterance, not only by shard


def keep_freed_memory() -> bool:
    """Ask glibc to serve large allocations from a heap it keeps instead of mapping and unmapping
    memory for each one: every utterance allocates a few arrays of megabytes, and faulting their
    pages in afresh made feature extraction twice as slow (0.51 -> 0.22 s per hour of audio).
    A no-op (False) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = mallopt(M_MMAP_THRESHOLD, 256 << 20) and mallopt(M_TRIM_THRESHOLD, 1 << 30) and mallopt(M_TOP_PAD, 64 << 20)
    return bool(ok)


JobItem = tuple[str, str, str, int, str, float, float, float, str]


def job_items(shard: Sequence[PlannedUtterance], root_names: dict[str, str]) -> list[JobItem]:
    """A shard's utterances as :func:`process_chunk` takes them, in plan order."""
    return [(p.key, str(p.utterance.path), root_names[p.utterance.root], p.speaker_index, p.utterance.source,
             p.speed, p.utterance.start, p.utterance.end, p.utterance.command) for p in shard]


def process_chunk(items: list[JobItem], features: FeatureConfig, vad: VadConfig) -> list[tuple[str, Any, dict[str, Any]]]:
    """Features for a chunk of (key, path, root name, speaker index, source, speed, start, end, command);
    runs in a worker."""
    out = []
    for key, path, _root_name, _speaker_index, _source, speed, start, end, command in items:
        try:
            result = process_file(Path(path), features, vad, speed, start, end, command)
        except SkipUtterance as exc:
            out.append((key, None, {"reason": str(exc)}))
            continue
        except Exception as exc:  # a bug or an odd file must not stop a week-long build
            out.append((key, None, {"reason": f"unexpected error: {type(exc).__name__}: {exc}"}))
            continue
        meta = {
            "duration_s": round(result.duration_s, 4),
            "vad": round(result.vad_kept, 4),
            "input_rate": result.input_rate,
            "seconds": result.seconds,
        }
        if speed != 1.0:  # only on perturbed copies: samples as recorded are stored as before the option
            meta["speed"] = speed
        out.append((key, result.mel, meta))
    return out


NPY_HEADER_BYTES = 256  # at most, for a 2-D float16 array (np.save pads its header to 64 bytes; 128 in practice)


def fitting_segment(n_mels: int) -> int:
    """The longest segment (frames) of float16 mels of ``n_mels`` bands such that every segment
    :func:`~dvector.shards.plan.segment_bounds` cuts, its last included (up to 1.5 segments), makes a
    ``.mel.npy`` member that every reader takes (:data:`dvector.shards.reader.MAX_MEL_BYTES`): the
    build writes nothing its readers refuse. 64 MiB at 40 mels: about 2.3 hours a sample, segments of
    93 minutes."""
    return max(1, member_frames(n_mels) * 2 // 3)


def member_frames(n_mels: int) -> int:
    """The most frames of float16 mels of ``n_mels`` bands in one ``.mel.npy`` member that readers take."""
    return (reader.MAX_MEL_BYTES - NPY_HEADER_BYTES) // (2 * n_mels)


def _speaker_counts(samples: list[tuple[str, np.ndarray, dict]]) -> dict[str, list[int]]:
    counts: dict[str, list[int]] = {}
    for _, mel, meta in samples:
        entry = counts.setdefault(str(meta["speaker_index"]), [0, 0])
        entry[0] += 1
        entry[1] += int(mel.shape[0])
    return counts


class ShardContent:
    """One shard's samples, failures and counts, made from its utterances' results in plan order, and
    written (tar, then record) by :meth:`write`: the one place that says what a shard's bytes are, for
    the local build (results arrive by chunks) and a shard job on a cluster (one shard per job) alike."""

    def __init__(self, root_names: dict[str, str], by_key: dict[str, PlannedUtterance], segment: int = 0,
                 fail_fast: bool = False) -> None:
        self.root_names, self.by_key, self.fail_fast = root_names, by_key, fail_fast
        self.segment = segment  # frames per segment with --split-seconds (0: each utterance is one sample)
        self.samples: list[tuple[str, np.ndarray, dict]] = []
        self.failures: list[dict[str, str]] = []
        self.tally = ShardTally()

    def add(self, results: list[tuple[str, Any, dict[str, Any]]]) -> float:
        """Take one chunk's results; returns the seconds of audio they held."""
        audio_s = 0.0
        for key, mel, meta in results:
            planned = self.by_key[key]
            utt = planned.utterance
            if mel is None:
                self._failed(planned, meta["reason"])
                continue
            for stage, secs in meta.pop("seconds").items():
                self.tally.stage_s[stage] = self.tally.stage_s.get(stage, 0.0) + secs
            meta.update(speaker=planned.speaker, speaker_index=planned.speaker_index, root=self.root_names[utt.root],
                        source=utt.source, n_frames=int(mel.shape[0]))
            self._add_samples(key, mel, meta)
            audio_s += meta["duration_s"]
            self.tally.utterances_ok += 1
            self.tally.frames += int(mel.shape[0])
        self.tally.audio_s += audio_s
        return audio_s

    def _add_samples(self, key: str, mel: np.ndarray, meta: dict[str, Any]) -> None:
        """The utterance as one sample, or (with a segment length) one sample per segment: keyed
        ``KEYg000``, ``KEYg001``... with ``segment`` and ``segments`` in their metadata (``duration_s``
        and ``vad`` stay the whole utterance's). An utterance whose mel member would be larger than
        readers take (``MAX_MEL_BYTES``) is cut so, into segments that fit (:func:`fitting_segment`)."""
        fit = fitting_segment(int(mel.shape[1]))
        length = min(self.segment, fit) if self.segment else 0
        if not length and mel.shape[0] > member_frames(int(mel.shape[1])):  # too long for one sample
            length = fit
            self.tally.cut_to_fit += 1
        if not length:
            self.samples.append((key, mel, meta))
            self.tally.samples_ok += 1
            return
        bounds = segment_bounds(int(mel.shape[0]), length)
        for number, (start, stop) in enumerate(bounds):
            part = {**meta, "n_frames": stop - start, "segment": number, "segments": len(bounds)}
            self.samples.append((segment_key(key, number), mel[start:stop], part))
        self.tally.samples_ok += len(bounds)

    def _failed(self, planned: PlannedUtterance, reason: str) -> None:
        utt = planned.utterance
        # a perturbed copy's failure names its speaker (``SPK@sp0.9``): the speed is in the id
        failure = {"root": self.root_names[utt.root], "speaker": planned.speaker, "source": utt.source,
                   "reason": reason}
        self.failures.append(failure)
        if self.fail_fast:
            raise DvectorError(f"{display_path(str(utt.path))}: {reason} (stopped by --fail-fast)")

    def write(self, out: Path, number: int) -> ShardTally:
        """Write the shard: its tar, then its record (each atomically); the shard's counts."""
        t0 = time.perf_counter()
        info = write_shard(out / shard_name(number), self.samples)
        write_json_atomic(sidecar_path(out, number), {
            "shard": info.to_dict(), "failures": self.failures, "speakers": _speaker_counts(self.samples)})
        self.tally.stage_s["writing"] = self.tally.stage_s.get("writing", 0.0) + time.perf_counter() - t0
        self.tally.failures = self.failures
        return self.tally


def build_one_shard(out: Path, number: int, shard: list[PlannedUtterance], root_names: dict[str, str],
                    cfg: BuildConfig, fail_fast: bool = False) -> ShardTally | str:
    """A shard job for a cluster worker: process shard ``number``'s utterances in plan order, in this
    process, and write the shard and its record (atomically: a job killed midway leaves at most a
    temporary file, and its rerun writes the same bytes). Returns the shard's counts, or, with
    ``fail_fast``, the first failure's message (nothing written)."""
    _init_once()
    by_key = {p.key: p for p in shard}
    content = ShardContent(root_names, by_key, segment_frames(cfg.split_seconds, cfg.features.hop_ms), fail_fast)
    items = job_items(shard, root_names)
    with threadpool_limits(1):
        try:
            for i in range(0, len(items), CHUNK_UTTERANCES):
                content.add(process_chunk(items[i:i + CHUNK_UTTERANCES], cfg.features, cfg.vad))
        except DvectorError as exc:  # --fail-fast: reported, not retried
            return str(exc)
    return content.write(out, number)


_READY = [False]


def _init_once() -> None:
    """A cluster worker's first shard job sets the process up as the local pool's initializer does."""
    if not _READY[0]:
        keep_freed_memory()
        warm_up()
        _READY[0] = True
