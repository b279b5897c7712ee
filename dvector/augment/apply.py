"""Apply a drawn :class:`~dvector.augment.plan.BatchPlan` to a batch of log-mel crops, in place.

Order, as in Kaldi's and WeSpeaker's recipes: reverberation, then additive noise and babble at an
SNR relative to the (reverberant) speech, all in mel power; then back to log, channel colouring
and gain; SpecAugment masks last (filled with the row's mean log-mel). Cost per 640 x 160 x 40
batch: a few ms (numpy's vectorised exp/log and one numba kernel), see benchmarks/bench_loader.py.

Features of mel power (``FeatureConfig.compression == "none"``, Resemblyzer's front end) get the
same augmentation in the power domain: a changed row P becomes ``exp(A(log(max(P, floor))))``, A
being what a log-mel row gets and ``floor`` the features' ``log_floor`` (below float16's smallest
subnormal at its default 1e-9, so it only lifts zeros), as the ``"log"`` features of the same
settings would hold. Rows no kind changes are left as they are, zeros included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from dvector.augment.plan import BatchPlan, RowInfo, draw_plan, span
from dvector.augment.kernels import mix_rows, shift_and_mask
from dvector.augment.sources import SourcePaths, load_noise, load_rooms, prepare_sources
from dvector.augment.spectra import (COLOUR_EXPONENTS, channel_curves, colour_power, db_to_log_power,
                                     decay_per_frame, fluctuation_bank, tail_gain)
from dvector.config import AugmentConfig, FeatureConfig
from dvector.errors import DvectorError

__all__ = ["AugmentPlan", "Augmenter", "bank_frames"]

MAX_SCRATCH_BYTES = 1 << 28  # batches bigger than this do not keep their scratch buffers
HIGH_BAND_RT60 = 0.6  # the top band's RT60 relative to the lowest (air and walls absorb highs faster)


@dataclass(frozen=True)
class AugmentPlan:
    """What a loader worker needs to make its :class:`Augmenter` (picklable)."""

    config: AugmentConfig
    features: FeatureConfig
    seed: int = 0
    sources: SourcePaths = SourcePaths()

    def make(self) -> "Augmenter":
        return Augmenter(self.config, self.features, self.seed, self.sources)

    @classmethod
    def prepare(cls, config: AugmentConfig, features: FeatureConfig, seed: int, cache_dir: Path,
                say: Callable[[str], None] = lambda _: None,
                once: Callable[[Callable[[], SourcePaths]], SourcePaths] = lambda work: work()) -> "AugmentPlan | None":
        """The plan for ``config`` (None when no kind is on): the recordings of the kinds that are on
        become mel-domain sources cached in ``cache_dir`` (``once`` runs that, e.g. on one rank
        first); a folder whose kind is off is not read, and ``say`` says so."""
        if not config.kinds:
            return None
        folders = {}
        for kind, folder, option in (("noise", config.noise_dir, "--noise-dir"), ("reverb", config.rir_dir, "--rir-dir")):
            if folder and kind not in config.kinds:
                say(f"note: {option} is not used: {kind!r} is not among the augmentation kinds")
            folders[kind] = folder if kind in config.kinds else ""
        if not any(folders.values()):
            return cls(config, features, seed)
        sources = once(lambda: prepare_sources(folders["noise"], folders["reverb"], features, cache_dir))
        return cls(config, features, seed, sources)


class Augmenter:
    """Augments batches of crops (rows, L, n_mels) float32 in place; see the module doc."""

    def __init__(self, config: AugmentConfig, features: FeatureConfig, seed: int = 0,
                 sources: SourcePaths = SourcePaths()):
        self.config, self.features, self.seed = config, features, seed
        # mel power in the crops (compression "none"): clamped at the floor, to log and back around the log kernels
        self.power_in = features.compression == "none"
        self.floor = np.float32(max(features.log_floor, float(np.finfo(np.float32).tiny)))  # never log(0)
        self.colours = _colours(features, config.noise_colours)  # (colours, n_mels)
        self.noise = load_noise(sources)  # (frames, n_mels) float16 log-mels, or None
        self.rooms = load_rooms(sources)  # (rooms, 2, n_mels), or None
        self._banks: dict[int, np.ndarray] = {}  # coloured-noise fluctuations by length (bank_frames)
        self._scratch_of: dict[str, np.ndarray] = {}

    def _use_bands(self, n_mels: int) -> None:
        if self.noise is not None or self.rooms is not None:
            raise DvectorError(f"these batches hold {n_mels} mel bands per frame, but the noise and room "
                               f"recordings were prepared with {self.features.n_mels}")
        self.features = replace(self.features, n_mels=n_mels)
        self.colours = _colours(self.features, self.config.noise_colours)
        self._banks.clear()

    def plan(self, rows: RowInfo, seg_len: int) -> BatchPlan:
        """Every row's draws for a batch of ``seg_len``-frame crops."""
        return draw_plan(self.config, self.seed, rows, seg_len, self.features.n_mels, len(self.colours),
                         self.noise is not None)

    def __call__(self, mels: np.ndarray, rows: RowInfo) -> BatchPlan:
        """Augment ``mels`` (rows, L, n_mels) float32 in place; returns what was drawn."""
        if mels.shape[2] != self.features.n_mels:  # shards without an index: their own band count
            self._use_bands(mels.shape[2])
        plan = self.plan(rows, mels.shape[1])
        self.apply(mels, plan)
        return plan

    def apply(self, mels: np.ndarray, plan: BatchPlan) -> None:
        """Apply ``plan`` to ``mels`` in place (see the module doc for the order). Power features are
        mixed as they are (floored) and go to log only around the offsets and masks."""
        rows = plan.power_rows
        if rows.size:
            power, where = self._clean_power(mels, rows, plan)
            at = np.full(mels.shape[0], -1)
            at[rows] = np.arange(rows.shape[0])  # batch row -> its place among the power rows
            decay, gain = self._reverb(plan, rows.shape[0], at, mels.shape[2])
            bank, entry, start, colour, noise_snr = self._noise(plan, rows.shape[0], at, mels.shape[1:])
            first, members, crowd, babble_snr = _babble(plan, rows.shape[0], at, where)
            mix_rows(power, where[rows], decay, gain, bank, entry, start, colour, noise_snr, first, members, crowd,
                     babble_snr)
            for a, b in _runs(rows):  # back to log (>= the clean power: nothing below the log floor), or as power
                mixed = power[where[a]:where[a] + b - a]
                if self.power_in:
                    mels[a:b] = mixed
                else:
                    np.log(mixed, out=mels[a:b])
            if mels.nbytes > MAX_SCRATCH_BYTES:  # a huge batch: do not keep its buffers
                self._scratch_of.clear()
        shifted = np.union1d(np.union1d(plan.channel_rows, plan.gain_rows), plan.mask_rows)
        if shifted.size:
            runs = _runs(shifted) if self.power_in else []
            for a, b in runs:  # power features: the log of max(P, floor) for the offsets and masks...
                self._floored(mels[a:b], mels[a:b])
                np.log(mels[a:b], out=mels[a:b])
            self._shift_and_mask(mels, plan, shifted)
            for a, b in runs:  # ...and power again
                np.exp(mels[a:b], out=mels[a:b])

    def _floored(self, power: np.ndarray, out: np.ndarray) -> None:
        """``max(power, floor)`` into ``out``: the power that ``log`` is taken of (no log(0) of zeros,
        float16 underflow or zero padding)."""
        np.maximum(power, self.floor, out=out)

    def _scratch(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 buffer of ``shape`` kept between batches (big temporaries each batch would
        fragment a worker's heap: its memory grew by hundreds of MB without them)."""
        size = int(np.prod(shape))
        buf = self._scratch_of.get(name)
        if buf is None or buf.size < size:
            buf = self._scratch_of[name] = np.empty(size, np.float32)
        return buf[:size].reshape(shape)

    def _clean_power(self, mels: np.ndarray, rows: np.ndarray, plan: BatchPlan) -> tuple[np.ndarray, np.ndarray]:
        """The power of ``rows`` and of the babble crowds' rows (their union, in row order), and where
        each batch row is in it (-1: not there). Consecutive rows go through ``exp`` as one slice
        (a gather of the rows first would cost as much as the exp); power features are only floored
        (``exp(log(max(P, floor)))`` up to rounding), and crowd rows no kind changes stay untouched."""
        needed = np.union1d(rows, np.concatenate(plan.crowds)) if plan.babble_rows.size else rows
        where = np.full(mels.shape[0], -1)
        where[needed] = np.arange(needed.shape[0])
        power = self._scratch("power", (needed.shape[0], *mels.shape[1:]))
        for a, b in _runs(needed):
            out = power[where[a]:where[a] + b - a]
            if self.power_in:
                self._floored(mels[a:b], out)
            else:
                np.exp(mels[a:b], out=out)
        return power, where

    def _reverb(self, plan: BatchPlan, n: int, at: np.ndarray, n_mels: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, n_mels) decay and gain per power row (decay -1: no reverberation)."""
        decay, gain = np.full((n, n_mels), -1.0, np.float32), np.zeros((n, n_mels), np.float32)
        u = plan.reverb_u
        if not u.shape[0]:
            return decay, gain
        if self.rooms is not None:
            room = self.rooms[np.minimum((u[:, 2] * len(self.rooms)).astype(np.int64), len(self.rooms) - 1)]
            d, g = room[:, 0], room[:, 1]
        else:
            rt60, drr = span(u[:, 0], self.config.reverb_rt60), span(u[:, 1], self.config.reverb_drr)
            per_band = np.linspace(1.0, HIGH_BAND_RT60, n_mels)[None, :]
            d = decay_per_frame(rt60[:, None] * per_band, self.features.hop_ms / 1000.0)
            g = tail_gain(d, drr[:, None])
        decay[at[plan.reverb_rows]], gain[at[plan.reverb_rows]] = d, g
        return decay, gain

    def _noise(self, plan: BatchPlan, n: int, at: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
        """The noise bank and, per power row, its entry (-1: no noise), start, band colour and SNR."""
        frames, n_mels = shape
        entry, start = np.full(n, -1, np.int64), np.zeros(n, np.int64)
        colour, snr = np.ones((n, n_mels), np.float32), np.zeros(n)
        where, rows = plan.noise_where, at[plan.noise_rows]
        if self.noise is not None and rows.size:
            # each row's crop of the recordings (tiled where they are shorter), as powers, in a scratch bank
            total = self.noise.shape[0]
            first = (where[:, 1] * max(total - frames, 0)).astype(np.int64)
            index = (first[:, None] + np.arange(frames)[None, :]) % total  # (rows, frames)
            bank = self._scratch("noise", (rows.size, frames, n_mels))
            bank[...] = self.noise[index.ravel()].reshape(rows.size, frames, n_mels)
            np.exp(bank, out=bank)
            entry[rows] = np.arange(rows.size)
        else:
            bank = self._fluctuations(frames)
            if rows.size:
                entry[rows] = np.minimum((where[:, 0] * bank.shape[0]).astype(np.int64), bank.shape[0] - 1)
                start[rows] = (where[:, 1] * (bank.shape[1] - frames)).astype(np.int64)
                colour[rows] = self.colours[plan.noise_source]
        snr[rows] = plan.noise_snr
        return bank, entry, start, colour, snr

    def _fluctuations(self, frames: int) -> np.ndarray:
        """The fluctuation bank for ``frames``-frame crops: its length is a function of ``frames``
        alone (never of the crops seen before), so a batch's noise does not depend on batch order."""
        size = bank_frames(frames)
        bank = self._banks.get(size)
        if bank is None:
            if len(self._banks) >= 4:
                self._banks.clear()
            bank = self._banks[size] = fluctuation_bank(self.features, self.seed, frames=size)
        return bank

    def _shift_and_mask(self, mels: np.ndarray, plan: BatchPlan, rows: np.ndarray) -> None:
        at = np.full(mels.shape[0], -1)
        at[rows] = np.arange(rows.shape[0])
        offset = np.zeros((rows.shape[0], mels.shape[2]), np.float32)
        if plan.channel_rows.size:
            u = plan.channel_u
            offset[at[plan.channel_rows]] += channel_curves(u[:, :-1], u[:, -1] * self.config.channel_db, mels.shape[2])
        if plan.gain_rows.size:
            offset[at[plan.gain_rows]] += np.asarray(db_to_log_power(plan.gain_db), np.float32)[:, None]
        time_masks = np.zeros((rows.shape[0], plan.time_masks.shape[1], 2), np.int64)
        freq_masks = np.zeros((rows.shape[0], plan.freq_masks.shape[1], 2), np.int64)
        time_masks[at[plan.mask_rows]], freq_masks[at[plan.mask_rows]] = plan.time_masks, plan.freq_masks
        shift_and_mask(mels, rows.astype(np.int64), offset, time_masks, freq_masks)


def bank_frames(frames: int) -> int:
    """Frames of the fluctuation bank that crops of ``frames`` frames are cut from: 512, or the next
    power of two above it."""
    return max(512, 1 << max(frames - 1, 0).bit_length())


def _colours(features: FeatureConfig, names: tuple[str, ...]) -> np.ndarray:
    """(len(names), n_mels) mean band powers of the named noise colours."""
    table, known = colour_power(features), list(COLOUR_EXPONENTS)
    return np.stack([table[known.index(c)] for c in names])


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted distinct rows as [start, stop) runs of consecutive ones."""
    if not rows.size:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, stops = rows[np.r_[0, breaks]], rows[np.r_[breaks - 1, rows.size - 1]] + 1
    return list(zip(starts.tolist(), stops.tolist()))


def _babble(plan: BatchPlan, n: int, at: np.ndarray, where: np.ndarray) -> tuple[np.ndarray, ...]:
    """The crowds as CSR (first, their rows in the power buffer), each power row's crowd (-1: none), SNR."""
    first = np.zeros(len(plan.crowds) + 1, np.int64)
    np.cumsum([c.size for c in plan.crowds], out=first[1:])
    members = where[np.concatenate(plan.crowds)] if plan.crowds else np.zeros(0, np.int64)
    crowd, snr = np.full(n, -1, np.int64), np.zeros(n)
    crowd[at[plan.babble_rows]], snr[at[plan.babble_rows]] = plan.babble_crowd, plan.babble_snr
    return first, members, crowd, snr
