"""Commands that use a trained model: embed, score, eval, export, visualize."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer
from rich.markup import escape

from dvector.cli.console import console, counting_bar, print_skipped, progress, say, warn
from dvector.cli.options import (EXTENSIONS, Dask, Extensions, Model, Seed, Threads, extensions_option, model_argument,
                                 out_option, seed_option, threads_option, workers_option)

DEFAULT_TOP_N = 300  # dvector.evaluation.score_norm.DEFAULT_TOP_N (imported lazily, like torch; a test checks they agree)

Inputs = Annotated[Optional[List[str]], typer.Argument(
    help="Audio files, folders (searched recursively), shard folders or URLs (none with --kaldi alone); with "
    "--per-window, - reads raw 16-bit little-endian mono PCM from stdin and prints one JSON line per window as it "
    "completes.")]
SampleRate = Annotated[int, typer.Option(
    "--sample-rate", help="The sample rate of PCM on stdin (-); resampled to the model's on the fly.")]
EmbeddingsOut = Annotated[Optional[Path], typer.Option(
    "-o", "--out", help="Output: the .npz (default embeddings.npz: key -> vector, plus __model__); with --format "
    "kaldi the folder that receives embeddings.ark and embeddings.scp (default: the current folder).")]
EmbedFormat = Annotated[str, typer.Option(
    "--format", help="npz (one .npz file) or kaldi (embeddings.ark + embeddings.scp, float32 vectors, for Kaldi "
    "and WeSpeaker back-ends; needs pip install 'dvector\\[kaldi]'). Keys: the utterance id of a listed utterance, "
    "the path as reached from the input given; --per-window vectors are keyed KEY-START-END, START and END in "
    "milliseconds, zero-padded to 8 digits.")]
PerWindow = Annotated[bool, typer.Option(
    "--per-window", help="Window embeddings with start/end times (no VAD), e.g. for diarization.")]
KaldiDir = Annotated[Optional[Path], typer.Option(
    "--kaldi", metavar="DATA_DIR", help="A Kaldi data directory (wav.scp, utt2spk, segments if any): its utterances, keyed by "
    "utterance id.")]
KaldiRoot = Annotated[Optional[Path], typer.Option(
    "--kaldi-root", help="The folder that relative paths in wav.scp start from (default: the current folder).")]
AllowCommands = Annotated[bool, typer.Option(
    "--allow-commands", help="Run wav.scp entries that are commands (ending in '|'); refused otherwise.")]
FirstFile = Annotated[Optional[Path], typer.Argument(
    help="First audio file; with --trials, the test ROOT the trials' paths are relative to (not with --kaldi).")]
SecondFile = Annotated[Optional[Path], typer.Argument(help="Second audio file (not with --trials).")]
ScoreTrials = Annotated[Optional[Path], typer.Option(
    "--trials", help="Score a trial list instead of A B: one trial a line, 'utt1 utt2' (unlabelled), VoxCeleb "
    "'label path1 path2' or Kaldi/NIST 'utt1 utt2 target|nontarget'. Entries are paths relative to ROOT, or with "
    "--kaldi utterance ids. Prints 'utt1 utt2 score' lines (plus target/nontarget where a threshold is stored or "
    "given).")]
ScoreKaldi = Annotated[Optional[Path], typer.Option(
    "--kaldi", metavar="DATA_DIR", help="With --trials: a Kaldi data directory as the test set, instead of ROOT: "
    "trial entries are its utterance ids.")]
ScoresOut = Annotated[Optional[Path], typer.Option(
    "-o", "--out", help="With --trials: the scores file, written atomically (default: standard output).")]
ThresholdOverride = Annotated[Optional[float], typer.Option(
    "-t", "--threshold", help="Decide with this cosine threshold instead of the stored one.")]
TestRoot = Annotated[Optional[Path], typer.Argument(
    help="Test root: speaker folders, or the root the trials' paths are relative to (not with --kaldi).")]
Trials = Annotated[Optional[Path], typer.Option(
    "--trials", help="Trials file, one trial a line in either form: VoxCeleb 'label path1 path2' (label 1 or 0) or "
    "Kaldi/NIST 'utt1 utt2 target|nontarget'. Entries are paths relative to ROOT, or with --kaldi utterance ids.")]
TestKaldi = Annotated[Optional[Path], typer.Option(
    "--kaldi", metavar="DATA_DIR", help="A Kaldi data directory as the test set, instead of ROOT: trial entries are its utterance ids "
    "(without --trials, trials are made from its utt2spk).")]
Det = Annotated[Optional[Path], typer.Option("--det", help="DET curve PNG (default: det.png beside eval.json).")]
NNontarget = Annotated[Optional[int], typer.Option(
    "--n-nontarget", help="Generated trials: non-target pairs (default: as many as target pairs, 1k-100k).")]
TrialSeed = seed_option("Seed of the generated non-target sample.")
TrialExtensions = extensions_option("Comma-separated audio extensions (generated trials).")
Save = Annotated[bool, typer.Option("--save/--no-save", help="Store results and threshold in MODEL/eval.json.")]
Untrained = Annotated[bool, typer.Option(
    "--untrained", help="Evaluate MODEL's network as its training started (same seed): a baseline; stores nothing.")]
ExportModel = model_argument("Run folder or checkpoint file.")
ExportOut = out_option("Output folder: dvector.pt, dvector.json (ONNX: dvector.onnx, dvector.onnx.json).")
ExportFormat = Annotated[str, typer.Option(
    "--format", help="torchscript (dvector.pt, needs only torch) or onnx (dvector.onnx, opset 17, for onnxruntime).")]
Quantize = Annotated[Optional[str], typer.Option(
    "--quantize", help="With --format onnx: int8 also writes dvector.int8.onnx (dynamically quantised encoder).")]
SpeakerRoot = Annotated[Path, typer.Argument(help="A root of speaker folders.")]
PictureOut = out_option("Output PNG.")
MaxSpeakers = Annotated[int, typer.Option("--max-speakers", help="Map at most this many speakers (a seeded sample).")]
PerSpeaker = Annotated[int, typer.Option("--per-speaker", help="Utterances per speaker (a seeded sample).")]
Norm = Annotated[str, typer.Option(
    "--norm", help="Score normalisation against --cohort: asnorm (adaptive S-norm, top --cohort-top), snorm, or none.")]
Cohort = Annotated[Optional[str], typer.Option(
    "--cohort", help="Cohort shards (folder, pattern or URL): the mean embedding of each speaker (default: the run's "
    "training shards, where its checkpoint records them).")]
CohortTop = Annotated[int, typer.Option(
    "--cohort-top", help="AS-norm: the N highest cohort scores of each side (a smaller cohort is used whole).")]
EmbedWorkers = workers_option("Worker processes embedding the audio files (1: this one; 0: every core); each "
                              "loads the model and uses --threads torch threads, or one.")
MapThreads = threads_option("CPU threads for torch while embedding (0: torch's default) and for t-SNE (0: one).")


def embed_cmd(model: Model, inputs: Inputs = None, out: EmbeddingsOut = None, fmt: EmbedFormat = "npz",
              per_window: PerWindow = False, kaldi: KaldiDir = None, kaldi_root: KaldiRoot = None,
              allow_commands: AllowCommands = False, extensions: Extensions = EXTENSIONS, threads: Threads = 0,
              workers: EmbedWorkers = 1, dask: Dask = None, sample_rate: SampleRate = 16000) -> None:
    """Embed utterances: sliding windows of the training length, averaged and normalised. Written as
    an .npz, or as a Kaldi archive and index (--format kaldi)."""
    from dvector.errors import DvectorError
    from dvector.inference.embed_inputs import NothingEmbedded, Workers, embed_paths, save_embeddings
    from dvector.inference.embedder import load
    from dvector.inference.streaming import check_stream_rate

    inputs = list(inputs or [])
    if not inputs and kaldi is None:
        raise DvectorError("give at least one audio file, folder or shard URL, or --kaldi DATA_DIR")
    out = check_embed_output(fmt, out, inputs)  # before anything is loaded or read
    if "-" in inputs:
        check_stream_rate(sample_rate)
        if kaldi is not None:
            raise DvectorError("stdin (-) is embedded with --per-window, as the only input (no --kaldi)")
    listed = kaldi_listing(kaldi, kaldi_root, allow_commands)
    embedder = load(model, threads=threads)
    if "-" in inputs:
        return embed_stdin(embedder, inputs, per_window, sample_rate)
    with progress() as bar:
        on_start, on_item = counting_bar(bar, "embed")
        result = embed_paths(embedder, inputs, extensions, per_window=per_window, on_start=on_start, on_item=on_item,
                             workers=Workers(workers, dask), listed=listed)
    try:  # first: a failure to print must not lose the results
        if fmt == "kaldi":
            from dvector.inference.kaldi_ark import save_kaldi

            ark, path, entries = save_kaldi(out, result)
        else:
            path, entries = save_embeddings(out, result, embedder), len(result.vectors)
    except NothingEmbedded as exc:
        print_skipped(exc.skipped)
        raise
    print_skipped(result.skipped)
    what = "window sequences" if per_window else "embeddings"
    if fmt == "kaldi" and per_window:
        what = "window vectors (keys KEY-START-END, in milliseconds)"
    dup = f" ({result.duplicates} duplicate input(s) embedded once)" if result.duplicates else ""
    wrote = f"{ark} and {path}" if fmt == "kaldi" else f"{path}"
    say(f"wrote {wrote}: {entries} {what} of dimension {embedder.dim}{dup}; model {embedder.info['path']}")


def check_embed_output(fmt: str, out: Optional[Path], inputs: List[str]) -> Path:
    """``-o`` as the format wants it (a file for npz, a folder for kaldi, made and probed now)."""
    from dvector.errors import DvectorError

    if fmt not in ("npz", "kaldi"):
        raise DvectorError(f"--format takes npz or kaldi, got {fmt!r}")
    if fmt == "npz":
        return out if out is not None else Path("embeddings.npz")
    if "-" in inputs:
        raise DvectorError("stdin (-) prints JSON lines: --format kaldi writes files from files")
    from dvector.inference.kaldi_ark import check_kaldi_output

    return check_kaldi_output(out if out is not None else Path("."))


def kaldi_listing(kaldi: Optional[Path], kaldi_root: Optional[Path], allow_commands: bool, scan: bool = True) -> Any:
    """The utterances of the Kaldi data directory ``kaldi`` (a ``ScanResult``; None without ``scan``), or None."""
    from dvector.errors import DvectorError

    if kaldi is None:
        if kaldi_root is not None or allow_commands:
            raise DvectorError("--kaldi-root and --allow-commands go with --kaldi DATA_DIR")
        return None
    if not scan:
        return None
    from dvector.corpus.kaldi import scan_kaldi

    return scan_kaldi([str(kaldi)], kaldi_root, allow_commands)


def embed_stdin(embedder: Any, inputs: List[str], per_window: bool, sample_rate: int) -> None:
    """``-``: window embeddings of PCM on stdin, one JSON line each as it completes (``start``, ``end``
    in seconds, ``vector``), flushed at once so a reader of a live stream sees them."""
    import json
    import sys

    from dvector.errors import DvectorError
    from dvector.inference.streaming import pcm_windows

    if inputs != ["-"] or not per_window:
        raise DvectorError("stdin (-) is embedded with --per-window, as the only input")
    for window in pcm_windows(embedder.stream(sample_rate), sys.stdin.buffer):
        line = {"start": window.start_s, "end": window.end_s,
                "vector": [float(v) for v in window.vector]}
        try:
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
        except OSError as exc:  # a full disk, a closed pipe
            _drop_stdout()
            raise DvectorError(f"cannot write to standard output: {exc.strerror or exc}") from None


def _drop_stdout() -> None:
    """Point standard output at /dev/null, so that the flush at exit does not fail a second time
    (Python would print "Exception ignored" and exit 120) after the one-line error."""
    import os
    import sys

    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # no real file behind it (captured in a test)
        pass


def score_cmd(model: Model, a: FirstFile = None, b: SecondFile = None, trials: ScoreTrials = None,
              kaldi: ScoreKaldi = None, kaldi_root: KaldiRoot = None, allow_commands: AllowCommands = False,
              out: ScoresOut = None, threshold: ThresholdOverride = None, threads: Threads = 0, norm: Norm = "none",
              cohort: Cohort = None, cohort_top: CohortTop = DEFAULT_TOP_N) -> None:
    """Cosine score of two utterances (normalised with --norm), and same/different speaker at the
    threshold `eval` stored; with --trials, the scores of a trial list."""
    from dvector.errors import DvectorError
    from dvector.evaluation.results import decide_normalized

    kaldi_listing(kaldi, kaldi_root, allow_commands, scan=False)  # --kaldi-root and --allow-commands need --kaldi
    if trials is not None:
        if b is not None:
            raise DvectorError("give two audio files A B or --trials TRIALS (with ROOT or --kaldi DATA_DIR), not both")
        return score_list(model, trials, a, kaldi, kaldi_root, allow_commands, out, threshold, threads, norm,
                          cohort, cohort_top)
    if a is None or b is None:
        raise DvectorError("give two audio files A B, or --trials TRIALS with ROOT or --kaldi DATA_DIR")
    if kaldi is not None or out is not None:
        raise DvectorError("--kaldi and -o/--out go with --trials TRIALS")
    with progress() as bar:
        decision, score_norm = decide_normalized(model, a, b, norm, cohort, cohort_top, threshold, threads,
                                                 on_cohort=counting_bar(bar, "cohort"))
    if score_norm is not None:
        print_skipped(score_norm.cohort.skipped)
        if score_norm.note:
            say(score_norm.note)
    used = decision.threshold
    if used.note:
        console.print(f"[yellow]warning:[/] {escape(used.note)}", highlight=False)
    what = f"{score_norm.method} score" if score_norm is not None else "score"
    print(f"{what} {decision.score:.4f}  threshold {used.value:.4f} ({used.source})  -> {decision.text}")


def score_list(model: Path, trials: Path, root: Optional[Path], kaldi: Optional[Path], kaldi_root: Optional[Path],
               allow_commands: bool, out: Optional[Path], threshold: Optional[float], threads: int, norm: str,
               cohort: Optional[str], cohort_top: int) -> None:
    """``score --trials``: one ``a b score`` line a trial to ``out`` (atomically) or standard output."""
    import sys

    from dvector.errors import DvectorError
    from dvector.evaluation.evaluate import KaldiTestSet
    from dvector.evaluation.results import score_trials
    from dvector.files import write_output
    from dvector.inference.embed_inputs import NothingEmbedded

    test_set = None if kaldi is None else KaldiTestSet(str(kaldi), kaldi_root and str(kaldi_root), allow_commands)
    try:
        with progress() as bar:
            on_cohort = counting_bar(bar, "cohort") if norm != "none" else None
            on_start, on_item = counting_bar(bar, "score")
            scored = score_trials(model, root, trials, kaldi=test_set, norm=norm, cohort=cohort, cohort_top=cohort_top,
                                  threshold=threshold, threads=threads, on_start=on_start, on_file=on_item,
                                  on_cohort=on_cohort)
    except NothingEmbedded as exc:
        print_skipped(exc.skipped)
        raise
    if out is not None:
        write_output(out, scored.text())
    else:
        try:
            sys.stdout.write(scored.text())
            sys.stdout.flush()
        except OSError as exc:  # a full disk, a closed pipe
            _drop_stdout()
            raise DvectorError(f"cannot write to standard output: {exc.strerror or exc}") from None
    if scored.score_norm is not None:
        print_skipped(scored.score_norm.cohort.skipped)
    print_skipped(scored.skipped)
    for note in (scored.note, scored.threshold and scored.threshold.note):
        if note:
            warn(note)
    left = f"; left out {scored.left_out} trial(s) naming a file that could not be embedded" if scored.left_out else ""
    what = f"{scored.score_norm.method} scores" if scored.score_norm is not None else "scores"
    used = f", decided at {scored.threshold.value:.4f} ({scored.threshold.source})" if scored.threshold else ""
    say(f"{what} of {len(scored.trials)} trial(s)" + (f" written to {out}" if out else "") + used + left)


def eval_cmd(model: Model, root: TestRoot = None, trials: Trials = None, kaldi: TestKaldi = None,
             kaldi_root: KaldiRoot = None, allow_commands: AllowCommands = False, det: Det = None,
             n_nontarget: NNontarget = None, seed: TrialSeed = 0, extensions: TrialExtensions = EXTENSIONS,
             save: Save = True, threads: Threads = 0, untrained: Untrained = False, norm: Norm = "none",
             cohort: Cohort = None, cohort_top: CohortTop = DEFAULT_TOP_N, workers: EmbedWorkers = 1,
             dask: Dask = None) -> None:
    """Verification EER, minDCF (p_target 0.01, 0.05) and the EER threshold; a DET curve. With --norm,
    the same for normalised scores, side by side. The test set is ROOT or a Kaldi data directory (--kaldi)."""
    from dvector.inference.embed_inputs import NothingEmbedded, Workers
    from dvector.evaluation.evaluate import KaldiTestSet
    from dvector.evaluation.results import run_eval

    kaldi_listing(kaldi, kaldi_root, allow_commands, scan=False)  # --kaldi-root and --allow-commands need --kaldi
    test_set = None if kaldi is None else KaldiTestSet(str(kaldi), kaldi_root and str(kaldi_root), allow_commands)
    try:
        with progress() as bar:
            on_cohort = counting_bar(bar, "cohort") if norm != "none" else None
            on_start, on_item = counting_bar(bar, "eval")
            run = run_eval(model, root, trials, det=det, save=save, untrained=untrained, n_nontarget=n_nontarget,
                           seed=seed, extensions=extensions, threads=threads, on_start=on_start, on_file=on_item,
                           norm=norm, cohort=cohort, cohort_top=cohort_top, on_cohort=on_cohort,
                           workers=Workers(workers, dask), kaldi=test_set)
    except NothingEmbedded as exc:  # the files that failed, then the error line
        print_skipped(exc.skipped)
        raise
    r = run.result
    if r.norm is not None:
        print_norm_table(r)
    print_skipped(r.skipped)
    over = f"{r.n_files} {'utterances' if kaldi else 'files'}"
    print(f"trials: {r.n_trials} ({r.n_target} target, {r.n_nontarget} non-target) over {over}")
    print(f"minDCF: {r.min_dcf['0.01']:.4f} (p_target 0.01), {r.min_dcf['0.05']:.4f} (p_target 0.05)")
    print(f"threshold: {r.eer_threshold:.4f} (cosine, at the EER)")
    for what, path in (("results", run.results_path), ("DET curve", run.det_path)):
        if path is not None:
            say(f"{what}: {path}")
    if run.note:
        say(run.note)
    print(f"EER={100 * r.eer:.2f}%")
    for warning in run.warnings:
        warn(warning)


def print_norm_table(r: Any) -> None:
    """Raw and normalised EER, minDCF and EER threshold, one row each."""
    n = r.norm
    if n.get("note"):
        say(n["note"])
    top = f", top {n['used_top']}" if n["method"] == "asnorm" else ""
    print(f"cohort: {n['cohort_speakers']} speakers ({n['cohort_samples']} utterances) from {n['cohort']}{top}")
    print(f"{'scores':<8} {'EER':>7} {'minDCF 0.01':>12} {'minDCF 0.05':>12} {'threshold':>10}")
    for name, x in (("raw", {"eer": r.eer, "min_dcf": r.min_dcf, "eer_threshold": r.eer_threshold}),
                    (n["method"], n)):
        print(f"{name:<8} {100 * x['eer']:>6.2f}% {x['min_dcf']['0.01']:>12.4f} {x['min_dcf']['0.05']:>12.4f} "
              f"{x['eer_threshold']:>10.4f}")


def export_cmd(model: ExportModel, out: ExportOut = Path("exported"), fmt: ExportFormat = "torchscript",
               quantize: Quantize = None) -> None:
    """Self-contained model, wav -> embedding with log-mel and VAD inside: TorchScript (needs only torch)
    or ONNX (needs only onnxruntime)."""
    from dvector.errors import DvectorError

    if fmt not in ("torchscript", "onnx"):
        raise DvectorError(f"--format takes torchscript or onnx, got {fmt!r}")
    if fmt == "onnx":
        from dvector.export.onnx_graph import export_onnx

        for path in export_onnx(model, out, quantize=quantize):
            say(f"exported {model} to {path}")
        return
    if quantize is not None:
        raise DvectorError("--quantize needs --format onnx")
    from dvector.export.torchscript import export_model

    written = export_model(model, out)
    say(f"exported {model} to {written if written is not None else out}")


def visualize_cmd(model: Model, root: SpeakerRoot, out: PictureOut = Path("tsne.png"), max_speakers: MaxSpeakers = 100,
                  per_speaker: PerSpeaker = 20, seed: Seed = 0, extensions: Extensions = EXTENSIONS,
                  threads: MapThreads = 0) -> None:
    """t-SNE map of utterance embeddings, one colour per speaker, as a PNG."""
    from dvector.inference.embed_inputs import NothingEmbedded
    from dvector.inference.embedder import load
    from dvector.evaluation.plot import check_picture_path, visualize

    check_picture_path(out)  # before the model is loaded
    embedder = load(model, threads=threads)
    try:
        with progress() as bar:
            on_start, on_item = counting_bar(bar, "visualize")
            png, points, speakers, skipped = visualize(embedder, root, out, extensions, max_speakers, per_speaker,
                                                       seed, on_start=on_start, on_file=on_item, threads=threads)
    except NothingEmbedded as exc:  # the files that failed, then the error line
        print_skipped(exc.skipped)
        raise
    print_skipped(skipped)
    say(f"wrote {png}: {points} utterances of {speakers} speakers")
