"""Stored evaluation results and the decision threshold: where ``eval`` writes ``eval.json`` and the
DET curve for a model (:func:`eval_outputs`, :func:`run_eval`), and the threshold ``score`` decides
same/different speaker with (:func:`decision_threshold`, :func:`decide`); the scores of a trial
list (:func:`score_trials`, ``score --trials``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dvector.files import OutputError, json_text, write_output
from dvector.config import DEFAULT_EXTENSIONS
from dvector.errors import DvectorError
from dvector.inference.bundle import training_shards
from dvector.inference.embed_inputs import NothingEmbedded, Workers, embed_each
from dvector.inference.embedder import Embedder, load, untrained_twin
from dvector.evaluation.evaluate import (EvalResult, Evaluation, KaldiTestSet, Trial, check_test_set, cosine, evaluate,
                                         read_trials, save_det, trial_sources)
from dvector.evaluation.plot import picture_format
from dvector.evaluation.score_norm import (DEFAULT_TOP_N, ScoreNorm, check_norm, cohort_from_shards,
                                           normalize_evaluation, symmetric_norm)

EVAL_FILE = "eval.json"
DET_FILE = "det.png"
DEFAULT_THRESHOLD = 0.5  # cosine; used by `score` only until `eval` has stored a calibrated one
NO_DET_NOTE = "no DET curve: MODEL is not a folder to store it in; give --det PATH"
NO_SAVE_NOTE = "no DET curve: --no-save stores nothing beside MODEL; give --det PATH to draw one"


def eval_path(model: str | os.PathLike[str]) -> Path | None:
    """Where ``eval`` stores results for a model: ``MODEL/eval.json`` when MODEL is a folder (a run or
    an export); for a checkpoint in a run's ``checkpoints/``, the run folder's; for an exported
    ``dvector.pt``, its folder's; for another file, an ``eval.json`` beside it if there is one."""
    p = Path(model)
    if p.is_dir():
        return p / EVAL_FILE
    if p.parent.name == "checkpoints":
        return p.parent.parent / EVAL_FILE
    if p.name == "dvector.pt" or (p.parent / EVAL_FILE).is_file():
        return p.parent / EVAL_FILE
    return None


def write_eval(path: Path, result: EvalResult, det: Path | None = None) -> None:
    """``eval.json``, atomically, as strict JSON: a number that is not finite is stored as ``null``
    (e.g. the minDCF threshold where rejecting every trial is cheapest, +inf), never as the ``NaN``
    or ``Infinity`` that strict JSON parsers refuse. A failure to write is an :class:`OutputError`."""
    write_output(path, json_text({**result.to_dict(), "det": str(det) if det else None,
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))


# ---- eval: what is written where -----------------------------------------------------------------

def eval_outputs(model: str | os.PathLike[str], det: str | os.PathLike[str] | None = None, save: bool = True,
                 untrained: bool = False) -> tuple[Path | None, Path | None]:
    """(results file, DET picture) of an evaluation of ``model``; None: not written.

    Results go to :func:`eval_path` when ``save`` and not ``untrained`` (a baseline must not replace
    the model's calibrated threshold). The DET curve goes to ``det`` if given, else beside the results.
    """
    results = eval_path(model) if save and not untrained else None
    if det is not None:
        return results, Path(det)
    return results, (results.parent / DET_FILE if results is not None else None)


@dataclass
class EvalRun:
    """What :func:`run_eval` did: the evaluation and the files it wrote."""

    evaluation: Evaluation
    results_path: Path | None  # eval.json written, or None
    det_path: Path | None  # DET curve written, or None
    note: str | None = None  # worth telling the user (e.g. why there is no DET curve)
    warnings: list[str] = field(default_factory=list)  # outputs that could not be written, and why

    @property
    def result(self) -> EvalResult:
        return self.evaluation.result


def run_eval(model: str | os.PathLike[str], root: str | os.PathLike[str] | None,
             trials: str | os.PathLike[str] | None = None, *, det: str | os.PathLike[str] | None = None,
             save: bool = True, untrained: bool = False, n_nontarget: int | None = None, seed: int = 0,
             extensions: str | Sequence[str] = DEFAULT_EXTENSIONS, threads: int = 0,
             on_start: Callable[[int], None] | None = None, on_file: Callable[[], None] | None = None,
             norm: str = "none", cohort: str | Sequence[str] | None = None, cohort_top: int = DEFAULT_TOP_N,
             on_cohort: tuple[Callable[..., None], Callable[..., None]] | None = None,
             workers: Workers | None = None, kaldi: KaldiTestSet | None = None) -> EvalRun:
    """``dvector eval``: load ``model`` (its untrained twin with ``untrained``, a baseline), evaluate it
    on ``root`` or on the Kaldi data directory ``kaldi`` (see :func:`dvector.evaluation.evaluate.evaluate`), store the results (``eval.json``, first:
    they hold the threshold ``score`` needs) and then draw the DET curve, where :func:`eval_outputs` says.

    ``threads``: torch CPU threads while embedding (0: torch's default). ``norm`` ("snorm", "asnorm"):
    also normalise the scores against the speakers of the ``cohort`` shards (top ``cohort_top`` for
    AS-norm; see :mod:`dvector.evaluation.score_norm`); the results hold both, the normalised under ``norm``.
    ``on_cohort``: (on_start, on_item) progress callbacks while the cohort is embedded. ``workers``:
    where the test files are embedded (local processes or Dask; :class:`dvector.inference.embed_inputs.Workers`).
    """
    cohort = cohort or default_cohort(model, norm)
    method = check_norm(norm, cohort, cohort_top)
    check_test_set(root, kaldi)
    if det is not None:
        picture_format(det)  # a format there is none of: before the work, not after it
    embedder = load(model, threads=threads)
    if untrained:
        embedder = untrained_twin(embedder)
    score_norm = None
    if method != "none":
        assert cohort is not None
        made = cohort_from_shards(embedder, cohort, *(on_cohort or ()))
        score_norm = ScoreNorm(method, made, cohort_top)
    evaluation = evaluate(embedder, root, trials, n_nontarget=n_nontarget, seed=seed, extensions=extensions,
                          on_start=on_start, on_file=on_file, workers=workers, kaldi=kaldi)
    if score_norm is not None:
        evaluation.result.norm = normalize_evaluation(evaluation, score_norm)
    results, det_path = eval_outputs(model, det, save, untrained)
    note = None if det_path is not None or untrained else NO_SAVE_NOTE if not save else NO_DET_NOTE
    run = EvalRun(evaluation, None, None, note)
    if score_norm is not None:
        run.warnings.extend(f"cohort: skipped {where}: {why}" for where, why in score_norm.cohort.skipped)
    if results is not None:
        run.results_path = _written(run, results, lambda: write_eval(results, evaluation.result, det_path),
                                    f"the results and threshold were not stored (`score` uses the default "
                                    f"threshold until they are); pass --no-save to skip {EVAL_FILE}")
    if det_path is not None:
        run.det_path = _written(run, det_path, lambda: save_det(evaluation, det_path), "give --det PATH elsewhere")
        if run.det_path is None and run.results_path is not None:
            _written(run, results, lambda: write_eval(results, evaluation.result, None), "")  # no dangling "det"
    return run


def _written(run: EvalRun, path: Path, write: Callable[[], Any], advice: str) -> Path | None:
    """``write()`` and ``path``; or, if the file system refuses (read-only, full, no permission),
    None and a warning in ``run``: an evaluation that was computed is never lost to a file."""
    try:
        write()
    except (OSError, OutputError) as exc:
        reason = exc.reason if isinstance(exc, OutputError) else exc.strerror or str(exc)
        run.warnings.append(f"could not write {path}: {reason}" + (f"; {advice}" if advice else ""))
        return None
    return path


# ---- score: the threshold and the decision -------------------------------------------------------

@dataclass
class Threshold:
    value: float
    source: str  # where it came from, for the printout
    stored: bool  # False: the default
    note: str | None = None  # a warning worth showing (e.g. computed for another checkpoint)


def decision_threshold(model: str | os.PathLike[str], embedder: Embedder | None = None) -> Threshold:
    """The EER threshold ``eval`` stored for this model, or DEFAULT_THRESHOLD with a warning."""
    path = eval_path(model)
    if path is None or not path.is_file():
        return Threshold(DEFAULT_THRESHOLD, "default", False,
                         f"no {EVAL_FILE} for {model}: using the default threshold {DEFAULT_THRESHOLD}; "
                         f"run `dvector eval MODEL ROOT` to calibrate one")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        value = float(data["eer_threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Threshold(DEFAULT_THRESHOLD, "default", False,
                         f"cannot read the threshold from {path} ({exc}): using the default {DEFAULT_THRESHOLD}")
    note = None
    stored_sha = (data.get("model") or {}).get("sha256")
    if embedder is not None and stored_sha and stored_sha != embedder.info.get("sha256"):
        step = (data.get("model") or {}).get("step")
        note = (f"the threshold in {path} was computed for another model file"
                + (f" (step {step})" if step is not None else "") + "; run `dvector eval` again to recalibrate")
    eer_text = f", EER {100 * float(data['eer']):.2f}%" if "eer" in data else ""
    return Threshold(value, f"{path}{eer_text}", True, note)


def choose_threshold(model: str | os.PathLike[str], embedder: Embedder | None = None,
                     override: float | None = None) -> Threshold:
    """``override`` (``score --threshold``) if given, else the stored threshold (or the default)."""
    if override is not None:
        return Threshold(float(override), "--threshold", True)
    return decision_threshold(model, embedder)


@dataclass
class Decision:
    """A score, the threshold it was compared with, and the verdict."""

    score: float
    threshold: Threshold

    @property
    def same(self) -> bool:
        """Same speaker: the score reaches the threshold."""
        return self.score >= self.threshold.value

    @property
    def text(self) -> str:
        return "same speaker" if self.same else "different speakers"


def norm_threshold(model: str | os.PathLike[str], method: str, top_n: int, cohort: str,
                   embedder: Embedder | None = None, override: float | None = None) -> Threshold:
    """``override`` if given, else the normalised scores' EER threshold ``eval --norm`` stored for
    ``model`` with the same method and top-N; none stored is an error (a cosine threshold means
    nothing on normalised scores)."""
    if override is not None:
        return Threshold(float(override), "--threshold", True)
    path = eval_path(model)
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise DvectorError(f"cannot read {path}: {exc}") from None
    stored = data.get("norm") if isinstance(data, dict) else None
    try:
        value, eer = float(stored["eer_threshold"]), float(stored["eer"])  # type: ignore[index]
        same = stored["method"] == method and (method == "snorm" or int(stored["top_n"]) == top_n)  # type: ignore
    except (KeyError, TypeError, ValueError):
        same = False
    if not same:
        top = f" (--cohort-top {top_n})" if method == "asnorm" else ""
        raise DvectorError(f"no {method} threshold{top} stored for {model}: run `dvector eval "
                           f"MODEL ROOT --norm {method} --cohort SHARDS` first, or give --threshold")
    notes = []
    stored_sha = (data.get("model") or {}).get("sha256")
    if embedder is not None and stored_sha and stored_sha != embedder.info.get("sha256"):
        notes.append(f"the threshold in {path} was computed for another model file; run `dvector eval` again")
    if stored.get("cohort") != cohort:
        notes.append(f"the stored {method} threshold was computed with the cohort {stored.get('cohort')}, not {cohort}")
    return Threshold(value, f"{path}, {method}, EER {100 * eer:.2f}%", True, "; ".join(notes) or None)


def decide(embedder: Embedder, a: Any, b: Any, model: str | os.PathLike[str],
           threshold: float | None = None) -> Decision:
    """Cosine score of utterances ``a`` and ``b`` and same/different speaker at ``threshold`` if given,
    else at the threshold ``eval`` stored for ``model`` (see :func:`choose_threshold`)."""
    used = choose_threshold(model, embedder, threshold)
    return Decision(cosine(embedder.embed(a), embedder.embed(b)), used)


def default_cohort(model: str | os.PathLike[str], norm: str) -> list[str] | None:
    """The cohort where none is given: the run's training shards, as its checkpoint records them
    (None where ``norm`` needs none, or the model records none)."""
    if (norm or "none").strip().lower() == "none":
        return None
    return training_shards(model)


def decide_normalized(model: str | os.PathLike[str], a: Any, b: Any, norm: str, cohort: str | Sequence[str] | None,
                      cohort_top: int = DEFAULT_TOP_N, threshold: float | None = None, threads: int = 0,
                      on_cohort: tuple[Callable[..., None], Callable[..., None]] | None = None,
                      ) -> tuple[Decision, ScoreNorm | None]:
    """``dvector score --norm``: the score of ``a`` and ``b`` normalised against the speakers of the
    ``cohort`` shards, decided at ``threshold`` or the normalised threshold ``eval --norm`` stored
    (:func:`norm_threshold`, checked before the cohort is embedded); ``norm`` "none": :func:`decide`."""
    cohort = cohort or default_cohort(model, norm)
    method = check_norm(norm, cohort, cohort_top)
    embedder = load(model, threads=threads)
    if method == "none":
        return decide(embedder, a, b, model, threshold), None
    assert cohort is not None
    text = cohort if isinstance(cohort, str) else " ".join(map(str, cohort))
    used = norm_threshold(model, method, cohort_top, text, embedder, threshold)
    x, y = embedder.embed(a), embedder.embed(b)
    score_norm = ScoreNorm(method, cohort_from_shards(embedder, cohort, *(on_cohort or ())), cohort_top)
    score = score_norm.normalize(np.array([cosine(x, y)]), x[None], y[None])[0]
    return Decision(float(score), used), score_norm


def score_pair(embedder: Embedder, a: Any, b: Any, model: str | os.PathLike[str]) -> tuple[float, Threshold]:
    """Cosine score of two utterances and the threshold to decide same/different with."""
    decision = decide(embedder, a, b, model)
    return decision.score, decision.threshold


# ---- score --trials: a trial list's scores -------------------------------------------------------

@dataclass
class TrialScores:
    """What :func:`score_trials` scored: the trials that could be, their scores, and the threshold
    they are decided at (None: none stored or given, scores only)."""

    trials: list[Trial]
    scores: np.ndarray
    threshold: Threshold | None
    skipped: list[tuple[str, str]]  # (entry, reason) of each file that could not be embedded
    left_out: int  # trials naming one of them
    score_norm: ScoreNorm | None = None
    note: str | None = None  # e.g. why there are no decisions

    def text(self) -> str:
        """One line a trial, ``a b score`` (6 decimals), as WeSpeaker's and Kaldi's scoring scripts read
        it, plus ``target``/``nontarget`` at the threshold where there is one."""
        cut = self.threshold.value if self.threshold is not None else None
        return "".join(f"{t.a} {t.b} {s:.6f}" + ("" if cut is None else " target" if s >= cut else " nontarget")
                       + "\n" for t, s in zip(self.trials, self.scores.tolist()))


def _list_threshold(model: str | os.PathLike[str], method: str, top_n: int, cohort: str, embedder: Embedder,
                    override: float | None) -> tuple[Threshold | None, str | None]:
    """The threshold to decide a trial list at and a note; (None, why) where none is stored or given."""
    if override is not None or method == "none":
        used = choose_threshold(model, embedder, override)
        return (used, None) if used.stored else (None, f"no threshold stored for {model}: scores without "
                                                     f"decisions (run `dvector eval` or give --threshold)")
    try:
        return norm_threshold(model, method, top_n, cohort, embedder), None
    except DvectorError as exc:
        return None, f"{exc}: scores without decisions"


def score_trials(model: str | os.PathLike[str], root: str | os.PathLike[str] | None,
                 trials_file: str | os.PathLike[str], *, kaldi: KaldiTestSet | None = None, norm: str = "none",
                 cohort: str | Sequence[str] | None = None, cohort_top: int = DEFAULT_TOP_N,
                 threshold: float | None = None, threads: int = 0, on_start: Callable[[int], None] | None = None,
                 on_file: Callable[[], None] | None = None,
                 on_cohort: tuple[Callable[..., None], Callable[..., None]] | None = None,
                 workers: Workers | None = None) -> TrialScores:
    """``dvector score --trials``: the cosine score of each trial of ``trials_file`` (labelled or not;
    entries are paths relative to ``root`` or utterance ids of ``kaldi``), normalised with ``norm``
    as :func:`decide_normalized` does, decided at ``threshold`` or the stored one. Every file is
    embedded once; one that fails is skipped and the trials naming it are left out; none left is
    :class:`NothingEmbedded`. A missing file or id is an error before the model is loaded."""
    cohort = cohort or default_cohort(model, norm)
    method = check_norm(norm, cohort, cohort_top)
    root, scan = check_test_set(root, kaldi)
    name = str(root) if root is not None else kaldi.data_dir  # type: ignore[union-attr]
    trials = read_trials(trials_file, paths=scan is None, labels=False)
    pairs = trial_sources(trials, root, scan, name, str(trials_file))
    embedder = load(model, threads=threads)
    text = cohort if isinstance(cohort, str) or cohort is None else " ".join(map(str, cohort))
    used, note = _list_threshold(model, method, cohort_top, text or "", embedder, threshold)
    score_norm = None
    if method != "none":
        assert cohort is not None
        score_norm = ScoreNorm(method, cohort_from_shards(embedder, cohort, *(on_cohort or ())), cohort_top)
    if on_start:
        on_start(len(pairs))
    vectors, skipped = embed_each(pairs, embedder.embed, False, on_item=(lambda _key: on_file()) if on_file else None,
                                  workers=workers)
    kept = [t for t in trials if t.a in vectors and t.b in vectors]
    if not kept:
        raise NothingEmbedded(f"no trial of {trials_file} could be scored: {len(skipped)} of {len(pairs)} "
                              f"file(s) could not be embedded", skipped)
    scores = np.array([cosine(vectors[t.a], vectors[t.b]) for t in kept])
    if score_norm is not None:  # each file's cohort statistics once, however many trials name it
        files = sorted({p for t in kept for p in (t.a, t.b)})
        row = {f: i for i, f in enumerate(files)}
        mean, std = score_norm.stats(np.stack([vectors[f] for f in files]))
        a, b = np.array([row[t.a] for t in kept]), np.array([row[t.b] for t in kept])
        scores = symmetric_norm(scores, (mean[a], std[a]), (mean[b], std[b]))
    return TrialScores(kept, scores, used, skipped, len(trials) - len(kept), score_norm, note)
