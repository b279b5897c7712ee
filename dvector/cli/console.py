"""The terminal: the console (stderr), progress bars, and the few ways every command prints.

Everything printed through rich is markup: whatever the user or the file system supplied (paths,
file names, reasons, library messages) goes through ``escape`` first, since a ``[`` in a file name
would otherwise be read as a tag.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)  # messages stay one line, whatever the width
MAX_LISTED = 10


def print_error(message: str) -> None:
    """The one way a user error is shown: ``error: MESSAGE``."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def say(text: str, out: Console = console) -> None:
    """A plain message (from the library, or naming user paths): printed as is, never as markup."""
    out.print(escape(text), highlight=False)


def progress() -> Progress:
    """A progress bar on the console; shown on a terminal, or anywhere with DVECTOR_PROGRESS=1."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        disable=not console.is_terminal and os.environ.get("DVECTOR_PROGRESS") != "1",
    )


def print_skipped(skipped: Sequence[tuple[str, str]], what: str = "file(s)") -> None:
    """The files that could not be used: how many, the first ``MAX_LISTED`` with their reasons."""
    if not skipped:
        return
    console.print(f"[yellow]skipped {len(skipped)} {what}:[/]", highlight=False)
    for name, reason in skipped[:MAX_LISTED]:
        say(f"  {name}: {reason}")
    if len(skipped) > MAX_LISTED:
        console.print(f"  ... and {len(skipped) - MAX_LISTED} more", highlight=False)


def counting_bar(bar: Progress, description: str) -> tuple[Callable[[Any], None], Callable[..., None]]:
    """(on_start(total), on_item(*_)) callbacks that drive one task of ``bar``."""
    task = bar.add_task(description, total=None, info="")

    def on_start(total: Any) -> None:
        bar.update(task, total=total)

    def on_item(*_args: Any) -> None:
        bar.advance(task)

    return on_start, on_item
