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


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: user errors print one line and exit 1, without a traceback."""
    try:
        app(args=argv, standalone_mode=True)
    except DvectorError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
