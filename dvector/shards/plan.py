"""Plan a build deterministically: speaker ids, speaker blocks, the shard each utterance goes to.

The plan depends only on the files found, their sizes and the build configuration, so every part
of a multi-machine build, every resumed run and every rerun derives the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from dvector.corpus import ScanResult, Utterance
from dvector.config import BuildConfig
from dvector.errors import DvectorError


SPEED_SUFFIX = "@sp"  # a speed-perturbed copy's speaker id: its source speaker's, then this and the factor


def speed_speaker(speaker: str, speed: float) -> str:
    """The speaker id of ``speaker``'s utterances at ``speed`` (``vctk/p225@sp0.9``; itself at speed 1)."""
    return speaker if speed == 1.0 else f"{speaker}{SPEED_SUFFIX}{float(speed)!r}"


def source_speaker(speaker: str) -> str:
    """The speaker a (perhaps speed-perturbed) speaker id was made from: ``vctk/p225@sp0.9`` -> ``vctk/p225``."""
    head, sep, tail = speaker.rpartition(SPEED_SUFFIX)
    try:
        return head if sep and float(tail) > 0 else speaker
    except ValueError:
        return speaker


SEGMENT_MARK = "g"  # a split utterance's sample keys: its planned key, then this and the segment number


def segment_frames(split_seconds: float, hop_ms: float) -> int:
    """Log-mel frames in one segment of ``split_seconds`` (0: no splitting)."""
    return max(1, int(round(split_seconds * 1000.0 / hop_ms))) if split_seconds > 0 else 0


def segment_bounds(n_frames: int, length: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the segments an utterance of ``n_frames`` is cut into, ``length`` frames each.

    The utterance is cut into whole segments from its start; a trailing remainder of at least half a
    segment is a segment of its own, a shorter one joins the last whole segment (which is then up to
    1.5 segments long). An utterance shorter than one segment stays whole; ``length`` 0 splits nothing.
    """
    if length <= 0 or n_frames < length:
        return [(0, n_frames)]
    whole, rest = divmod(n_frames, length)
    bounds = [(i * length, (i + 1) * length) for i in range(whole)]
    if 2 * rest >= length:
        bounds.append((whole * length, n_frames))
    else:
        bounds[-1] = (bounds[-1][0], n_frames)
    return bounds


def segment_key(key: str, number: int) -> str:
    """The sample key of segment ``number`` of the utterance planned as ``key``: ``s000003u000000042g002``."""
    return f"{key}{SEGMENT_MARK}{number:03d}"


@dataclass(frozen=True)
class PlannedUtterance:
    key: str  # webdataset sample key, unique in the build
    utterance: Utterance
    speaker_index: int
    speed: float = 1.0  # speed perturbation factor (1: the utterance as recorded)

    @property
    def speaker(self) -> str:
        """The speaker id this sample is stored under (a perturbed copy's has the ``@sp`` suffix)."""
        return speed_speaker(self.utterance.speaker, self.speed)


@dataclass
class Plan:
    speakers: list[str]  # speaker id by speaker_index
    shards: list[list[PlannedUtterance]]  # shard number -> its utterances, in writing order
    digest: str  # identifies the input files and the configuration

    @property
    def n_utterances(self) -> int:
        return sum(len(s) for s in self.shards)


def _file_size(utt: Utterance) -> int:
    try:
        return os.stat(utt.path).st_size
    except OSError:
        return -1


def input_digest(scan: ScanResult, cfg: BuildConfig) -> str:
    """A digest of what the build reads (speakers, relative paths, sizes) and how it processes it."""
    digest = hashlib.sha256(cfg.hash().encode())
    for utt in scan.utterances:
        record = [scan.root_names[utt.root], utt.speaker, utt.source, _file_size(utt)]
        if utt.is_segment or utt.command:  # only then: the digests of root builds stay what they were
            record += [utt.start, utt.end, utt.command]
        digest.update(json.dumps(record, ensure_ascii=True).encode())
    return digest.hexdigest()[:16]


def make_plan(scan: ScanResult, cfg: BuildConfig) -> Plan:
    """Speaker blocks shuffled with the build seed, cut into balanced shards.

    Each speaker's utterances are shuffled and cut into blocks of ``block_size``; all blocks are
    shuffled together and laid out in order; the shard count is enough to keep each shard within
    ``shard_size`` utterances but at least ``min_shards`` (if there are that many blocks), so a
    small corpus still gives every worker and every training process shards of its own. With
    ``speed_perturb``, each speed's copy of a speaker is a speaker of its own (``SPK@sp0.9``, indexed
    after every speaker as recorded), blocked and shuffled like the others.
    """
    rng = np.random.default_rng(cfg.seed)
    by_speaker: dict[str, list[Utterance]] = {spk: [] for spk in scan.speakers}
    for utt in scan.utterances:
        by_speaker[utt.speaker].append(utt)
    # every speaker as recorded, then (after them, so their indices do not change) each speed's copies
    copies = [(spk, 1.0) for spk in scan.speakers] + [(spk, f) for f in cfg.speed_perturb for spk in scan.speakers]
    speakers = [speed_speaker(spk, speed) for spk, speed in copies]
    clash = sorted(set(speakers[len(scan.speakers):]) & set(scan.speakers))
    if clash:
        raise DvectorError(f"speaker folder {clash[0]!r} is named like a speed-perturbed copy; rename it, "
                           "or build without --speed-perturb")
    blocks: list[list[tuple[int, float, Utterance]]] = []
    for index, (spk, speed) in enumerate(copies):
        utts = sorted(by_speaker[spk], key=lambda u: (scan.root_names[u.root], u.source))
        order = rng.permutation(len(utts))
        shuffled = [(index, speed, utts[i]) for i in order]
        blocks.extend(shuffled[i:i + cfg.block_size] for i in range(0, len(shuffled), cfg.block_size))
    blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    total = sum(len(b) for b in blocks)
    n_shards = min(len(blocks), max(-(-total // cfg.shard_size), cfg.min_shards)) if blocks else 0
    shards: list[list[PlannedUtterance]] = [[] for _ in range(n_shards)]
    position = 0
    for block in blocks:
        # the shard holding the middle of this block, so shard sizes stay balanced
        shard = min(n_shards - 1, (2 * position + len(block)) * n_shards // (2 * total))
        for spk, speed, utt in block:
            shards[shard].append(PlannedUtterance(f"s{spk:06d}u{position:09d}", utt, spk, speed))
            position += 1
    return Plan(speakers, [s for s in shards if s], input_digest(scan, cfg))
