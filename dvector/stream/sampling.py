"""Speaker-balanced GE2E batches drawn from a bounded pool of streamed samples (pure numpy).

The data layer reads a *pool* of consecutive samples from the shard stream (speaker blocks, see
DESIGN.md), then calls :func:`draw_round` to draw GE2E batches from it until it is used up, then
reads the next pool. Everything random comes from the ``np.random.Generator`` passed in, so a
round is a pure function of ``(samples, settings, generator state)``: resuming mid-round means
re-reading the pool and skipping the batches already drawn (``skip=k``, or ``materialize=False``),
which consumes the generator exactly as drawing them did.

A round:

- groups the pool's usable utterances by ``speaker_index``;
- each batch takes exactly N distinct speakers, chosen at random without replacement among those
  that still have at least M utterances with uses left, with weights the square of their remaining
  uses (speakers with more data left are favoured, so speakers run dry at about the same time and
  little data is wasted, while pairs of speakers meet as often as under uniform choice);
- from each chosen speaker it takes M distinct utterances, those with the most uses left first
  (ties broken at random), and crops each at a fresh random offset to L frames;
- every utterance serves at most ``max_uses`` batches and never twice in one batch;
- the round ends when fewer than N speakers can still give M utterances; utterances that never
  served a batch are counted as ``unused``.

How well speakers mix across batches is measured by :func:`pair_cooccurrence_ratio`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence, Union

import numpy as np

from dvector.config import parse_seg_len
from dvector.errors import DvectorError

SHORT_POLICIES = ("repeat", "drop")
DEFAULT_MIN_FRAMES = 20  # 0.2 s at a 10 ms hop: below this an utterance carries too little speech


@dataclass(frozen=True)
class SegmentSpec:
    """Segment length L in frames: fixed (``lo == hi``) or drawn uniformly in ``[lo, hi]`` per batch."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        """Refuse lengths that are not whole frames with 1 <= lo <= hi."""
        for v in (self.lo, self.hi):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise DvectorError(f"seg_len must be whole frames, got {self.lo!r}..{self.hi!r}")
        if self.lo < 1:
            raise DvectorError(f"seg_len must be >= 1 frame, got {self.lo}")
        if self.hi < self.lo:
            raise DvectorError(f"seg_len range must have lo <= hi, got ({self.lo}, {self.hi})")

    @classmethod
    def parse(cls, seg_len: "SegLen") -> "SegmentSpec":
        """Accept a ``SegmentSpec``, an int L, a ``(lo, hi)`` pair (inclusive; the paper: 140–180) or
        a string like ``"160"`` / ``"140-180"``; checked by :func:`dvector.config.parse_seg_len`."""
        if isinstance(seg_len, SegmentSpec):
            return seg_len
        lo, hi = parse_seg_len(seg_len)
        return cls(lo, hi)

    @property
    def fixed(self) -> bool:
        """Whether every batch has the same L."""
        return self.lo == self.hi

    def draw(self, rng: np.random.Generator) -> int:
        """L for one batch; a fixed length consumes no randomness."""
        if self.fixed:
            return int(self.lo)
        return int(rng.integers(self.lo, self.hi + 1))


SegLen = Union[int, str, tuple, list, SegmentSpec]


def shortest_usable(seg_len: SegLen, short_policy: str, min_frames: int) -> int:
    """Frames an utterance needs to be usable: ``min_frames``, or the longest L under "drop"."""
    return max(min_frames, SegmentSpec.parse(seg_len).hi if short_policy == "drop" else 1)


class Batch(NamedTuple):
    """One GE2E batch, rows speaker-major: rows ``j*M .. j*M+M-1`` are speaker j.

    ``mels``: (N*M, L, n_mels) in the pool's dtype (float16 as stored; the caller converts), or
    None when drawn with ``materialize=False``. ``speaker_index``: (N*M,) int64 global speaker ids.
    ``pool_index``: (N*M,) int64 position in the pool of each row's utterance. ``offset``: (N*M,)
    int64 first frame of each crop (for a short utterance tiled by "repeat": where the wrap starts).
    """

    mels: np.ndarray | None
    speaker_index: np.ndarray
    seg_len: int
    pool_index: np.ndarray
    offset: np.ndarray


@dataclass
class SamplingStats:
    """Counters over one or more rounds; add two to merge (``a + b``, ``a += b``).

    ``utterances``: samples seen in pools. ``uses``: rows emitted (utterance uses).
    ``batches``: drawn (skipped ones included). ``rounds``: run to their end. ``dropped_short``:
    utterances never usable because too short (below ``min_frames``, or below the longest L under
    the "drop" policy). ``repeated_short``: rows tiled by the "repeat" policy because the
    utterance was shorter than that batch's L.
    ``unused``: usable utterances that served no batch before their round ended.
    ``leftover_uses``: use slots (``max_uses`` per usable utterance) left at round end.
    ``bad_samples``, ``bad_shards``: samples and shards (or rests of shards) the stream skipped as
    damaged (filled by the data layer, :mod:`dvector.stream.batches`; ``draw_round`` leaves them).
    """

    utterances: int = 0
    uses: int = 0
    batches: int = 0
    rounds: int = 0
    dropped_short: int = 0
    repeated_short: int = 0
    unused: int = 0
    leftover_uses: int = 0
    bad_samples: int = 0
    bad_shards: int = 0

    def __add__(self, other: "SamplingStats") -> "SamplingStats":
        """Counter by counter sum."""
        if not isinstance(other, SamplingStats):
            return NotImplemented
        return SamplingStats(**{k: v + getattr(other, k) for k, v in self.to_dict().items()})

    def __iadd__(self, other: "SamplingStats") -> "SamplingStats":
        """Add ``other``'s counters to these, in place."""
        if not isinstance(other, SamplingStats):
            return NotImplemented
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def to_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return dataclasses.asdict(self)


def _check_int(name: str, value: Any, lowest: int) -> int:
    """``value`` as an int, or a DvectorError naming ``name`` unless it is an int >= ``lowest``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
        raise DvectorError(f"{name} must be an int >= {lowest}, got {value!r}")
    return int(value)


def draw_round(
    samples: Sequence[dict],
    n_speakers: int,
    n_utterances: int,
    seg_len: SegLen,
    rng: np.random.Generator,
    max_uses: int = 2,
    short_policy: str = "repeat",
    min_frames: int = DEFAULT_MIN_FRAMES,
    stats: SamplingStats | None = None,
    materialize: bool = True,
    skip: int = 0,
) -> Iterator[Batch]:
    """Draw GE2E batches (N speakers x M utterances x L frames) from one pool until it is used up.

    ``samples``: the pool, dicts with ``"mel"`` (T, n_mels) and ``"speaker_index"`` (int); the
    arrays are referenced, never modified. ``seg_len``: int, ``(lo, hi)`` drawn per batch, a string
    (``"160"``, ``"140-180"``) or a :class:`SegmentSpec`. ``max_uses``: batches one utterance may
    serve (a fresh crop each time).
    ``short_policy``: for utterances with T < L, ``"repeat"`` tiles the utterance (wrapping from a
    random start) up to L frames (real frames, unlike zero padding of log-mels, which is not
    silence) and ``"drop"`` never uses utterances shorter than the longest L (``hi``).
    Utterances shorter than ``min_frames`` are always dropped. ``stats`` is updated in place as the
    round goes. ``materialize=False`` draws exactly the same batches, consuming ``rng`` exactly the
    same way, but yields ``mels=None``. ``skip=k`` draws the first k batches without building or
    yielding them (resuming mid-round); they still count in ``stats``.

    Settings are checked on the call (not on the first ``next``); impossible ones raise
    :class:`DvectorError`. Same samples, settings and generator state give the same batches.
    """
    n_speakers = _check_int("n_speakers (N)", n_speakers, 2)
    n_utterances = _check_int("n_utterances (M)", n_utterances, 2)
    max_uses = _check_int("max_uses", max_uses, 1)
    min_frames = _check_int("min_frames", min_frames, 1)
    skip = _check_int("skip", skip, 0)
    spec = SegmentSpec.parse(seg_len)
    if short_policy not in SHORT_POLICIES:
        raise DvectorError(f"short_policy must be one of {SHORT_POLICIES}, got {short_policy!r}")
    if not isinstance(rng, np.random.Generator):
        raise DvectorError(
            f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}"
        )
    if stats is None:
        stats = SamplingStats()
    return _draw(
        samples, n_speakers, n_utterances, spec, rng, max_uses, short_policy, min_frames, stats, materialize, skip
    )


def crop(mel: np.ndarray, offset: int, L: int, out: np.ndarray | None = None) -> np.ndarray:
    """``L`` frames of ``mel`` (T, n_mels) from frame ``offset``: the one cropper of the package.

    ``mel[offset:offset + L]`` when ``T >= L``; when shorter, the utterance tiled from ``offset``
    (row i is frame ``(offset + i) % T``: the "repeat" policy's wrap, or ``offset=0`` to tile from
    the start). Written into ``out`` (L, n_mels), cast to its dtype, and returned; without ``out``
    the result is a view (long) or a new array (short) of ``mel``'s dtype.
    """
    T = mel.shape[0]
    if T >= L:
        rows = mel[offset : offset + L]  # (L, n_mels)
    else:
        rows = mel[(np.arange(L, dtype=np.int64) + offset) % T]  # (L, n_mels)
    if out is None:
        return rows
    out[...] = rows
    return out


def crop_rows(mels: Sequence[np.ndarray], offsets: Sequence[int], L: int, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (R, L, n_mels) with :func:`crop` of each ``mels[r]`` (T_r, n_mels) at ``offsets[r]``."""
    for r, (mel, o) in enumerate(zip(mels, offsets)):
        crop(mel, o, L, out[r])
    return out


def _read_pool(samples: Sequence[dict]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, int, Any]:
    """Check the pool in one Python pass: ``(mels, lengths (P,), speakers (P,), n_mels, dtype)``."""
    n = len(samples)
    mels: list[np.ndarray] = []
    lengths = np.empty(n, dtype=np.int64)
    speakers = np.empty(n, dtype=np.int64)
    n_mels = -1
    dtype = None
    for i, s in enumerate(samples):
        try:
            mel = s["mel"]
            speakers[i] = s["speaker_index"]
        except KeyError as e:
            raise DvectorError(f"pool sample {i} lacks {e}: samples need 'mel' and 'speaker_index'") from None
        if getattr(mel, "ndim", 0) != 2:
            got = getattr(mel, "shape", type(mel).__name__)
            raise DvectorError(f"pool sample {i}: 'mel' must be a 2-D array (frames, n_mels), got {got}")
        if n_mels < 0:
            n_mels, dtype = mel.shape[1], mel.dtype
        elif mel.shape[1] != n_mels:
            raise DvectorError(
                f"pool sample {i} has {mel.shape[1]} mel bands, earlier ones {n_mels}: mixed feature settings"
            )
        lengths[i] = mel.shape[0]
        mels.append(mel)
    return mels, lengths, speakers, n_mels, dtype


@dataclass
class _Usable:
    """A pool's usable utterances in CSR order (grouped by local speaker id, pool order within a
    speaker) and their remaining uses, updated as the round draws batches. U utterances, S speakers."""

    spk_ids: np.ndarray  # (S,) local speaker -> global speaker id
    csr_pool: np.ndarray  # (U,) CSR position -> pool index
    csr_spk: np.ndarray  # (U,) CSR position -> local speaker
    csr_len: np.ndarray  # (U,) frames
    csr_mels: list[np.ndarray]  # (U,) the utterances, (T, n_mels) each
    counts: np.ndarray  # (S,) usable utterances per speaker
    starts: np.ndarray  # (S,) first CSR position of each speaker
    uses_left: np.ndarray  # (U,)
    n_live: np.ndarray  # (S,) utterances with uses left, per speaker
    weight: np.ndarray  # (S,) remaining uses, per speaker

    @classmethod
    def index(
        cls, mels: list[np.ndarray], lengths: np.ndarray, speakers: np.ndarray, usable: np.ndarray, max_uses: int
    ) -> "_Usable":
        """The CSR layout of the pool utterances ``usable`` (pool indices), each with ``max_uses`` uses."""
        spk_ids, local = np.unique(speakers[usable], return_inverse=True)
        local = local.reshape(-1)
        order = np.argsort(local, kind="stable")
        csr_pool = usable[order]
        csr_spk = local[order]
        counts = np.bincount(csr_spk, minlength=len(spk_ids)).astype(np.int64)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        return cls(
            spk_ids=spk_ids, csr_pool=csr_pool, csr_spk=csr_spk, csr_len=lengths[csr_pool],
            csr_mels=[mels[i] for i in csr_pool.tolist()], counts=counts, starts=starts,
            uses_left=np.full(len(csr_pool), max_uses, dtype=np.int64), n_live=counts.copy(),
            weight=counts * max_uses,
        )

    def use(self, rows: np.ndarray, chosen_spk: np.ndarray, M: int) -> None:
        """Spend one use of each CSR position in ``rows`` (N*M,), M of each speaker in ``chosen_spk`` (N,)."""
        self.uses_left[rows] -= 1
        spent = rows[self.uses_left[rows] == 0]
        if len(spent):
            self.n_live -= np.bincount(self.csr_spk[spent], minlength=len(self.spk_ids))
        self.weight[chosen_spk] -= M


def _choose_speakers(eligible: np.ndarray, weight: np.ndarray, N: int, rng: np.random.Generator) -> np.ndarray:
    """N of the ``eligible`` local speakers without replacement, weighted by (remaining uses)^2, in
    random order (Efraimidis-Spirakis: the N smallest Exp(1)/w). The square drains speakers evenly,
    so few are left with data when the round ends; the mix stays as random as uniform choice (see
    pair_cooccurrence_ratio and the tests). Returns (N,) local speaker ids."""
    w = weight[eligible].astype(np.float64)
    keys = rng.exponential(size=len(eligible)) / (w * w)
    return eligible[np.argsort(keys, kind="stable")[:N]]  # (N,)


def _choose_utterances(
    pool: _Usable, chosen_spk: np.ndarray, M: int, max_uses: int, rng: np.random.Generator
) -> np.ndarray:
    """M distinct utterances of each chosen speaker: most uses left first, ties at random.

    The candidates are the chosen speakers' utterances, group by group; groups are separated by
    (max_uses + 1) in the sort key. Returns (N*M,) CSR positions, speaker-major.
    """
    N = len(chosen_spk)
    k = pool.counts[chosen_spk]  # (N,)
    group_start = np.concatenate(([0], np.cumsum(k)[:-1]))  # (N,)
    total = int(k.sum())
    group = np.repeat(np.arange(N, dtype=np.int64), k)  # (total,)
    cand = np.arange(total, dtype=np.int64) - np.repeat(group_start, k) + np.repeat(pool.starts[chosen_spk], k)
    sort_key = group * (max_uses + 1) + (max_uses - pool.uses_left[cand]) + rng.random(total)
    ranked = cand[np.argsort(sort_key, kind="stable")]  # (total,)
    rows = ranked[(group_start[:, None] + np.arange(M, dtype=np.int64)[None, :]).reshape(-1)]  # (N*M,)
    assert np.all(pool.uses_left[rows] > 0), f"picked a spent utterance: {pool.uses_left[rows]}"
    return rows


def _crop_offsets(row_len: np.ndarray, L: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random crop offsets for rows of ``row_len`` (R,) frames: in [0, T-L] for long utterances, the
    wrap start in [0, T) for short ones. Returns ``(offset (R,) int64, short (R,) bool)``."""
    u = rng.random(len(row_len))
    short = row_len < L
    offset = np.floor(u * np.where(short, row_len, row_len - L + 1)).astype(np.int64)
    return offset, short


def _draw(
    samples: Sequence[dict],
    N: int,
    M: int,
    spec: SegmentSpec,
    rng: np.random.Generator,
    max_uses: int,
    short_policy: str,
    min_frames: int,
    stats: SamplingStats,
    materialize: bool,
    skip: int,
) -> Iterator[Batch]:
    """:func:`draw_round` once its settings are checked: the pool is indexed on the first ``next``."""
    mels_all, lengths, speakers, n_mels, dtype = _read_pool(samples)
    shortest = shortest_usable(spec, short_policy, min_frames)
    usable = np.flatnonzero(lengths >= shortest)
    stats.utterances += len(samples)
    stats.dropped_short += len(samples) - len(usable)
    pool = _Usable.index(mels_all, lengths, speakers, usable, max_uses)
    row_group = np.repeat(np.arange(N, dtype=np.int64), M)  # (N*M,) row -> chosen speaker

    drawn = 0
    while True:
        eligible = np.flatnonzero(pool.n_live >= M)
        if len(eligible) < N:
            break
        L = spec.draw(rng)
        chosen_spk = _choose_speakers(eligible, pool.weight, N, rng)  # (N,)
        rows = _choose_utterances(pool, chosen_spk, M, max_uses, rng)  # (N*M,)
        offset, short = _crop_offsets(pool.csr_len[rows], L, rng)  # (N*M,)
        pool.use(rows, chosen_spk, M)

        stats.batches += 1
        stats.uses += N * M
        stats.repeated_short += int(short.sum())
        drawn += 1
        if drawn <= skip:
            continue
        mels = None
        if materialize:
            mels = crop_rows([pool.csr_mels[c] for c in rows.tolist()], offset.tolist(), L,
                             np.empty((N * M, L, n_mels), dtype=dtype))  # (N*M, L, n_mels)
        yield Batch(
            mels=mels,
            speaker_index=pool.spk_ids[chosen_spk][row_group],
            seg_len=L,
            pool_index=pool.csr_pool[rows],
            offset=offset,
        )

    stats.rounds += 1
    stats.unused += int(np.count_nonzero(pool.uses_left == max_uses))
    stats.leftover_uses += int(pool.uses_left.sum())


def pair_cooccurrence(batches_speakers: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed and chance-expected co-occurrence counts of every speaker pair over some batches.

    Each entry of ``batches_speakers`` holds the speakers of one batch (per row or per speaker;
    repeats within a batch count once). Returns ``(speakers, observed, expected)``: the distinct
    speakers and two (S, S) matrices, ``observed[a, b]`` = batches holding both a and b.

    The chance model keeps every speaker's number of appearances ``c_a`` and every batch's size
    ``n_t`` and deals the appearances into batch slots uniformly at random. Two given appearances
    then share a batch with probability ``p = sum_t n_t (n_t - 1) / (T (T - 1))``, ``T = sum_t n_t``,
    so ``expected[a, b] = c_a c_b p`` (for equal batches of N: ``c_a c_b (N - 1) / (B N - 1)``).
    """
    sets = [np.unique(np.asarray(b)) for b in batches_speakers]
    if not sets:
        z = np.zeros((0, 0))
        return np.zeros(0, dtype=np.int64), z, z
    speakers = np.unique(np.concatenate(sets))
    incidence = np.zeros((len(sets), len(speakers)), dtype=np.float64)  # (B, S)
    for t, s in enumerate(sets):
        incidence[t, np.searchsorted(speakers, s)] = 1.0
    observed = incidence.T @ incidence  # (S, S)
    c = incidence.sum(axis=0)  # appearances per speaker
    sizes = incidence.sum(axis=1)
    T = sizes.sum()
    p = float((sizes * (sizes - 1)).sum() / (T * (T - 1))) if T > 1 else 0.0
    expected = np.outer(c, c) * p
    return speakers, observed, expected


def pair_cooccurrence_ratio(
    batches_speakers: Sequence[np.ndarray], quantile: float = 1.0, min_expected: float = 5.0
) -> float:
    """How unevenly speakers mix: a quantile (default the max) of observed / expected over pairs.

    Observed and expected co-occurrence counts are those of :func:`pair_cooccurrence`. Only pairs
    expected to meet at least ``min_expected`` times are scored: for rarer pairs one chance meeting
    already gives a large ratio, so the statistic would measure noise. Under the chance model a
    pair's count is about Poisson(E), so for perfectly random batches the max over P pairs lies
    near ``1 + z / sqrt(E)`` with ``z`` the Gaussian quantile for 1/P (about 3 for a few hundred
    pairs); batches built from fixed groups of N out of S speakers give about S / (N - 1).
    Returns NaN when no pair qualifies. Evaluate it on batches from the same pool (or the same
    speakers), since speakers of different pools cannot meet at all.
    """
    if not 0.0 <= quantile <= 1.0:
        raise DvectorError(f"quantile must be in [0, 1], got {quantile}")
    _, observed, expected = pair_cooccurrence(batches_speakers)
    iu = np.triu_indices(len(observed), k=1)
    o, e = observed[iu], expected[iu]
    keep = e >= min_expected
    if not keep.any():
        return float("nan")
    return float(np.quantile(o[keep] / e[keep], quantile))
