"""Clustering of a recording's window d-vectors into speakers, with a known or an estimated count.

``spectral`` follows Wang et al. 2018, "Speaker Diarization with LSTM" (ICASSP), section 2.4, as
Google's ``spectralcluster`` package implements it: cosine affinities of the windows (in time
order), refined by (1) cropping the diagonal (each self-affinity becomes its row's largest other
value), (2) a Gaussian blur (sigma 1 window) that smooths along time, (3) a row-wise threshold
(in each row, values under the row's ``p_percentile`` shrink to 1%), (4) symmetrisation
(max of A and its transpose), (5) diffusion (A A^T) and (6) row-wise max normalisation. The
eigenvalues of the refined matrix, largest first, give the number of speakers where the
eigengap ratio ``lambda_k / lambda_(k+1)`` is largest (within the bounds); the rows of the first K
eigenvectors, unit-normalised, are clustered by k-means (scikit-learn, fixed seed).

The eigengap ratio of K = 1 (``lambda_1 / lambda_2``) wins on nearly every recording, so spectral
estimation starts at two speakers; with ``min_speakers`` 1 it then answers one speaker when the
centroids of the clusters it found are all closer than ``threshold`` (a cosine calibrated on data).

``ahc`` is agglomerative clustering (scipy, average linkage, cosine distance), cut at K clusters
or, with K unknown, where the average similarity of two clusters falls below ``threshold``
(a cosine calibrated on data: ``dvector eval`` stores the model's EER threshold).

Both return labels ``0..K-1`` numbered in order of first appearance; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.ndimage import gaussian_filter
from sklearn.cluster import KMeans

from dvector.errors import DvectorError

METHODS = ("spectral", "ahc")


@dataclass(frozen=True)
class ClusterConfig:
    """How to cluster: ``speakers`` known (None: estimated within ``min_speakers..max_speakers``)."""

    method: str = "spectral"
    speakers: int | None = None
    min_speakers: int = 2  # 1: spectral tests "all one voice" with ``threshold`` (the eigengap of K = 1 wins too often)
    max_speakers: int = 8
    p_percentile: float | None = None  # spectral: row-wise threshold; None: auto-tuned (Park et al. 2019)
    sigma: float = 1.0  # spectral: Gaussian blur along time, in windows
    threshold: float = 0.5  # K unknown: ahc stops merging below this cosine; spectral with min 1: one voice above it

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DvectorError(f"clustering method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.speakers is not None and self.speakers < 1:
            raise DvectorError(f"--speakers must be >= 1, got {self.speakers}")
        if not 1 <= self.min_speakers <= self.max_speakers:
            raise DvectorError(f"need 1 <= --min-speakers <= --max-speakers, got {self.min_speakers} and "
                               f"{self.max_speakers}")
        if self.p_percentile is not None and not 0 <= self.p_percentile < 1:
            raise DvectorError(f"p_percentile must be in [0, 1), got {self.p_percentile}")


def first_appearance(labels: np.ndarray) -> np.ndarray:
    """``labels`` renumbered 0, 1, ... in the order each first occurs."""
    order: dict[int, int] = {}
    return np.array([order.setdefault(int(x), len(order)) for x in labels], dtype=np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def centroids(vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each cluster's unit-length mean vector, in label order: (K, D)."""
    return _unit(np.stack([vectors[labels == k].mean(axis=0) for k in np.unique(labels)]))


def refined_affinity(vectors: np.ndarray, p_percentile: float = 0.9, sigma: float = 1.0) -> np.ndarray:
    """Wang et al.'s refinement (see the module text) of the cosine affinities of ``vectors`` (N, D): (N, N)."""
    x = _unit(np.asarray(vectors, dtype=np.float64))
    a = x @ x.T  # (N, N) cosine
    np.fill_diagonal(a, -np.inf)
    np.fill_diagonal(a, a.max(axis=1))  # crop the diagonal
    if sigma > 0:
        a = gaussian_filter(a, sigma=sigma)  # blur along time
    cut = np.percentile(a, 100 * p_percentile, axis=1, keepdims=True)  # (N, 1)
    a = np.where(a < cut, 0.01 * a, a)  # row-wise threshold
    a = np.maximum(a, a.T)  # symmetrise
    a = a @ a.T  # diffuse
    return a / np.maximum(a.max(axis=1, keepdims=True), 1e-12)  # row-wise max normalisation


def eigengap_count(eigenvalues: np.ndarray, lo: int, hi: int) -> int:
    """K in ``lo..hi`` with the largest ratio of the K-th to the (K+1)-th largest eigenvalue."""
    lam = np.sort(np.real(eigenvalues))[::-1]
    hi = min(hi, len(lam) - 1)
    if hi < lo:
        return max(1, min(lo, len(lam)))
    ratios = [lam[k - 1] / max(lam[k], 1e-12) for k in range(lo, hi + 1)]
    return lo + int(np.argmax(ratios))


P_GRID = tuple(np.round(np.arange(0.40, 0.951, 0.05), 2))  # auto-tuned row-wise threshold (spectralcluster's range)


def _spectrum(vectors: np.ndarray, p: float, cfg: ClusterConfig) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Eigenvalues (largest first) and eigenvectors of the refined affinity at ``p``, the speaker
    count (given, or by eigengap) and its normalised eigengap ``(lambda_K - lambda_K+1) / lambda_1``."""
    values, vecs = np.linalg.eig(refined_affinity(vectors, p, cfg.sigma))
    order = np.argsort(-np.real(values))
    values, vecs = np.real(values[order]), np.real(vecs[:, order])
    k = cfg.speakers if cfg.speakers is not None else eigengap_count(values, cfg.min_speakers, cfg.max_speakers)
    k = max(1, min(k, len(values)))
    gap = (values[k - 1] - values[k]) / max(values[0], 1e-12) if k < len(values) else 0.0
    return values, vecs, k, float(gap)


def spectral_labels(vectors: np.ndarray, cfg: ClusterConfig) -> np.ndarray:
    """Spectral clustering of ``vectors`` (N, D), time-ordered: labels (N,).

    With ``cfg.p_percentile`` None the threshold is auto-tuned as spectralcluster's ``AutoTune``
    does (Park et al. 2019, "Auto-tuning spectral clustering for speaker diarization using
    normalized maximum eigengap"): the ``p`` of ``P_GRID`` with the smallest ``sqrt(1 - p) / gap``.
    """
    grid = P_GRID if cfg.p_percentile is None else (cfg.p_percentile,)
    tried = [_spectrum(vectors, p, cfg) for p in grid]
    best = min(range(len(grid)), key=lambda i: np.sqrt(1 - grid[i]) / max(tried[i][3], 1e-12))
    _, vecs, k, _ = tried[best]
    if k <= 1:
        return np.zeros(len(vectors), dtype=np.int64)
    embedding = _unit(vecs[:, :k])  # (N, K)
    return KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(embedding)


def ahc_labels(vectors: np.ndarray, cfg: ClusterConfig) -> np.ndarray:
    """Average-linkage clustering of ``vectors`` (N, D) on cosine distance: labels (N,)."""
    x = _unit(np.asarray(vectors, dtype=np.float64))
    tree = linkage(x, method="average", metric="cosine")
    if cfg.speakers is not None:
        return fcluster(tree, t=min(cfg.speakers, len(x)), criterion="maxclust")
    labels = fcluster(tree, t=1.0 - cfg.threshold, criterion="distance")
    k = len(set(labels.tolist()))
    if k < cfg.min_speakers or k > cfg.max_speakers:  # outside the bounds: the nearest allowed count
        k = min(max(k, cfg.min_speakers), cfg.max_speakers, len(x))
        labels = fcluster(tree, t=k, criterion="maxclust")
    return labels


def cluster(vectors: np.ndarray, cfg: ClusterConfig) -> np.ndarray:
    """Speaker labels (N,) of window embeddings ``vectors`` (N, D), numbered by first appearance."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2:
        raise DvectorError(f"cluster takes (windows, dim) embeddings, got shape {vectors.shape}")
    if len(vectors) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(vectors) == 1:
        return np.zeros(1, dtype=np.int64)
    one_allowed = cfg.speakers is None and cfg.min_speakers == 1 and cfg.max_speakers > 1
    if cfg.method == "spectral" and one_allowed:  # two or more by eigengap; one if they are all alike
        labels = spectral_labels(vectors, replace(cfg, min_speakers=2))
        if one_speaker(vectors, labels, cfg.threshold):
            labels = np.zeros(len(vectors), dtype=np.int64)
    else:
        labels = spectral_labels(vectors, cfg) if cfg.method == "spectral" else ahc_labels(vectors, cfg)
    return first_appearance(labels)


def one_speaker(vectors: np.ndarray, labels: np.ndarray, threshold: float) -> bool:
    """True when every two cluster centroids (unit means) have a cosine of at least ``threshold``:
    the clusters are one voice split (the eigengap cannot tell one speaker from two)."""
    units = centroids(vectors, labels)  # (K, D)
    similarity = units @ units.T
    return bool(np.all(similarity[np.triu_indices(len(units), 1)] >= threshold))
