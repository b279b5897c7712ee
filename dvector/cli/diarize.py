"""Commands for "who spoke when": diarize (audio -> RTTM) and diarize-eval (DER of RTTMs).

The defaults are typed here, so that `dvector --help` loads no torch; a test checks they are the
library's (``DiarizeConfig``, ``ClusterConfig``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from dvector.cli.console import counting_bar, print_skipped, progress, say, warn
from dvector.cli.options import Model, out_option, threads_option
from dvector.errors import DvectorError

Audio = Annotated[List[Path], typer.Argument(help="Audio files to diarize.")]
RttmOut = out_option("Output folder: one STEM.rttm per audio file.")
Speakers = Annotated[Optional[int], typer.Option("--speakers", help="Number of speakers, if known (else estimated).")]
MinSpeakers = Annotated[int, typer.Option(
    "--min-speakers", help="Estimation: at least this many speakers (1: one speaker when all clusters are closer "
    "than --threshold).")]
MaxSpeakers = Annotated[int, typer.Option("--max-speakers", help="Estimation: at most this many speakers.")]
Method = Annotated[str, typer.Option(
    "--method", help="spectral (Wang et al. 2018, eigengap for K) or ahc (average linkage, cut at --threshold).")]
AhcThreshold = Annotated[Optional[float], typer.Option(
    "--threshold", help="K unknown: ahc keeps clusters apart below this cosine, spectral with --min-speakers 1 "
    "merges all above it (default: the EER threshold `dvector eval` stored for MODEL).")]
Window = Annotated[float, typer.Option("--window", help="Window length for the d-vectors, seconds.")]
Hop = Annotated[float, typer.Option("--hop", help="Hop between windows, seconds.")]
Reseg = Annotated[float, typer.Option(
    "--reseg-window", help="Resegmentation: window around each 0.1 s step, seconds (0: off).")]
Penalty = Annotated[float, typer.Option(
    "--switch-penalty", help="Resegmentation: cost of a change of speaker, in cosine units.")]
FillGap = Annotated[float, typer.Option(
    "--fill-gap", help="Pauses shorter than this between two turns of one speaker are joined, seconds.")]
DiarizeThreads = threads_option("CPU threads for torch (0: torch's default).")
RefDir = Annotated[Path, typer.Argument(help="Folder of reference STEM.rttm files.")]
HypDir = Annotated[Path, typer.Argument(help="Folder of hypothesis STEM.rttm files (e.g. from `dvector diarize`).")]
Collar = Annotated[float, typer.Option(
    "--collar", help="Seconds not scored on each side of every reference boundary (md-eval's -c).")]
SkipOverlap = Annotated[bool, typer.Option("--skip-overlap", help="Do not score overlapped reference speech.")]


def diarize_cmd(model: Model, audio: Audio, out: RttmOut = Path("rttm"), speakers: Speakers = None,
                min_speakers: MinSpeakers = 2, max_speakers: MaxSpeakers = 8, method: Method = "spectral",
                threshold: AhcThreshold = None, window: Window = 1.5, hop: Hop = 0.75, reseg_window: Reseg = 1.0,
                switch_penalty: Penalty = 1.0, fill_gap: FillGap = 0.5, threads: DiarizeThreads = 0) -> None:
    """Who spoke when: VAD, window d-vectors, clustering, resegmentation; one RTTM per file."""
    from dvector.diarization.diarize import run_diarize

    with progress() as bar:
        on_start, on_item = counting_bar(bar, "diarize")
        run = run_diarize(model, audio, out, speakers=speakers, min_speakers=min_speakers,
                          max_speakers=max_speakers, method=method, threshold=threshold, window_s=window, hop_s=hop,
                          reseg_window_s=reseg_window, switch_penalty=switch_penalty, fill_gap_s=fill_gap,
                          threads=threads, on_start=on_start, on_item=on_item)
    if run.note:
        warn(run.note)
    for name, path, result in run.report.written:
        say(f"{name}: {result.n_speakers} speaker(s), {len(result.turns)} turn(s) in {result.duration_s:.1f} s "
            f"-> {path}")
        if result.note:
            say(f"note: {name}: {result.note}")
    print_skipped(run.report.skipped)
    if not run.report.written:
        raise DvectorError(f"nothing was diarized: all {len(run.report.skipped)} input(s) were skipped")
    print(f"diarized {len(run.report.written)} file(s) into {out}; skipped {len(run.report.skipped)}")


def diarize_eval_cmd(reference: RefDir, hypothesis: HypDir, collar: Collar = 0.25,
                     skip_overlap: SkipOverlap = False) -> None:
    """Diarization error rate (pyannote.metrics): miss, false alarm, confusion, per file and overall."""
    from dvector.diarization.der import score_folders

    report = score_folders(reference, hypothesis, collar_s=collar, skip_overlap=skip_overlap)
    for stem in report.only_reference:
        warn(f"{stem}.rttm is in {reference} only: not scored")
    for stem in report.only_hypothesis:
        warn(f"{stem}.rttm is in {hypothesis} only: not scored")
    print(f"{'file':<24} {'scored s':>9} {'miss':>7} {'false al.':>9} {'confusion':>9} {'DER':>7}")
    rows = [*report.files.items(), ("overall", report.overall)]
    for name, p in rows:
        t = p.total or float("nan")
        print(f"{name:<24} {p.total:>9.1f} {100 * p.miss / t:>6.2f}% {100 * p.false_alarm / t:>8.2f}% "
              f"{100 * p.confusion / t:>8.2f}% {100 * p.der:>6.2f}%")
    print(f"collar {collar:g} s each side, overlap {'skipped' if skip_overlap else 'scored'}")
    print(f"DER={100 * report.overall.der:.2f}%")
