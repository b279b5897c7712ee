"""``dvector import``: an encoder trained elsewhere as a run folder (today: Resemblyzer's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from dvector.cli.console import console
from dvector.cli.options import out_option

SOURCES = ("resemblyzer",)
Source = Annotated[str, typer.Argument(help="What to import: resemblyzer (its GE2E d-vector, from the installed "
                                            "package: pip install 'dvector\\[resemblyzer]').")]
ImportOut = out_option("Run folder to write (checkpoints/ with the imported encoder and its settings).")
Weights = Annotated[Optional[Path], typer.Option("--weights", help="A pretrained.pt to read instead of the "
                                                 "installed package's (the same file, copied elsewhere).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the checkpoints of a folder that has some.")]


def import_cmd(source: Source, out: ImportOut = Path("runs/resemblyzer"), weights: Weights = None,
               overwrite: Overwrite = False) -> None:
    """Import a pretrained encoder as a run folder that embed, eval, export, diarize and train --init take.

    resemblyzer: Resemblyzer's voice encoder (3 x 256 LSTM, trained with GE2E on thousands of speakers),
    its weights copied exactly, with its front end (librosa's mel power, the level raised to -30 dBFS) and
    its 1.6 s partial windows recorded as the run's settings. Nothing is downloaded; once imported, the run
    needs neither resemblyzer nor librosa.

    Then, e.g.: dvector eval RUN test_root/;  dvector build-shards ROOT -o shards/ --features RUN;
    dvector train shards/ runs/tuned --init RUN --freeze-steps 200 --lr 1e-4.
    """
    from dvector.errors import DvectorError
    from dvector.pretrained.resemblyzer import import_resemblyzer

    if source not in SOURCES:
        raise DvectorError(f"cannot import {source!r}; dvector imports: {', '.join(SOURCES)}")
    done = import_resemblyzer(out, weights, overwrite=overwrite)
    version = f" {done.version}" if done.version else ""
    console.print(f"imported Resemblyzer{version}'s encoder ({done.parameters:,} parameters, sha256 "
                  f"{done.sha256[:12]}) into {escape(str(done.run))}")
