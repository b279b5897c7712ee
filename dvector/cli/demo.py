"""Commands on synthetic voices: demo (the whole pipeline) and synth (a corpus to try dvector on)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from dvector.cli.console import console, progress, say
from dvector.cli.options import Seed, default, out_option, workers_option
from dvector.config import FeatureConfig

DemoOut = out_option("Folder for data, shards, run/, tsne.png, det.png.")
Small = Annotated[bool, typer.Option("--small", help="A reduced size that runs in about a minute (a smoke test).")]
DemoWorkers = workers_option("Processes for building shards.")
SynthRoot = Annotated[Path, typer.Argument(help="Root folder to write speaker folders into.")]
Speakers = Annotated[int, typer.Option("--speakers", help="How many speakers.")]
Utterances = Annotated[int, typer.Option("--utterances", help="Utterances per speaker.")]
SampleRate = Annotated[int, typer.Option("--sample-rate", help="Sample rate of the files (Hz).")]
Format = Annotated[str, typer.Option("--format", help="flac or wav.")]
Layout = Annotated[str, typer.Option("--layout", help="flat (SPEAKER/utt.ext) or nested (SPEAKER/SESSION/utt.ext).")]
Prefix = Annotated[str, typer.Option("--prefix", help="Speaker folder names: PREFIX000, PREFIX001, ...")]
Duration = Annotated[str, typer.Option("--duration", help="Utterance length range in seconds, lo-hi.")]


def demo_cmd(out: DemoOut = Path("dvector-demo"), small: Small = False, workers: DemoWorkers = 2,
             seed: Seed = 0) -> None:
    """The whole pipeline on synthetic voices, no download: build, train (CPU), evaluate, plot.

    Prints the EER of the untrained and of the trained network on speakers never seen in training.
    """
    from dvector.demo.run import SMALL, DemoSize, run_demo

    with progress() as bar:
        result = run_demo(out, SMALL if small else DemoSize(), workers=workers, seed=seed,
                          say=partial(say, out=bar.console), on_log=_demo_bar(bar))
    console.print(f"untrained network: EER {100 * result.untrained_eer:.2f}% on held-out synthetic speakers")
    console.print(f"trained network:   EER {100 * result.trained_eer:.2f}%  ({result.seconds:.0f} s in all)")
    console.print(f"pictures: {escape(str(result.tsne))}, {escape(str(result.det))}; "
                  f"model: {escape(str(result.out_dir / 'run'))}")
    print(f"EER={100 * result.trained_eer:.2f}%")


def _demo_bar(bar: Any) -> Any:
    """An ``on_log`` that shows the training step, loss and validation EER on ``bar``."""
    task = bar.add_task("demo", total=None, info="")

    def on_log(entry: Any) -> None:
        eer = f", valid EER {100 * entry.valid_eer:.1f}%" if entry.valid_eer is not None else ""
        bar.update(task, description="training", info=f"step {entry.step}, loss {entry.loss:.2f}{eer}")

    return on_log


def synth_cmd(root: SynthRoot, speakers: Speakers = 10, utterances: Utterances = 8,
              sample_rate: SampleRate = default(FeatureConfig, "sample_rate"), fmt: Format = "flac",
              layout: Layout = "flat", prefix: Prefix = "spk", duration: Duration = "1.5-4.0", seed: Seed = 0) -> None:
    """Write a synthetic multi-speaker corpus (for trying dvector, and the recipes' smoke mode)."""
    from dvector.demo.synth import write_corpus

    paths = write_corpus(root, speakers, utterances, seed=seed, sample_rate=sample_rate, extension=fmt,
                         prefix=prefix, layout=layout, duration_s=duration)
    console.print(f"wrote {len(paths)} files of {speakers} speakers under {escape(str(root))}")
