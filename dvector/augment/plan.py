"""Every random choice of a batch's augmentation, drawn per row before anything is applied.

Each kind draws from its own block of counter-based uniforms (:mod:`dvector.augment.draws`), so
one kind's settings (or its being off) never change another's draws, and a kind at probability 0
selects no row. :class:`BatchPlan` is what :class:`dvector.augment.apply.Augmenter` applies and
what the tests read (the SNR each row was mixed at, the masks' bounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from dvector.augment.draws import row_seeds, splitmix64, uniforms
from dvector.config import AugmentConfig

__all__ = ["RowInfo", "BatchPlan", "draw_plan", "span", "BABBLE_MAX"]

_SALT = {kind: np.uint64(salt) for kind, salt in (("noise", 0x6E01), ("babble", 0xBA66), ("reverb", 0x4E7B),
                                                   ("channel", 0xC4A2), ("specaugment", 0x59EC), ("gain", 0x6A17))}
BABBLE_MAX = 16  # most babble speakers a crowd can have (more are clipped)
CROWDS = 8  # babble crowds per batch
CHANNEL_COMPONENTS = 3


class RowInfo(NamedTuple):
    """What identifies each row of a batch: its sample's key and pass, its crop's offset, its speaker."""

    keys: Sequence[str]
    passes: Sequence[int]
    offsets: Sequence[int]
    speakers: np.ndarray


def span(u: np.ndarray, lo_hi: tuple[float, float]) -> np.ndarray:
    """Uniforms in [0, 1) -> uniform in [lo, hi)."""
    return lo_hi[0] + u * (lo_hi[1] - lo_hi[0])


def _pick(u: np.ndarray, n: int) -> np.ndarray:
    """Uniforms -> integers in [0, n)."""
    return np.minimum((u * n).astype(np.int64), max(n - 1, 0))


@dataclass
class BatchPlan:
    """Per-row decisions (arrays over the selected rows of each kind; ``*_rows`` are batch rows)."""

    noise_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    noise_snr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    noise_source: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # colour index, or -1: recording
    noise_where: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # uniforms: which bank entry, offset
    babble_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    babble_snr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    crowds: list[np.ndarray] = field(default_factory=list)  # batch rows of each babble crowd (distinct speakers)
    babble_crowd: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # each babble row's crowd
    reverb_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    reverb_u: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # RT60, DRR, room
    channel_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    channel_u: np.ndarray = field(default_factory=lambda: np.zeros((0, 2 * CHANNEL_COMPONENTS + 1)))
    gain_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    gain_db: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mask_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    time_masks: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 2), np.int64))  # (rows, masks, [start, end))
    freq_masks: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 2), np.int64))

    @property
    def babble_partners(self) -> list[np.ndarray]:
        """The rows mixed into each babble row (its crowd)."""
        return [self.crowds[c] for c in self.babble_crowd.tolist()]

    @property
    def power_rows(self) -> np.ndarray:
        """Rows changed in the power domain (reverberation, noise, babble)."""
        return np.union1d(np.union1d(self.noise_rows, self.babble_rows), self.reverb_rows)


def _masks(u: np.ndarray, count: int, widest: int, size: int) -> np.ndarray:
    """(rows, count, 2) [start, end) of masks up to ``widest`` wide within ``size``."""
    width = _pick(u[:, 0::2], min(widest, size) + 1)
    start = (u[:, 1::2] * (size - width + 1)).astype(np.int64)
    return np.stack([start, start + width], axis=-1)


def _crowds(seeds: np.ndarray, speakers: np.ndarray, cfg: AugmentConfig) -> list[np.ndarray]:
    """The batch's ``CROWDS`` babble crowds: each 3-7 (``babble_speakers``) rows of distinct speakers
    (fewer in a batch of fewer speakers: at most all of them but one).

    Drawn from a hash of all the batch's row seeds: a function of the batch's samples, so the same
    batch (after a resume too) gets the same crowds. One sum per crowd, not one per row, keeps
    babble's cost to about one pass over each row it changes.
    """
    batch_seed = np.bitwise_xor.reduce(seeds) ^ _SALT["babble"]
    unique = np.unique(speakers)
    lo, hi = min(cfg.babble_speakers[0], BABBLE_MAX), min(cfg.babble_speakers[1], BABBLE_MAX)
    u = uniforms(splitmix64(batch_seed + np.arange(CROWDS, dtype=np.uint64)), 1 + 2 * BABBLE_MAX)
    crowds = []
    for c in range(CROWDS):
        # at most all speakers but one: a crowd of every speaker would fit no row (batches of few speakers)
        count = min(int(lo + _pick(u[c, :1], hi - lo + 1)[0]), max(unique.size - 1, 1))
        voices = unique[np.argsort(u[c, 1:1 + unique.size])[:count]] if unique.size <= BABBLE_MAX else \
            unique[np.unique(_pick(u[c, 1:1 + count], unique.size))]
        rows = [np.flatnonzero(speakers == v) for v in voices]
        crowds.append(np.sort([r[_pick(u[c, 1 + BABBLE_MAX + j:2 + BABBLE_MAX + j], r.size)[0]]
                               for j, r in enumerate(rows)]).astype(np.int64))
    return crowds


def _babble_crowd(u: np.ndarray, rows: np.ndarray, speakers: np.ndarray, crowds: list[np.ndarray]) -> np.ndarray:
    """Each babble row's crowd: the drawn one or the next without the row's speaker (-1: none is)."""
    holds = np.zeros((len(crowds), rows.shape[0]), bool)  # crowd c holds row i's speaker
    for c, members in enumerate(crowds):
        holds[c] = np.isin(speakers[rows], speakers[members])
    step = np.arange(len(crowds))
    order = (_pick(u, len(crowds))[:, None] + step[None, :]) % len(crowds)  # (rows, crowds): tried in turn
    fits = ~holds[order, np.arange(rows.shape[0])[:, None]]
    return np.where(fits.any(1), order[np.arange(rows.shape[0]), fits.argmax(1)], -1)


def draw_plan(cfg: AugmentConfig, seed: int, rows: RowInfo, seg_len: int, n_mels: int,
              n_colours: int, has_recordings: bool) -> BatchPlan:
    """Draw every row's augmentation (see the module doc). Long because each kind is a few lines."""
    seeds = row_seeds(seed, rows.passes, rows.keys, rows.offsets)
    plan = BatchPlan()
    on = set(cfg.kinds)

    def block(kind: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        u = uniforms(splitmix64(seeds ^ _SALT[kind]), count + 1)
        chosen = np.flatnonzero(u[:, 0] < getattr(cfg, f"{kind}_prob")) if kind in on else np.zeros(0, np.int64)
        return chosen, u[chosen, 1:]

    chosen, u = block("noise", 4)
    if chosen.size:
        plan.noise_rows, plan.noise_snr, plan.noise_where = chosen, span(u[:, 0], cfg.noise_snr), u[:, 2:4]
        plan.noise_source = np.full(chosen.size, -1) if has_recordings else _pick(u[:, 1], n_colours)
    chosen, u = block("babble", 2)
    if chosen.size:
        speakers = np.asarray(rows.speakers)
        crowds = _crowds(seeds, speakers, cfg)
        crowd = _babble_crowd(u[:, 1], chosen, speakers, crowds)
        keep = crowd >= 0  # a batch of one speaker has no babble
        if keep.any():  # (crowds no row uses would still be summed)
            plan.babble_rows, plan.babble_snr = chosen[keep], span(u[keep, 0], cfg.babble_snr)
            plan.crowds, plan.babble_crowd = crowds, crowd[keep]
    chosen, u = block("reverb", 3)
    if chosen.size:
        plan.reverb_rows, plan.reverb_u = chosen, u
    chosen, u = block("channel", 2 * CHANNEL_COMPONENTS + 1)
    if chosen.size:
        plan.channel_rows, plan.channel_u = chosen, u
    chosen, u = block("gain", 1)
    if chosen.size:
        plan.gain_rows, plan.gain_db = chosen, (u[:, 0] * 2.0 - 1.0) * cfg.gain_db
    chosen, u = block("specaugment", 2 * (cfg.time_masks + cfg.freq_masks))
    if chosen.size and (cfg.time_masks or cfg.freq_masks):
        t = 2 * cfg.time_masks
        plan.mask_rows = chosen
        plan.time_masks = _masks(u[:, :t], cfg.time_masks, cfg.time_mask_frames, seg_len)
        plan.freq_masks = _masks(u[:, t:], cfg.freq_masks, cfg.freq_mask_bands, n_mels)
    return plan
