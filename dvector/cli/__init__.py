"""cli: the ``dvector`` command line, a thin Typer layer. Each command parses its options, builds a
config and calls one library function; progress bars and summaries are printed here, decisions are
the library's.

Modules: ``options`` (shared options, defaults read from the config dataclasses), ``console``
(console, progress bars, printing), ``build`` (build-shards, index, check), ``train``, ``use`` (embed,
score, eval, export, visualize), ``diarize`` (diarize, diarize-eval), ``demo`` (demo, synth),
``summary`` (end-of-job tables). This module makes the Typer ``app`` and ``main``, the console entry
point.

Owns: the terminal. May import every part; only ``dvector.__main__`` imports it, never a library module.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from dvector.cli import build, demo, diarize, pretrained, train, use
from dvector.cli.console import print_error, say, show_warnings_as_lines
from dvector.config import launch_rank
from dvector.errors import DvectorError, Stopped

app = typer.Typer(
    help="Speaker embeddings (d-vectors) trained with the GE2E loss: build shards, train, embed, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# in the order `dvector --help` lists them
app.command("build-shards")(build.build_shards_cmd)
app.command("index")(build.index_cmd)
app.command("check")(build.check_cmd)
app.command("train")(train.train_cmd)
app.command("import")(pretrained.import_cmd)
app.command("embed")(use.embed_cmd)
app.command("score")(use.score_cmd)
app.command("eval")(use.eval_cmd)
app.command("export")(use.export_cmd)
app.command("visualize")(use.visualize_cmd)
app.command("diarize")(diarize.diarize_cmd)
app.command("diarize-eval")(diarize.diarize_eval_cmd)
app.command("demo")(demo.demo_cmd)
app.command("synth")(demo.synth_cmd)


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: user errors (``DvectorError``) print one line and exit 1, without a
    traceback; work stopped by a signal (``Stopped``) says where it is kept and exits 128 + the signal's
    number; under torchrun only rank 0 prints. Warnings print as one ``warning:`` line."""
    show_warnings_as_lines()
    try:
        app(args=argv, standalone_mode=True)
    except Stopped as exc:
        if launch_rank() == 0:
            say(f"stopped: {exc}")
        sys.exit(exc.exit_code)
    except DvectorError as exc:
        if launch_rank() == 0:
            print_error(str(exc))
        sys.exit(exc.exit_code)
