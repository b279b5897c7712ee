"""Score normalisation against a cohort: S-norm and adaptive S-norm (AS-norm).

For a trial (enrolment ``e``, test ``t``, raw cosine score ``s``) and a cohort of unit-length
speaker embeddings, each side is scored against the cohort; ``mu_e``, ``sd_e`` are the mean and the
(population) standard deviation of ``e``'s top-N cohort scores, ``mu_t``, ``sd_t`` the test side's.
The normalised score is the mean of the two z-normalised scores (Matějka et al. 2017; WeSpeaker's
``score_norm``)::

    s' = ((s - mu_e) / sd_e + (s - mu_t) / sd_t) / 2

S-norm uses the whole cohort; AS-norm the N cohort scores closest to each side (default 300). A
cohort of fewer speakers than N is used whole, with a note.

The cohort (:func:`cohort_from_shards`) is the mean embedding of each speaker in a shard set, made
with the model being evaluated, one stored (VAD-trimmed) mel per sample as ``dvector embed`` embeds
shards; speed-perturbed copies (``ROOT/SPK@sp0.9``) are left out: they are not other speakers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from dvector.errors import DvectorError
from dvector.shards.locate import resolve_shards
from dvector.shards.reader import ShardFormatError, iter_shard
from dvector.inference.embedder import Embedder
from dvector.evaluation.evaluate import Evaluation, compute_metrics

NORMS = ("none", "snorm", "asnorm")
DEFAULT_TOP_N = 300
STD_FLOOR = 1e-8  # a side whose cohort scores are all equal would divide by zero
ROWS_PER_BLOCK = 2048  # embeddings scored against the cohort at a time (bounds the (rows, K) matrix)


def check_norm(norm: str, cohort: object, top_n: int) -> str:
    """``norm`` lower-cased, checked: one of NORMS; a cohort given where it is not ``none``; top-N >= 2."""
    method = (norm or "none").strip().lower()
    if method not in NORMS:
        raise DvectorError(f"--norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if method != "none" and not cohort:
        raise DvectorError(f"--norm {method} needs a cohort: give --cohort SHARDS (a shard folder, pattern or "
                           f"URL; the cohort is the mean embedding of each of its speakers); the default, the "
                           f"run's training shards, is recorded only in checkpoints of runs that record them")
    if int(top_n) < 2:
        raise DvectorError(f"--cohort-top must be >= 2 (a standard deviation needs two scores), got {top_n}")
    return method


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit length (zero rows stay zero), float64."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


@dataclass
class Cohort:
    """Unit-length cohort embeddings, one per speaker, and where they came from."""

    vectors: np.ndarray  # (K, D) float64, unit rows
    speakers: list[str]  # K speaker ids, the rows' order
    source: str = ""  # the shards given
    n_samples: int = 0  # embeddings averaged
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (shard or key, reason)

    def __post_init__(self) -> None:
        self.vectors = unit_rows(np.atleast_2d(self.vectors))
        if len(self.speakers) != self.vectors.shape[0]:
            raise DvectorError(f"cohort: {len(self.speakers)} speakers for {self.vectors.shape[0]} vectors")
        if self.vectors.shape[0] < 2:
            where = f"the cohort {self.source}" if self.source else "the cohort"
            raise DvectorError(f"{where} holds {self.vectors.shape[0]} speaker(s): score normalisation needs "
                               f"at least 2 (hundreds are usual)")


def cohort_stats(embeds: np.ndarray, cohort: np.ndarray, top_n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std of each row's ``top_n`` highest cosine scores against ``cohort``.

    ``embeds`` (R, D), ``cohort`` (K, D) unit rows; ``top_n`` None or >= K: every cohort score.
    Returns ``(mean, std)``, each (R,); the std floored at STD_FLOOR."""
    embeds, cohort = unit_rows(np.atleast_2d(embeds)), unit_rows(np.atleast_2d(cohort))
    K = cohort.shape[0]
    n = K if top_n is None else min(int(top_n), K)
    mean, std = np.empty(embeds.shape[0]), np.empty(embeds.shape[0])
    for start in range(0, embeds.shape[0], ROWS_PER_BLOCK):
        rows = slice(start, start + ROWS_PER_BLOCK)
        scores = embeds[rows] @ cohort.T  # (R', K)
        if n < K:
            scores = np.partition(scores, K - n, axis=1)[:, K - n:]  # (R', n): the n highest, unordered
        mean[rows], std[rows] = scores.mean(axis=1), scores.std(axis=1)
    return mean, np.maximum(std, STD_FLOOR)


def symmetric_norm(scores: np.ndarray, enrol: tuple[np.ndarray, np.ndarray],
                   test: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``((s - mu_e) / sd_e + (s - mu_t) / sd_t) / 2`` per trial, from each side's ``(mean, std)``."""
    s = np.asarray(scores, dtype=np.float64)
    return 0.5 * ((s - enrol[0]) / enrol[1] + (s - test[0]) / test[1])


@dataclass
class ScoreNorm:
    """S-norm or AS-norm against ``cohort``: ``normalize(scores, enrol, test)``."""

    method: str  # "snorm" or "asnorm"
    cohort: Cohort
    top_n: int = DEFAULT_TOP_N  # AS-norm's N

    def __post_init__(self) -> None:
        if self.method not in ("snorm", "asnorm"):
            raise DvectorError(f"score normalisation must be snorm or asnorm, got {self.method!r}")
        check_norm(self.method, True, self.top_n)

    @property
    def n_cohort(self) -> int:
        return int(self.cohort.vectors.shape[0])

    @property
    def used_top(self) -> int:
        """Cohort scores each side's statistics use: N, or the whole cohort (S-norm, or fewer than N)."""
        return self.n_cohort if self.method == "snorm" else min(int(self.top_n), self.n_cohort)

    @property
    def note(self) -> str | None:
        """What the caller should be told: a cohort smaller than N was used whole."""
        if self.method == "asnorm" and self.top_n > self.n_cohort:
            return (f"the cohort holds {self.n_cohort} speakers, fewer than --cohort-top {self.top_n}: AS-norm "
                    f"uses all of them (as S-norm does)")
        return None

    def stats(self, embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of each embedding's cohort scores, (R,) each."""
        return cohort_stats(embeds, self.cohort.vectors, self.used_top)

    def normalize(self, scores: np.ndarray, enrol: np.ndarray, test: np.ndarray) -> np.ndarray:
        """Normalised scores (T,) of trials with raw ``scores`` (T,), enrolment and test embeddings (T, D)."""
        return symmetric_norm(scores, self.stats(enrol), self.stats(test))

    def describe(self) -> dict[str, object]:
        """What results record about the normalisation."""
        return {"method": self.method, "top_n": self.top_n, "used_top": self.used_top,
                "cohort": self.cohort.source, "cohort_speakers": self.n_cohort,
                "cohort_samples": self.cohort.n_samples}


def cohort_from_shards(embedder: Embedder, shards: str | Sequence[str],
                       on_start: Callable[[int | None], None] | None = None,
                       on_item: Callable[[str], None] | None = None) -> Cohort:
    """The mean embedding (unit length) of each speaker in ``shards`` (a folder, pattern, URL or a list).

    Every sample's stored mel is embedded with ``embedder.embed_mel``, as ``dvector embed`` embeds
    shard URLs; speed-perturbed copies are left out; an unreadable shard is skipped and listed.
    Fewer than two speakers is an error."""
    text = shards if isinstance(shards, str) else " ".join(map(str, shards))
    source = resolve_shards(shards if isinstance(shards, str) else list(shards))
    if on_start:
        index = source.index
        on_start(sum(s["samples"] for s in index["shards"]) if index and "shards" in index else None)
    sums: dict[str, np.ndarray] = {}
    skipped: list[tuple[str, str]] = []
    n_samples = 0
    for url in source.urls:
        try:
            for sample in iter_shard(url):
                key = f"{sample.get('root', '?')}/{sample.get('source', sample['__key__'])}"
                if float(sample.get("speed", 1.0) or 1.0) == 1.0 and "speaker" in sample:
                    try:
                        vector = embedder.embed_mel(sample["mel"].astype(np.float32)).astype(np.float64)
                    except DvectorError as exc:  # another mel width: the model cannot read these shards
                        raise DvectorError(f"cohort {text}: {url} {key}: {exc}") from None
                    speaker = str(sample["speaker"])
                    sums[speaker] = sums[speaker] + vector if speaker in sums else vector
                    n_samples += 1
                if on_item:
                    on_item(key)
        except (ShardFormatError, OSError) as exc:  # a damaged or unreachable shard
            skipped.append((url, f"cannot read shard: {exc}"))
    if not sums:
        raise DvectorError(f"the cohort {text} holds no usable samples" +
                           (f" ({len(skipped)} shard(s) unreadable: {skipped[0][1]})" if skipped else ""))
    speakers = sorted(sums)
    return Cohort(np.stack([sums[s] for s in speakers]), speakers, text, n_samples, skipped)


def normalize_evaluation(evaluation: Evaluation, norm: ScoreNorm) -> dict[str, object]:
    """The normalised scores' EER, its threshold and minDCF for an evaluation's trials, with the
    normalisation's settings (what ``eval.json`` stores under ``norm``). Each file's cohort
    statistics are computed once, however many trials name it."""
    files = list(evaluation.vectors)
    row = {f: i for i, f in enumerate(files)}
    mean, std = norm.stats(np.stack([evaluation.vectors[f] for f in files]))  # (F,) each
    a = np.array([row[t.a] for t in evaluation.trials])
    b = np.array([row[t.b] for t in evaluation.trials])
    scores = symmetric_norm(evaluation.scores, (mean[a], std[a]), (mean[b], std[b]))
    result = compute_metrics(scores, evaluation.labels)
    return {**norm.describe(), "note": norm.note, "eer": result.eer, "eer_threshold": result.eer_threshold,
            "min_dcf": result.min_dcf, "min_dcf_threshold": result.min_dcf_threshold}
