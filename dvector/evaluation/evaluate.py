"""Verification: cosine scores, trials (a file in VoxCeleb or Kaldi/NIST form, or generated within
the test set), EER, minDCF and the EER threshold, the DET curve. Where results are stored, and the
threshold ``score`` decides with, are :mod:`dvector.evaluation.results`'s.

The test set is a root (trial entries are paths relative to it) or a Kaldi data directory
(:class:`KaldiTestSet`; trial entries are its utterance ids). Every utterance is embedded once,
however many trials name it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Sequence

import numpy as np

from dvector.corpus import ScanResult, Utterance, scan_roots
from dvector.config import DEFAULT_EXTENSIONS
from dvector.inference.embed_inputs import NothingEmbedded, Workers, embed_each
from dvector.inference.embedder import Embedder, model_identity
from dvector.errors import DvectorError
from dvector.metrics import eer, error_rates, min_dcf

P_TARGETS = (0.01, 0.05)
MAX_TARGET_TRIALS = 100_000
MAX_NONTARGET_TRIALS = 100_000
MIN_NONTARGET_TRIALS = 1_000


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (embeddings are unit length, but do not rely on it)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise DvectorError(f"embeddings of different sizes: {a.size} and {b.size}")
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else 0.0


# ---- trials --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trial:
    label: int | None  # 1: same speaker (target), 0: different; None: unlabelled (scored, never evaluated)
    a: str  # path relative to the root, or an utterance id of a Kaldi data directory
    b: str


TRIAL_WORDS = {"target": 1, "nontarget": 0}  # Kaldi/NIST trials: 'utt1 utt2 target|nontarget'


def trial_of(parts: Sequence[str], labels: bool = True) -> Trial | None:
    """The trial of one line's fields, in VoxCeleb form (``1 a b``, ``0 a b``) or Kaldi/NIST form
    (``a b target``, ``a b nontarget``), or without ``labels`` also unlabelled (``a b``, label None:
    a blind list, to score); None for a line in none of them."""
    if len(parts) == 2 and not labels:
        return Trial(None, parts[0], parts[1])
    if len(parts) != 3:
        return None
    if parts[0] in ("0", "1"):
        return Trial(int(parts[0]), parts[1], parts[2])
    label = TRIAL_WORDS.get(parts[2].lower())
    return Trial(label, parts[0], parts[1]) if label is not None else None


def outside_root(path: str) -> str | None:
    """Why a trial path could name a file outside the root (absolute, or with a ``..`` part), or None.

    Only the text counts: a symlink inside the root that points elsewhere was put there by the user.
    """
    if os.path.isabs(path) or PureWindowsPath(path).is_absolute() or path.startswith(("/", "\\")):
        return "is an absolute path"
    if ".." in PurePosixPath(path.replace("\\", "/")).parts:  # trials files use "/" whatever the system
        return "climbs out with '..'"
    return None


def parse_trials(lines: Sequence[str], where: str = "trials", paths: bool = True, labels: bool = True
                 ) -> list[Trial]:
    """One trial per line, in either form, detected per line: ``label path1 path2`` (VoxCeleb; label
    1 or 0) or ``utt1 utt2 target|nontarget`` (Kaldi/NIST); without ``labels`` (scoring, not
    evaluating) also ``path1 path2``; blank and ``#`` lines skipped. With ``paths`` (a test root) the
    entries must stay inside the root; else they are utterance ids."""
    trials = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        trial = trial_of(parts, labels)
        if trial is None:
            blind = "" if labels else "'path1 path2', "
            hint = "; unlabelled trials are scored with `dvector score --trials`" if labels and len(parts) == 2 else ""
            raise DvectorError(f"{where} line {number}: expected {blind}'label path1 path2' with label 1 (same "
                               f"speaker) or 0 (different), or 'utt1 utt2 target|nontarget', got {text[:200]!r}{hint}")
        for path in (trial.a, trial.b) if paths else ():
            problem = outside_root(path)
            if problem:
                raise DvectorError(f"{where} line {number}: {path!r} {problem}; trial paths are relative to the "
                                   f"test root and stay inside it")
        trials.append(trial)
    if not trials:
        raise DvectorError(f"{where} holds no trials")
    return trials


def read_trials(path: str | os.PathLike[str], paths: bool = True, labels: bool = True) -> list[Trial]:
    """The trials of a file (see :func:`parse_trials`)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DvectorError(f"cannot read trials file {path}: {exc}") from exc
    return parse_trials(lines, str(path), paths, labels)


def write_trials(path: str | os.PathLike[str], trials: Sequence[Trial]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in trials:
            f.write(f"{t.label} {t.a} {t.b}\n")


def check_trial_files(trials: Sequence[Trial], root: str | os.PathLike[str], where: str = "trials") -> list[str]:
    """The distinct files the trials name (first-seen order); an error naming any that are missing."""
    files = list(dict.fromkeys(p for t in trials for p in (t.a, t.b)))
    for p in files:
        problem = outside_root(p)
        if problem:
            raise DvectorError(f"{where}: {p!r} {problem}; trial paths are relative to {root} and stay inside it")
    missing = [p for p in files if not (Path(root) / p).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DvectorError(f"{where}: {len(missing)} of {len(files)} files are not under {root}: "
                           f"{', '.join(missing[:3])}{more}")
    return files


def check_trial_ids(trials: Sequence[Trial], scan: ScanResult, data_dir: str, where: str = "trials"
                    ) -> list[Utterance]:
    """The distinct utterances the trials name (first-seen order) among those a Kaldi data directory
    lists; an error naming any id it does not list (and its listing problems, which may be why)."""
    by_id = {u.source: u for u in scan.utterances}
    ids = list(dict.fromkeys(p for t in trials for p in (t.a, t.b)))
    missing = [i for i in ids if i not in by_id]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        about = [(w, r) for w, r in scan.problems if any(f"{i!r}" in r for i in missing)]  # why one is not listed
        why = f" ({about[0][0]}: {about[0][1]})" if about else ""
        raise DvectorError(f"{where}: {len(missing)} of {len(ids)} utterance ids are not in {data_dir}: "
                           f"{', '.join(missing[:3])}{more}{why}")
    return [by_id[i] for i in ids]


def default_nontarget(n_target: int) -> int:
    """As many non-target as target trials, at least 1,000 and at most 100,000."""
    return int(min(MAX_NONTARGET_TRIALS, max(MIN_NONTARGET_TRIALS, n_target)))


def generate_trials(files_by_speaker: dict[str, list[str]], n_nontarget: int | None = None, seed: int = 0,
                    max_target: int = MAX_TARGET_TRIALS) -> list[Trial]:
    """All same-speaker pairs (a seeded sample if there are more than ``max_target``) and a seeded
    sample of ``n_nontarget`` distinct different-speaker pairs (all of them if there are fewer)."""
    rng = np.random.default_rng([seed, 0x7A1])
    speakers = sorted(s for s, f in files_by_speaker.items() if f)
    if len(speakers) < 2:
        raise DvectorError(f"need at least 2 speakers to make trials, found {len(speakers)}")
    files: list[str] = []
    owner: list[int] = []
    for k, spk in enumerate(speakers):
        files.extend(sorted(files_by_speaker[spk]))
        owner.extend([k] * len(files_by_speaker[spk]))
    spk_of = np.asarray(owner)
    targets: list[tuple[int, int]] = []
    start = 0
    for k, spk in enumerate(speakers):
        n = len(files_by_speaker[spk])
        i, j = np.triu_indices(n, k=1)
        targets.extend(zip((i + start).tolist(), (j + start).tolist()))
        start += n
    if not targets:
        raise DvectorError("no speaker has 2 or more usable files: no same-speaker trials can be made")
    if len(targets) > max_target:
        targets = [targets[i] for i in sorted(rng.choice(len(targets), size=max_target, replace=False))]
    wanted = default_nontarget(len(targets)) if n_nontarget is None else int(n_nontarget)
    if wanted < 1:
        raise DvectorError(f"--n-nontarget must be >= 1, got {wanted}")
    n = len(files)
    total_nontarget = (n * (n - 1)) // 2 - sum(len(f) * (len(f) - 1) // 2 for f in files_by_speaker.values())
    if wanted >= total_nontarget:
        i, j = np.triu_indices(n, k=1)
        keep = spk_of[i] != spk_of[j]
        nontargets = list(zip(i[keep].tolist(), j[keep].tolist()))
    else:
        chosen: set[tuple[int, int]] = set()
        while len(chosen) < wanted:
            draw = rng.integers(0, n, size=(2 * (wanted - len(chosen)) + 16, 2))
            for a, b in draw.tolist():
                if spk_of[a] != spk_of[b]:
                    chosen.add((min(a, b), max(a, b)))
                    if len(chosen) == wanted:
                        break
        nontargets = sorted(chosen)
    return ([Trial(1, files[a], files[b]) for a, b in targets]
            + [Trial(0, files[a], files[b]) for a, b in nontargets])


# ---- results -------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    eer: float  # a fraction
    eer_threshold: float  # cosine score: accept (same speaker) when score >= threshold
    min_dcf: dict[str, float]  # p_target (as text, "0.01") -> minimum normalised DCF
    min_dcf_threshold: dict[str, float]
    n_trials: int
    n_target: int
    n_nontarget: int
    n_files: int = 0
    trials: str = ""  # the trials file, or how trials were generated
    root: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # files that could not be embedded
    model: dict[str, Any] = field(default_factory=dict)
    norm: dict[str, Any] | None = None  # S-norm / AS-norm: its settings and the normalised scores' metrics

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [list(s) for s in self.skipped]
        return d


def compute_metrics(scores: np.ndarray, labels: np.ndarray) -> EvalResult:
    """EER, its threshold and minDCF at p_target 0.01 and 0.05 of cosine scores and 1/0 labels."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    rate, threshold = eer(scores, labels)
    dcf, dcf_t = {}, {}
    for p in P_TARGETS:
        dcf[str(p)], dcf_t[str(p)] = min_dcf(scores, labels, p_target=p)
    return EvalResult(rate, threshold, dcf, dcf_t, int(labels.size), int(labels.sum()), int((~labels).sum()))


@dataclass
class Evaluation:
    result: EvalResult
    scores: np.ndarray
    labels: np.ndarray
    trials: list[Trial]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # each trial file's embedding


@dataclass(frozen=True)
class KaldiTestSet:
    """A Kaldi data directory as the test set (``eval --kaldi``): trial entries are its utterance ids;
    generated trials pair its utterances by ``utt2spk``. See :func:`dvector.corpus.kaldi.scan_kaldi`."""

    data_dir: str
    kaldi_root: str | None = None  # where wav.scp's relative paths start (None: the current folder)
    allow_commands: bool = False  # run wav.scp entries that are commands

    @cached_property
    def listing(self) -> ScanResult:
        """Its utterances and the problems listing them, read once."""
        from dvector.corpus.kaldi import scan_kaldi

        return scan_kaldi([self.data_dir], self.kaldi_root, self.allow_commands)


def check_test_set(root: str | os.PathLike[str] | None, kaldi: KaldiTestSet | None
                   ) -> tuple[Path | None, ScanResult | None]:
    """(root, None) or (None, the Kaldi data directory's listing): exactly one test set, there to be
    read (called before a model is loaded, so that a wrong one fails at once)."""
    if (root is None) == (kaldi is None):
        raise DvectorError("give the test set as ROOT or as --kaldi DATA_DIR" + (", not both" if kaldi else ""))
    if kaldi is not None:
        return None, kaldi.listing
    assert root is not None
    if not Path(root).is_dir():
        raise DvectorError(f"root {root} does not exist or is not a directory")
    return Path(root), None


def _listing(root: Path | None, scan: ScanResult | None, extensions: Sequence[str], name: str
             ) -> list[tuple[str, Any, str]]:
    """``(key, source, speaker)`` of every utterance of the test set: a root's speaker folders, or a
    Kaldi data directory's utterances with their utt2spk speakers."""
    if scan is None:
        assert root is not None
        scan, what = scan_roots([str(root)], extensions), "speaker folders with audio"
        sources = [(u.source, root / u.source, u.speaker) for u in scan.utterances]
    else:
        what = "speakers with utterances in utt2spk"
        sources = [(u.source, u, u.speaker) for u in scan.utterances]
    if len(scan.speakers) < 2:
        raise DvectorError(f"{name} needs at least 2 {what} to make trials (found {len(scan.speakers)}); "
                           f"or give --trials")
    return sources


def trial_sources(trials: Sequence[Trial], root: Path | None, scan: ScanResult | None, name: str, where: str
                   ) -> list[tuple[str, Any]]:
    """``(key, source)`` of each distinct utterance the trials name; an error naming those missing."""
    if scan is not None:
        return [(u.source, u) for u in check_trial_ids(trials, scan, name, where)]
    assert root is not None
    return [(rel, root / rel) for rel in check_trial_files(trials, root, where)]


def evaluate(embedder: Embedder, root: str | os.PathLike[str] | None,
             trials_file: str | os.PathLike[str] | None = None, n_nontarget: int | None = None, seed: int = 0,
             extensions: Sequence[str] = DEFAULT_EXTENSIONS, on_start: Callable[[int], None] | None = None,
             on_file: Callable[[], None] | None = None, workers: Workers | None = None,
             kaldi: KaldiTestSet | None = None) -> Evaluation:
    """Score trials (from ``trials_file``: paths relative to ``root``, or utterance ids of the Kaldi
    data directory ``kaldi``; or generated from the speakers of the test set) with cosine similarity
    and compute EER, its threshold and minDCF. The utterances are embedded on ``workers`` (local
    processes or Dask; the same result as one process). A Kaldi directory's listing problems are
    counted with the utterances skipped."""
    root, scan = check_test_set(root, kaldi)
    name = str(root) if root is not None else kaldi.data_dir  # type: ignore[union-attr]
    on_item = (lambda _key: on_file()) if on_file else None
    skipped: list[tuple[str, str]] = list(scan.problems) if scan is not None else []
    if trials_file is not None:
        trials = read_trials(trials_file, paths=scan is None)
        pairs = trial_sources(trials, root, scan, name, str(trials_file))
        if on_start:
            on_start(len(pairs))
        vectors, _ = embed_each(pairs, embedder.embed, True, on_item=on_item, workers=workers)
        how = str(trials_file)
    else:
        sources = _listing(root, scan, extensions, name)
        if on_start:
            on_start(len(sources))
        vectors, failed = embed_each([(k, src) for k, src, _ in sources], embedder.embed, False, on_item=on_item,
                                     workers=workers)
        skipped.extend(failed)
        by_speaker: dict[str, list[str]] = {}
        for key, _, speaker in sources:
            if key in vectors:
                by_speaker.setdefault(speaker, []).append(key)
        try:
            trials = generate_trials(by_speaker, n_nontarget, seed)
        except DvectorError as exc:
            if not skipped:
                raise
            raise NothingEmbedded(f"{exc} ({len(skipped)} file(s) could not be embedded)", skipped) from None
        n_non = sum(1 for t in trials if t.label == 0)
        how = f"generated: all target pairs, {n_non} non-target pairs (seed {seed})"
    scores = np.array([cosine(vectors[t.a], vectors[t.b]) for t in trials])
    labels = np.array([t.label for t in trials], dtype=bool)
    result = compute_metrics(scores, labels)
    result.n_files, result.trials, result.root, result.skipped = len(vectors), how, name, skipped
    result.model = model_identity(embedder)
    return Evaluation(result, scores, labels, trials, vectors)


def det_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-accept, false-reject) rates over all thresholds, for plotting."""
    rates = error_rates(scores, labels)
    return rates.false_accept, rates.false_reject


def save_det(evaluation: Evaluation, path: str | os.PathLike[str]) -> Path:
    """The DET curve of an evaluation, with its EER point and minDCF operating points, as a PNG."""
    from dvector.evaluation.plot import plot_det

    scores, labels = evaluation.scores, evaluation.labels
    far, frr = det_curve(scores, labels)
    points = {}
    for p, t in evaluation.result.min_dcf_threshold.items():
        accepted = scores >= t
        points[f"minDCF p={p}: {evaluation.result.min_dcf[p]:.3f}"] = (
            float(accepted[~labels].mean()), float(1 - accepted[labels].mean()))
    r = evaluation.result
    return plot_det(far, frr, path, eer=r.eer, dcf_points=points,
                    title=f"DET: {r.n_target} target, {r.n_nontarget} non-target trials")
