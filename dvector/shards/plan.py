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


@dataclass(frozen=True)
class PlannedUtterance:
    key: str  # webdataset sample key, unique in the build
    utterance: Utterance
    speaker_index: int


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
        digest.update(json.dumps(record, ensure_ascii=True).encode())
    return digest.hexdigest()[:16]


def make_plan(scan: ScanResult, cfg: BuildConfig) -> Plan:
    """Speaker blocks shuffled with the build seed, cut into balanced shards.

    Each speaker's utterances are shuffled and cut into blocks of ``block_size``; all blocks are
    shuffled together and laid out in order; the shard count is enough to keep each shard within
    ``shard_size`` utterances but at least ``min_shards`` (if there are that many blocks), so a
    small corpus still gives every worker and every training process shards of its own.
    """
    rng = np.random.default_rng(cfg.seed)
    index_of = {spk: i for i, spk in enumerate(scan.speakers)}
    by_speaker: dict[str, list[Utterance]] = {spk: [] for spk in scan.speakers}
    for utt in scan.utterances:
        by_speaker[utt.speaker].append(utt)
    blocks: list[list[Utterance]] = []
    for spk in scan.speakers:
        utts = sorted(by_speaker[spk], key=lambda u: (scan.root_names[u.root], u.source))
        order = rng.permutation(len(utts))
        shuffled = [utts[i] for i in order]
        blocks.extend(shuffled[i:i + cfg.block_size] for i in range(0, len(shuffled), cfg.block_size))
    blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    total = sum(len(b) for b in blocks)
    n_shards = min(len(blocks), max(-(-total // cfg.shard_size), cfg.min_shards)) if blocks else 0
    shards: list[list[PlannedUtterance]] = [[] for _ in range(n_shards)]
    position = 0
    for block in blocks:
        # the shard holding the middle of this block, so shard sizes stay balanced
        shard = min(n_shards - 1, (2 * position + len(block)) * n_shards // (2 * total))
        for utt in block:
            spk = index_of[utt.speaker]
            shards[shard].append(PlannedUtterance(f"s{spk:06d}u{position:09d}", utt, spk))
            position += 1
    return Plan(list(scan.speakers), [s for s in shards if s], input_digest(scan, cfg))
