"""The ``dvector`` command line: parse options, build a config, call one library function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dvector.config import DEFAULT_EXTENSIONS, BuildConfig, FeatureConfig, VadConfig
from dvector.errors import DvectorError

app = typer.Typer(
    help="Speaker embeddings (d-vectors) trained with the GE2E loss: build shards, train, embed, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # messages stay one line, whatever the width


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(1)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        disable=not console.is_terminal and os.environ.get("DVECTOR_PROGRESS") != "1",
    )


@app.command("build-shards")
def build_shards_cmd(
    roots: List[Path] = typer.Argument(..., help="Root directories; each holds one folder per speaker (subfolders allowed)."),
    out: Path = typer.Option(Path("shards"), "-o", "--out", "-s", "--save_dir", "--save-dir",
                             help="Output folder for shard-NNNNNN.tar and index.json."),
    extensions: str = typer.Option(",".join(DEFAULT_EXTENSIONS), "-e", "--extensions",
                                   help="Comma-separated audio extensions, case-insensitive (m4a/aac need dvector[m4a])."),
    workers: int = typer.Option(0, "-j", "--workers", help="Worker processes (0: every core)."),
    shard_size: int = typer.Option(10000, "--shard-size", help="At most about this many utterances per shard (exceeded by less than one speaker block)."),
    min_shards: int = typer.Option(8, "--min-shards", help="Split even a small corpus into at least this many shards."),
    block_size: int = typer.Option(32, "--block-size", help="Utterances per speaker block inside shards."),
    seed: int = typer.Option(0, "--seed", help="Seed of the block shuffle."),
    sample_rate: int = typer.Option(16000, "--sample-rate", help="Resample every file to this rate (Hz)."),
    n_mels: int = typer.Option(40, "--n-mels", help="Mel bands."),
    vad: bool = typer.Option(True, "--vad/--no-vad", help="Trim silence and shorten long pauses."),
    merge_speakers: bool = typer.Option(False, "--merge-speakers",
                                        help="Key speakers by folder name alone, merging same-named folders across roots."),
    part: Optional[str] = typer.Option(None, "--part", help="Build only part i of n (e.g. 3/8), for array jobs on shared storage."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a build made with another configuration."),
    strict: bool = typer.Option(False, "--strict", help="Exit with status 2 if any file was skipped."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first file that cannot be used."),
) -> None:
    """Decode, resample, trim silence and compute log-mels of every utterance; write WebDataset shards.

    Resumable: run the same command again to finish an interrupted build.
    """
    from dvector.signal.audio import normalize_extensions
    from dvector.shards.build import Progress as BuildProgress, build_shards, keep_freed_memory, parse_part
    from dvector.cli.summary import print_build_summary

    cfg = BuildConfig(extensions=normalize_extensions(extensions.split(",")), shard_size=shard_size,
                      min_shards=min_shards, block_size=block_size, seed=seed, merge_speakers=merge_speakers,
                      features=FeatureConfig(sample_rate=sample_rate, n_mels=n_mels), vad=VadConfig(enabled=vad))
    keep_freed_memory()  # this process receives and writes every utterance's features
    with _progress() as bar:
        task = bar.add_task("build-shards", total=None, info="scanning")
        audio = [0.0]

        def start(files: int, shards: int) -> None:
            bar.update(task, total=files, info=f"{shards} shards to write")

        def advance(files: int, audio_s: float) -> None:
            audio[0] += audio_s
            elapsed = bar.tasks[0].elapsed or 1e-9
            bar.update(task, advance=files, info=f"{audio[0] / 3600:.2f} h audio, {audio[0] / elapsed:.0f}x realtime")

        report = build_shards([str(r) for r in roots], out, cfg, workers=workers or None, part=parse_part(part),
                              overwrite=overwrite, fail_fast=fail_fast, progress=BuildProgress(start, advance))
    print_build_summary(report, console)
    if strict and report.failures:
        console.print(f"[bold red]--strict:[/] {len(report.failures)} file(s) were skipped")
        raise typer.Exit(2)


@app.command("index")
def index_cmd(folder: Path = typer.Argument(..., help="A shard folder made by build-shards (all parts).")) -> None:
    """Rebuild index.json from the shards and build records on disk (e.g. after --part builds)."""
    from dvector.shards.build import write_index

    index = write_index(folder)
    t = index["totals"]
    console.print(f"wrote {folder / 'index.json'}: {t['shards']} shards, {t['utterances']} utterances, "
                  f"{t['speakers']} speakers, {t['failures']} skipped files")


@app.command("check")
def check_cmd(
    folder: Path = typer.Argument(..., help="A shard folder with index.json."),
    workers: int = typer.Option(0, "-j", "--workers", help="Processes (0: every core)."),
) -> None:
    """Verify every shard against the index: present, same size and sha256, every sample decodable."""
    from dvector.shards.check import check_shards
    from dvector.shards.format import read_index

    total = len(read_index(folder)["shards"])
    with _progress() as bar:
        task = bar.add_task("check", total=total, info="")
        report = check_shards(folder, workers or os.cpu_count() or 1, on_shard=lambda: bar.advance(task))
    if report.ok:
        console.print(f"[green]ok[/]: {report.shards} shards match the index")
        return
    for name, problem in report.problems:
        console.print(f"[red]{escape(name)}[/]: {escape(problem)}", highlight=False)
    console.print(f"[bold red]{len({n for n, _ in report.problems})} of {report.shards} shards are damaged[/]")
    raise typer.Exit(1)


@app.command("train")
def train_cmd(
    shards: str = typer.Argument(..., help="Shard folder (with index.json), brace pattern, or http(s)/pipe: URLs."),
    model_dir: Path = typer.Argument(..., help="Run folder: checkpoints/, logs/ (TensorBoard)."),
    steps: int = typer.Option(100000, "-i", "--steps", help="Total steps (a continued run counts from its checkpoint)."),
    save_every: int = typer.Option(10000, "-s", "--save-every", help="Save a checkpoint every this many steps."),
    decay_every: int = typer.Option(100000, "-d", "--decay-every", help="Halve the learning rate every this many steps."),
    n_speakers: int = typer.Option(64, "-n", "--n-speakers", help="N: speakers per batch."),
    n_utterances: int = typer.Option(10, "-m", "--n-utterances", help="M: utterances per speaker."),
    seg_len: str = typer.Option("160", "-l", "--seg-len", help="L: frames per segment, or a range drawn per batch (140-180)."),
    resume: Optional[Path] = typer.Option(None, "-c", "--continue", help="Checkpoint (or run folder) to continue from."),
    valid: Optional[str] = typer.Option(None, "--valid", help="Validation shards (other speakers); default: hold out ~10% of the speakers."),
    valid_every: int = typer.Option(1000, "--valid-every", help="Validate every this many steps."),
    model: Optional[str] = typer.Option(None, "--model", help="paper (3x768 LSTM, 256 proj), attentive (original, 3x256; the default), or tiny."),
    loss: str = typer.Option("softmax", "--loss", help="softmax or contrast."),
    reduction: str = typer.Option("sum", "--reduction", help="sum (the paper's) or mean (learning rate scaled by N*M)."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (the paper's) or adam."),
    lr: float = typer.Option(0.0, "--lr", help="Learning rate (0: 0.01 for SGD, 1e-3 for Adam)."),
    workers: int = typer.Option(2, "-w", "--workers", help="Data loader processes per training process."),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 mixed precision on CUDA."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (CUDA)."),
    keep: int = typer.Option(5, "--keep", help="Numbered checkpoints to keep."),
    log_every: int = typer.Option(50, "--log-every", help="Log every this many steps."),
    short_policy: str = typer.Option("repeat", "--short-policy", help="Utterances shorter than L: repeat (tile) or drop."),
    threads: int = typer.Option(0, "--threads", help="Torch threads on CPU (0: the cores left after the loader workers)."),
    max_minutes: float = typer.Option(0.0, "--max-minutes", help="Stop with a checkpoint after this long (e.g. a job's time limit); 0: none."),
) -> None:
    """Train the d-vector with the GE2E loss on streamed, speaker-balanced batches.

    Several GPUs: torchrun --nproc-per-node=8 -m dvector train SHARDS MODEL_DIR
    """
    from dvector.config import ModelConfig, TrainConfig, parse_seg_len
    from dvector.cli.summary import print_train_summary
    from dvector.training.loop import train

    cfg = TrainConfig(threads=threads, max_minutes=max_minutes, steps=steps, save_every=save_every, decay_every=decay_every, valid_every=valid_every,
                      log_every=log_every, n_speakers=n_speakers, n_utterances=n_utterances,
                      seg_len=parse_seg_len(seg_len), loss=loss, reduction=reduction, optimizer=optimizer, lr=lr,
                      workers=workers, seed=seed, keep_checkpoints=keep, amp=amp, compile=compile,
                      short_policy=short_policy)
    is_main = int(os.environ.get("RANK", 0)) == 0
    with _progress() as bar:
        task = bar.add_task("train", total=steps, info="starting")
        state = {"eer": None}

        def on_log(entry) -> None:  # type: ignore[no-untyped-def]
            if entry.valid_eer is not None:
                state["eer"] = entry.valid_eer
            eer = f", EER {100 * state['eer']:.2f}%" if state["eer"] is not None else ""
            speed = f", {entry.steps_per_s:.1f} steps/s" if entry.steps_per_s == entry.steps_per_s else ""
            bar.update(task, completed=entry.step, info=f"loss {entry.loss:.3f}{eer}{speed}")

        def say(message: str) -> None:
            bar.console.print(message, highlight=False)

        result = train(shards, model_dir, cfg, ModelConfig.preset(model) if model else None, resume=str(resume) if resume else None,
                       valid=valid, device=device, on_log=on_log, say=say if is_main else (lambda m: None))
    if is_main:
        print_train_summary(result, console)


# ---- using a trained model -----------------------------------------------------------------------

MAX_LISTED = 10


def _print_skipped(skipped: list, what: str = "file(s)") -> None:
    if not skipped:
        return
    console.print(f"[yellow]skipped {len(skipped)} {what}:[/]", highlight=False)
    for name, reason in skipped[:MAX_LISTED]:
        console.print(f"  {name}: {reason}", highlight=False)
    if len(skipped) > MAX_LISTED:
        console.print(f"  ... and {len(skipped) - MAX_LISTED} more", highlight=False)


def _counting_bar(bar: Progress, description: str):  # noqa: ANN202
    """(on_start(total), on_item(*_)) callbacks that drive one task of ``bar``."""
    task = bar.add_task(description, total=None, info="")

    def on_start(total) -> None:  # noqa: ANN001
        bar.update(task, total=total)

    def on_item(*_args) -> None:  # noqa: ANN002
        bar.advance(task)

    return on_start, on_item


@app.command("embed")
def embed_cmd(
    model: Path = typer.Argument(..., help="Run folder, checkpoint file, or exported folder."),
    inputs: List[str] = typer.Argument(..., help="Audio files, folders (searched recursively), shard folders or URLs."),
    out: Path = typer.Option(Path("embeddings.npz"), "-o", "--out", help="Output .npz: key -> vector, plus __model__."),
    per_window: bool = typer.Option(False, "--per-window",
                                    help="Window embeddings with start/end times (no VAD), e.g. for diarization."),
    extensions: str = typer.Option(",".join(DEFAULT_EXTENSIONS), "-e", "--extensions",
                                   help="Comma-separated audio extensions looked for in folders."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch while embedding (0: torch's default)."),
) -> None:
    """Embed utterances: sliding windows of the training length, averaged and normalised."""
    from dvector.use.embedder import load
    from dvector.use.embed_inputs import embed_paths, save_embeddings

    embedder = load(model, threads=threads or None)
    with _progress() as bar:
        on_start, on_item = _counting_bar(bar, "embed")
        result = embed_paths(embedder, inputs, extensions.split(","), per_window=per_window,
                             on_start=on_start, on_item=on_item)
    _print_skipped(result.skipped)
    path = save_embeddings(out, result, embedder)
    what = "window sequences" if per_window else "embeddings"
    dup = f" ({result.duplicates} duplicate input(s) embedded once)" if result.duplicates else ""
    console.print(f"wrote {path}: {len(result.vectors)} {what} of dimension {embedder.dim}{dup}; model "
                  f"{embedder.info['path']}", highlight=False)


@app.command("score")
def score_cmd(
    model: Path = typer.Argument(..., help="Run folder, checkpoint file, or exported folder."),
    a: Path = typer.Argument(..., help="First audio file."),
    b: Path = typer.Argument(..., help="Second audio file."),
    threshold: Optional[float] = typer.Option(None, "-t", "--threshold",
                                              help="Decide with this cosine threshold instead of the stored one."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch while embedding (0: torch's default)."),
) -> None:
    """Cosine score of two utterances, and same/different speaker at the threshold `eval` stored."""
    from dvector.use.embedder import load
    from dvector.use.evaluate import Threshold, score_pair

    embedder = load(model, threads=threads or None)
    score, used = score_pair(embedder, a, b, model)
    if threshold is not None:
        used = Threshold(threshold, "--threshold", True)
    if used.note:
        console.print(f"[yellow]warning:[/] {used.note}", highlight=False)
    decision = "same speaker" if score >= used.value else "different speakers"
    print(f"score {score:.4f}  threshold {used.value:.4f} ({used.source})  -> {decision}")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="Run folder, checkpoint file, or exported folder."),
    root: Path = typer.Argument(..., help="Test root: speaker folders, or the root the trials' paths are relative to."),
    trials: Optional[Path] = typer.Option(None, "--trials", help="Trials file, VoxCeleb format: 'label path1 path2'."),
    det: Optional[Path] = typer.Option(None, "--det", help="DET curve PNG (default: det.png beside eval.json)."),
    n_nontarget: Optional[int] = typer.Option(None, "--n-nontarget",
                                              help="Generated trials: non-target pairs (default: as many as target pairs, 1k-100k)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated non-target sample."),
    extensions: str = typer.Option(",".join(DEFAULT_EXTENSIONS), "-e", "--extensions",
                                   help="Comma-separated audio extensions (generated trials)."),
    save: bool = typer.Option(True, "--save/--no-save", help="Store results and threshold in MODEL/eval.json."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch while embedding (0: torch's default)."),
    untrained: bool = typer.Option(False, "--untrained",
                                   help="Evaluate MODEL's network as its training started (same seed): a baseline; stores nothing."),
) -> None:
    """Verification EER, minDCF (p_target 0.01, 0.05) and the EER threshold; a DET curve."""
    from dvector.use.embedder import load, untrained_twin
    from dvector.use.evaluate import DET_FILE, eval_path, evaluate, save_det, write_eval

    embedder = load(model, threads=threads or None)
    if untrained:
        embedder, save = untrained_twin(embedder), False
    with _progress() as bar:
        on_start, on_item = _counting_bar(bar, "eval")
        ev = evaluate(embedder, root, trials, n_nontarget=n_nontarget, seed=seed, extensions=extensions.split(","),
                      on_start=on_start, on_file=on_item)
    _print_skipped(ev.result.skipped)
    stored = eval_path(model) if save else None
    det_path = det if det is not None else (stored.parent / DET_FILE if stored is not None else None)
    if det_path is not None:
        save_det(ev, det_path)
    if stored is not None:
        write_eval(stored, ev.result, det_path)
    r = ev.result
    print(f"trials: {r.n_trials} ({r.n_target} target, {r.n_nontarget} non-target) over {r.n_files} files")
    print(f"minDCF: {r.min_dcf['0.01']:.4f} (p_target 0.01), {r.min_dcf['0.05']:.4f} (p_target 0.05)")
    print(f"threshold: {r.eer_threshold:.4f} (cosine, at the EER)")
    for what, path in (("results", stored), ("DET curve", det_path)):
        if path is not None:
            console.print(f"{what}: {path}", highlight=False)
    if det_path is None and not untrained:
        console.print("no DET curve: MODEL is not a folder to store it in; give --det PATH", highlight=False)
    print(f"EER={100 * r.eer:.2f}%")


@app.command("export")
def export_cmd(
    model: Path = typer.Argument(..., help="Run folder or checkpoint file."),
    out: Path = typer.Option(Path("exported"), "-o", "--out", help="Output folder: dvector.pt, dvector.json."),
) -> None:
    """Self-contained TorchScript (wav -> embedding, log-mel and VAD inside); needs only torch to load."""
    from dvector.use.export import export_model

    written = export_model(model, out)
    console.print(f"exported {model} to {written if written is not None else out}", highlight=False)


@app.command("visualize")
def visualize_cmd(
    model: Path = typer.Argument(..., help="Run folder, checkpoint file, or exported folder."),
    root: Path = typer.Argument(..., help="A root of speaker folders."),
    out: Path = typer.Option(Path("tsne.png"), "-o", "--out", help="Output PNG."),
    max_speakers: int = typer.Option(100, "--max-speakers", help="Map at most this many speakers (a seeded sample)."),
    per_speaker: int = typer.Option(20, "--per-speaker", help="Utterances per speaker (a seeded sample)."),
    seed: int = typer.Option(0, "--seed"),
    extensions: str = typer.Option(",".join(DEFAULT_EXTENSIONS), "-e", "--extensions",
                                   help="Comma-separated audio extensions."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch while embedding (0: torch's default) and for t-SNE (0: one)."),
) -> None:
    """t-SNE map of utterance embeddings, one colour per speaker, as a PNG."""
    from dvector.use.embedder import load
    from dvector.use.plot import visualize

    embedder = load(model, threads=threads or None)
    with _progress() as bar:
        on_start, on_item = _counting_bar(bar, "visualize")
        png, points, speakers, skipped = visualize(embedder, root, out, extensions.split(","), max_speakers,
                                                   per_speaker, seed, on_start=on_start, on_file=on_item,
                                                   threads=threads or 1)
    _print_skipped(skipped)
    console.print(f"wrote {png}: {points} utterances of {speakers} speakers", highlight=False)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("dvector-demo"), "-o", "--out", help="Folder for data, shards, run/, tsne.png, det.png."),
    small: bool = typer.Option(False, "--small", help="A reduced size that runs in about a minute (a smoke test)."),
    workers: int = typer.Option(2, "-j", "--workers", help="Processes for building shards."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """The whole pipeline on synthetic voices, no download: build, train (CPU), evaluate, plot.

    Prints the EER of the untrained and of the trained network on speakers never seen in training.
    """
    from dvector.demo.run import SMALL, DemoSize, run_demo

    with _progress() as bar:
        task = bar.add_task("demo", total=None, info="")

        def say(message: str) -> None:
            bar.console.print(message, highlight=False)

        def on_log(entry) -> None:  # type: ignore[no-untyped-def]
            eer = f", valid EER {100 * entry.valid_eer:.1f}%" if entry.valid_eer is not None else ""
            bar.update(task, description="training", info=f"step {entry.step}, loss {entry.loss:.2f}{eer}")

        result = run_demo(out, SMALL if small else DemoSize(), workers=workers, seed=seed, say=say, on_log=on_log)
    console.print(f"untrained network: EER {100 * result.untrained_eer:.2f}% on held-out synthetic speakers")
    console.print(f"trained network:   EER {100 * result.trained_eer:.2f}%  ({result.seconds:.0f} s in all)")
    console.print(f"pictures: {escape(str(result.tsne))}, {escape(str(result.det))}; model: {escape(str(result.out_dir / 'run'))}")
    print(f"EER={100 * result.trained_eer:.2f}%")


@app.command("synth")
def synth_cmd(
    root: Path = typer.Argument(..., help="Root folder to write speaker folders into."),
    speakers: int = typer.Option(10, "--speakers", help="How many speakers."),
    utterances: int = typer.Option(8, "--utterances", help="Utterances per speaker."),
    sample_rate: int = typer.Option(16000, "--sample-rate"),
    fmt: str = typer.Option("flac", "--format", help="flac or wav."),
    layout: str = typer.Option("flat", "--layout", help="flat (SPEAKER/utt.ext) or nested (SPEAKER/SESSION/utt.ext)."),
    prefix: str = typer.Option("spk", "--prefix", help="Speaker folder names: PREFIX000, PREFIX001, ..."),
    duration: str = typer.Option("1.5-4.0", "--duration", help="Utterance length range in seconds, lo-hi."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a synthetic multi-speaker corpus (for trying dvector, and the recipes' smoke mode)."""
    from dvector.demo.synth import write_corpus

    if layout not in ("flat", "nested"):
        _fail(f"--layout must be flat or nested, got {layout!r}")
    if fmt not in ("flac", "wav"):
        _fail(f"--format must be flac or wav, got {fmt!r}")
    try:
        lo, hi = (float(x) for x in duration.split("-"))
    except ValueError:
        _fail(f"--duration takes lo-hi seconds such as 1.5-4.0, got {duration!r}")
    if not 0 < lo <= hi:
        _fail(f"--duration needs 0 < lo <= hi, got {duration!r}")
    paths = write_corpus(root, speakers, utterances, seed=seed, sample_rate=sample_rate, extension=fmt,
                         prefix=prefix, nested=layout == "nested", duration_s=(lo, hi))
    console.print(f"wrote {len(paths)} files of {speakers} speakers under {escape(str(root))}")


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: user errors print one line and exit 1, without a traceback."""
    try:
        app(args=argv, standalone_mode=True)
    except DvectorError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)
