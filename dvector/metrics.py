"""Verification metrics from scores and labels: EER (with its threshold) and minDCF. No I/O."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dvector.errors import DvectorError


@dataclass(frozen=True)
class ErrorRates:
    thresholds: np.ndarray  # decreasing; accept when score >= threshold
    false_accept: np.ndarray  # fraction of non-target trials accepted
    false_reject: np.ndarray  # fraction of target trials rejected


def error_rates(scores: np.ndarray, labels: np.ndarray) -> ErrorRates:
    """False-accept and false-reject rates at every distinct score used as a threshold."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if scores.shape != labels.shape:
        raise DvectorError(f"{scores.size} scores but {labels.size} labels")
    n_target, n_nontarget = int(labels.sum()), int((~labels).sum())
    if n_target == 0 or n_nontarget == 0:
        raise DvectorError(f"need both target and non-target trials, got {n_target} and {n_nontarget}")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # the last index of each run of equal scores: thresholds sit between distinct values
    last = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), scores.size - 1]
    accepted_targets = np.cumsum(sorted_labels)[last]
    accepted_nontargets = np.cumsum(~sorted_labels)[last]
    thresholds = np.r_[np.inf, sorted_scores[last]]
    far = np.r_[0.0, accepted_nontargets / n_nontarget]
    frr = np.r_[1.0, 1.0 - accepted_targets / n_target]
    return ErrorRates(thresholds, far, frr)


def eer(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Equal error rate (a fraction) and the threshold where false accepts meet false rejects.

    Between the two operating points where the rates cross, the EER is interpolated linearly.
    """
    rates = error_rates(scores, labels)
    diff = rates.false_reject - rates.false_accept  # decreasing from 1 to -1... crosses zero once
    i = int(np.flatnonzero(diff <= 0)[0])
    if i == 0:
        return 0.0, float(rates.thresholds[0])
    d0, d1 = diff[i - 1], diff[i]
    t = d0 / (d0 - d1) if d0 != d1 else 0.0
    far = rates.false_accept[i - 1] + t * (rates.false_accept[i] - rates.false_accept[i - 1])
    frr = rates.false_reject[i - 1] + t * (rates.false_reject[i] - rates.false_reject[i - 1])
    threshold = rates.thresholds[i] if np.isinf(rates.thresholds[i - 1]) else (
        rates.thresholds[i - 1] + t * (rates.thresholds[i] - rates.thresholds[i - 1]))
    return float((far + frr) / 2), float(threshold)


def min_dcf(scores: np.ndarray, labels: np.ndarray, p_target: float = 0.01, c_miss: float = 1.0,
            c_fa: float = 1.0) -> tuple[float, float]:
    """Minimum normalised detection cost and its threshold (NIST SRE definition)."""
    rates = error_rates(scores, labels)
    cost = c_miss * p_target * rates.false_reject + c_fa * (1 - p_target) * rates.false_accept
    norm = min(c_miss * p_target, c_fa * (1 - p_target))
    i = int(np.argmin(cost))
    return float(cost[i] / norm), float(rates.thresholds[i])


def all_pairs_scores(embeddings: np.ndarray, speakers: np.ndarray,
                     groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and same-speaker labels of every unordered pair of unit-length embeddings.

    ``groups`` (one label per embedding, e.g. its corpus): only pairs within one group are kept, so
    no non-target pair is told apart by what tells the groups apart (a speaker is in one group).
    """
    sims = embeddings @ embeddings.T  # (U, U)
    speakers = np.asarray(speakers)
    i, j = np.triu_indices(len(speakers), k=1)
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != speakers.shape:
            raise DvectorError(f"{groups.size} group labels for {speakers.size} embeddings")
        keep = groups[i] == groups[j]
        i, j = i[keep], j[keep]
    return sims[i, j], speakers[i] == speakers[j]
