"""Diarization error rate of hypothesis RTTMs against references, scored by ``pyannote.metrics``.

DER = (missed speech + false alarm + speaker confusion) / reference speech, after the optimal
one-to-one mapping of hypothesis to reference labels (so label names do not matter). ``collar``
is md-eval's: that many seconds on each side of every reference boundary are not scored (the
field's usual 0.25 s; pyannote's ``collar`` argument is the whole width, twice this). Overlapped
reference speech is scored unless ``skip_overlap``.

``pyannote.metrics`` is an optional extra (``pip install 'dvector[diarize]'``), imported only here.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

from dvector.errors import DvectorError
from dvector.diarization.rttm import Turn, read_rttm, rttm_files

COLLAR_S = 0.25  # per side, as md-eval's -c 0.25


@dataclass
class DerParts:
    """Seconds scored, their error parts, and DER as a fraction (``nan`` when nothing is scored)."""

    total: float
    miss: float
    false_alarm: float
    confusion: float

    @property
    def der(self) -> float:
        return (self.miss + self.false_alarm + self.confusion) / self.total if self.total > 0 else float("nan")


@dataclass
class DerReport:
    files: dict[str, DerParts] = field(default_factory=dict)  # stem -> its parts
    overall: DerParts = field(default_factory=lambda: DerParts(0.0, 0.0, 0.0, 0.0))
    only_reference: list[str] = field(default_factory=list)  # stems with no hypothesis (not scored)
    only_hypothesis: list[str] = field(default_factory=list)  # stems with no reference (not scored)


def check_collar(collar_s: float) -> None:
    """A DvectorError unless ``collar_s`` is a number of seconds >= 0 (a negative one would score
    more than the recording)."""
    if not (math.isfinite(collar_s) and collar_s >= 0):
        raise DvectorError(f"--collar must be a number of seconds >= 0, got {collar_s:g}")


def _metrics() -> Any:
    try:
        from pyannote.metrics.diarization import DiarizationErrorRate
    except ImportError:
        raise DvectorError("scoring diarization needs pyannote.metrics: pip install 'dvector[diarize]'") from None
    return DiarizationErrorRate


def _annotation(turns: Sequence[Turn], uri: str) -> Any:
    from pyannote.core import Annotation, Segment

    out = Annotation(uri=uri)
    for i, t in enumerate(turns):
        if t.end > t.start:
            out[Segment(t.start, t.end), i] = t.speaker
    return out


def score_turns(reference: Sequence[Turn], hypothesis: Sequence[Turn], collar_s: float = COLLAR_S,
                skip_overlap: bool = False, uri: str = "file") -> DerParts:
    """DER parts of one recording's hypothesis turns against its reference turns."""
    check_collar(collar_s)
    metric = _metrics()(collar=2 * collar_s, skip_overlap=skip_overlap)
    with warnings.catch_warnings():  # the scored span is the union of both extents, as intended
        warnings.filterwarnings("ignore", message=".*'uem' was approximated")
        parts = metric(_annotation(reference, uri), _annotation(hypothesis, uri), detailed=True)
    return DerParts(float(parts["total"]), float(parts["missed detection"]), float(parts["false alarm"]),
                    float(parts["confusion"]))


def score_folders(reference_dir: str | os.PathLike[str], hypothesis_dir: str | os.PathLike[str],
                  collar_s: float = COLLAR_S, skip_overlap: bool = False) -> DerReport:
    """DER of every ``STEM.rttm`` in ``hypothesis_dir`` against ``STEM.rttm`` in ``reference_dir``.

    Files found in one folder only are listed in the report, not scored; the overall DER sums
    the seconds of the scored files (not an average of their rates). A reference with no turns
    scores nothing (its false alarms have no reference speech to be counted against).
    """
    check_collar(collar_s)
    _metrics()  # fail early, with the install hint, before reading anything
    refs, hyps = rttm_files(reference_dir), rttm_files(hypothesis_dir)
    report = DerReport(only_reference=sorted(set(refs) - set(hyps)), only_hypothesis=sorted(set(hyps) - set(refs)))
    if not set(refs) & set(hyps):
        raise DvectorError(f"no RTTM file name is in both {reference_dir} and {hypothesis_dir}")
    for stem in sorted(set(refs) & set(hyps)):
        parts = score_turns(read_rttm(refs[stem]), read_rttm(hyps[stem]), collar_s, skip_overlap, uri=stem)
        report.files[stem] = parts
        o = report.overall
        report.overall = DerParts(o.total + parts.total, o.miss + parts.miss, o.false_alarm + parts.false_alarm,
                                  o.confusion + parts.confusion)
    return report
