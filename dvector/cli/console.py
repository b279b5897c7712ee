"""The terminal: the console (stderr), progress bars, and the few ways every command prints.

Everything printed through rich is markup: whatever the user or the file system supplied (paths,
file names, reasons, library messages) goes through ``escape`` first, since a ``[`` in a file name
would otherwise be read as a tag. Emoji codes are off: ``--dask local:abc`` or a file ``a:smile:b.wav``
is printed as typed, never as a picture.
"""

from __future__ import annotations

import os
import warnings
import time
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# one line whatever the width (soft_wrap); user text is printed literally: no ``:name:`` emoji codes
console = Console(stderr=True, soft_wrap=True, emoji=False)
MAX_LISTED = 10


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of file names (surrogate escapes) shown as ``\\xff``:
    writing them as they are fails on a strict UTF-8 stream."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "backslashreplace").decode(
            "utf-8", "backslashreplace")


def _only_escapes(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def show_warnings_as_lines() -> None:
    """Python warnings (a skipped sample or shard, say) as one ``warning: MESSAGE`` line each on
    stderr, instead of a file name, a line number and a source line."""
    def one_line(message: Any, category: Any, filename: str, lineno: int, line: Any = None) -> str:
        return f"warning: {printable(str(message))}\n"

    warnings.formatwarning = one_line


def print_error(message: str) -> None:
    """The one way a user error is shown: ``error: MESSAGE``."""
    console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False)


def warn(message: str) -> None:
    """A warning: ``warning: MESSAGE`` (the message is never read as markup)."""
    console.print(f"[yellow]warning:[/] {escape(printable(message))}", highlight=False)


def say(text: str, out: Console = console) -> None:
    """A plain message (from the library, or naming user paths): printed as is, never as markup."""
    out.print(escape(printable(text)), highlight=False)


PLAIN_EVERY_S = 5.0  # without a terminal, a plain progress line at most this often (per task)


class LoggedProgress(Progress):
    """A rich progress bar on a terminal; elsewhere (a batch job's log file) plain lines instead.

    Without a terminal the bar is not drawn; each update prints one line (``description: done/total
    info | elapsed, ETA``) when ``every_s`` seconds have passed since the task's last line, when the
    task completes, and, with ``every_s=0``, on every update (training updates once per
    ``--log-every`` steps).
    """

    def __init__(self, *columns: Any, every_s: float = PLAIN_EVERY_S, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.every_s = every_s
        self._last_line: dict[Any, float] = {}

    def update(self, task_id: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._plain_line(task_id)

    def advance(self, task_id: Any, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._plain_line(task_id)

    def _plain_line(self, task_id: Any) -> None:
        if not self.disable:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        last = self._last_line.get(task_id)
        if last is not None and now - last < self.every_s and not task.finished:
            return
        if task.finished and last == float("inf"):
            return  # the completed line is printed once
        self._last_line[task_id] = float("inf") if task.finished else now
        self.console.print(escape(plain_progress_line(task)), highlight=False)


def plain_progress_line(task: Any) -> str:
    """``description: done/total info | 12.0 s elapsed, ETA 0:01:05`` for a rich progress task."""
    done = f"{task.completed:.0f}" + (f"/{task.total:.0f}" if task.total is not None else "")
    info = task.fields.get("info", "")
    elapsed = task.elapsed or 0.0
    eta = ""
    if task.total and 0 < task.completed < task.total and elapsed > 0:
        left = int(elapsed * (task.total - task.completed) / task.completed)
        eta = f", ETA {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"
    return f"{task.description}: {done}{' ' + info if info else ''} | {elapsed:.0f} s elapsed{eta}"


def progress(every_s: float = PLAIN_EVERY_S) -> LoggedProgress:
    """A progress bar on the console: drawn on a terminal (or anywhere with DVECTOR_PROGRESS=1);
    otherwise plain lines, at most one per ``every_s`` seconds (0: every update)."""
    return LoggedProgress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        disable=not console.is_terminal and os.environ.get("DVECTOR_PROGRESS") != "1", every_s=every_s,
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
