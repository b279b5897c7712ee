"""numba kernels that change a batch's rows in place with one pass each (no per-row numpy calls).

``mix_rows``: per power row, reverberation, then noise and babble at their SNRs. ``shift_and_mask``:
per log row, a per-band offset (channel colouring plus gain), then SpecAugment masks filled with
the row's mean. numpy keeps the exp and log (its vectorised ones are faster than scalar calls).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["mix_rows", "shift_and_mask"]


@njit(cache=True)
def _reverberate(x: np.ndarray, decay: np.ndarray, gain: np.ndarray) -> None:  # pragma: no cover
    """``tail[t] = decay * tail[t-1] + gain * x[t-1]; x[t] += tail[t]``, per band (bands innermost)."""
    frames, bands = x.shape
    tail = np.zeros(bands, np.float32)
    prev = x[0].copy()
    for t in range(1, frames):
        row = x[t]
        for b in range(bands):
            tail[b] = decay[b] * tail[b] + gain[b] * prev[b]
            prev[b] = row[b]
            row[b] += tail[b]


@njit(cache=True, fastmath=True)
def _add_scaled(x: np.ndarray, added: np.ndarray, scale: np.float32) -> None:  # pragma: no cover
    for k in range(x.shape[0]):
        x[k] += scale * added[k]


@njit(cache=True, fastmath=True)
def mix_rows(power, rows_of, decay, gain, noise_bank, noise_entry, noise_start, noise_colour, noise_snr,
             crowd_first, crowd_rows, row_crowd, babble_snr) -> None:  # pragma: no cover
    """In place on ``power`` (n, frames, bands) float32, clean powers: row ``rows_of[i]`` gets, for i:

    - reverberation where ``decay[i, 0] >= 0`` (decay, gain: (rows, bands) per band);
    - noise where ``noise_entry[i] >= 0``: ``noise_bank[entry, start:start+frames] * noise_colour[i]``
      scaled so that mean(speech) / mean(noise) = 10^(noise_snr[i] / 10);
    - babble where ``row_crowd[i] >= 0``: crowd c is the sum of ``power`` rows
      ``crowd_rows[crowd_first[c]:crowd_first[c+1]]``, each scaled to a mean of 1 (summed once per
      batch, before any row changes); it is scaled to ``babble_snr[i]``.
    SNRs are relative to the speech as it is after reverberation. Loops run over flat rows and sums
    may be reassociated (fastmath), so that LLVM vectorises them. Long because the three kinds share one pass over each row.
    """
    frames, bands = power.shape[1], power.shape[2]
    size = frames * bands
    flat = power.reshape(power.shape[0], size)  # C-contiguous views: the flat loops vectorise
    added = np.empty(size, np.float32)
    n_crowds = crowd_first.shape[0] - 1
    crowd = np.zeros((n_crowds, size), np.float32)
    crowd_level = np.zeros(n_crowds)
    for c in range(n_crowds):
        for j in range(crowd_first[c], crowd_first[c + 1]):
            p = flat[crowd_rows[j]]
            level = p.sum() / size
            if level > 0:
                _add_scaled(crowd[c], p, np.float32(1.0 / level))
        crowd_level[c] = crowd[c].sum() / size
    for i in range(rows_of.shape[0]):
        x2 = power[rows_of[i]]
        if decay[i, 0] >= 0:
            _reverberate(x2, decay[i], gain[i])
        has_noise = noise_entry[i] >= 0
        has_babble = row_crowd[i] >= 0
        if not (has_noise or has_babble):
            continue
        x = flat[rows_of[i]]
        speech = x.sum() / size
        if has_noise:
            crop = noise_bank[noise_entry[i], noise_start[i]:noise_start[i] + frames]
            colour = noise_colour[i]
            total = 0.0
            for t in range(frames):
                for b in range(bands):
                    v = crop[t, b] * colour[b]
                    added[t * bands + b] = v
                    total += v
            total /= size
            if total > 0:
                _add_scaled(x, added, np.float32(speech / (total * 10.0 ** (noise_snr[i] / 10.0))))
        if has_babble:
            c = row_crowd[i]
            if crowd_level[c] > 0:
                _add_scaled(x, crowd[c], np.float32(speech / (crowd_level[c] * 10.0 ** (babble_snr[i] / 10.0))))


@njit(cache=True)
def shift_and_mask(mels, rows, offset, time_masks, freq_masks) -> None:  # pragma: no cover
    """In place on ``mels`` (batch, frames, bands): row ``rows[i]`` gets ``offset[i]`` (bands,) added,
    then its masks (``time_masks[i]``, ``freq_masks[i]``: (masks, 2) [start, end), empty where
    start == end) set to its mean; a row with no mask (all empty) skips the mean."""
    frames, bands = mels.shape[1], mels.shape[2]
    for i in range(rows.shape[0]):
        x = mels[rows[i]]
        shift = offset[i]
        for t in range(frames):
            row = x[t]
            for b in range(bands):
                row[b] += shift[b]
        masked = False
        for k in range(time_masks.shape[1]):
            masked = masked or time_masks[i, k, 0] < time_masks[i, k, 1]
        for k in range(freq_masks.shape[1]):
            masked = masked or freq_masks[i, k, 0] < freq_masks[i, k, 1]
        if not masked:
            continue
        fill = x.mean()
        for k in range(time_masks.shape[1]):
            for t in range(time_masks[i, k, 0], time_masks[i, k, 1]):
                x[t, :] = fill
        for k in range(freq_masks.shape[1]):
            for b in range(freq_masks[i, k, 0], freq_masks[i, k, 1]):
                x[:, b] = fill
