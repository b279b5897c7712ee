"""The ``dvector`` command line: parse options, build a config, call one library function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .config import DEFAULT_EXTENSIONS, BuildConfig, FeatureConfig, VadConfig
from .errors import DvectorError

app = typer.Typer(
    help="Speaker embeddings (d-vectors) trained with the GE2E loss: build shards, train, embed, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
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
    shard_size: int = typer.Option(10000, "--shard-size", help="At most this many utterances per shard."),
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
    from .audio import normalize_extensions
    from .build import Progress as BuildProgress, build_shards, parse_part
    from .summary import print_build_summary

    cfg = BuildConfig(extensions=normalize_extensions(extensions.split(",")), shard_size=shard_size,
                      min_shards=min_shards, block_size=block_size, seed=seed, merge_speakers=merge_speakers,
                      features=FeatureConfig(sample_rate=sample_rate, n_mels=n_mels), vad=VadConfig(enabled=vad))
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
    from .build import write_index

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
    from .check import check_shards
    from .shards import read_index

    total = len(read_index(folder)["shards"])
    with _progress() as bar:
        task = bar.add_task("check", total=total, info="")
        report = check_shards(folder, workers or os.cpu_count() or 1, on_shard=lambda: bar.advance(task))
    if report.ok:
        console.print(f"[green]ok[/]: {report.shards} shards match the index")
        return
    for name, problem in report.problems:
        console.print(f"[red]{name}[/]: {problem}", highlight=False)
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
    model: str = typer.Option("attentive", "--model", help="paper (3x768 LSTM, 256 proj), attentive (original, 3x256), or tiny."),
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
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0: torch's default)."),
) -> None:
    """Train the d-vector with the GE2E loss on streamed, speaker-balanced batches.

    Several GPUs: torchrun --nproc-per-node=8 -m dvector train SHARDS MODEL_DIR
    """
    from .config import ModelConfig, TrainConfig, parse_seg_len
    from .summary import print_train_summary
    from .train import train

    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = TrainConfig(steps=steps, save_every=save_every, decay_every=decay_every, valid_every=valid_every,
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

        result = train(shards, model_dir, cfg, ModelConfig.preset(model), resume=str(resume) if resume else None,
                       valid=valid, device=device, on_log=on_log, say=say if is_main else (lambda m: None))
    if is_main:
        print_train_summary(result, console)


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: user errors print one line and exit 1, without a traceback."""
    try:
        app(args=argv, standalone_mode=True)
    except DvectorError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
