"""The console without a terminal: plain progress lines a batch job's log file can show."""

from __future__ import annotations

import io

from rich.console import Console

from dvector.cli.console import LoggedProgress, plain_progress_line


def logged(every_s: float) -> tuple[LoggedProgress, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    return LoggedProgress(console=console, disable=True, every_s=every_s), out


def test_every_update_prints_a_line_when_asked() -> None:
    bar, out = logged(every_s=0)
    with bar:
        task = bar.add_task("train", total=30, info="")
        for step in (10, 20, 30):
            bar.update(task, completed=step, info=f"loss {1 / step:.3f}")
    lines = out.getvalue().splitlines()
    assert [line.split(" ")[1] for line in lines] == ["10/30", "20/30", "30/30"], lines
    assert lines[0].startswith("train: 10/30 loss 0.100 |") and "elapsed" in lines[0]


def test_lines_are_rate_limited_but_the_last_is_printed() -> None:
    bar, out = logged(every_s=3600)
    with bar:
        task = bar.add_task("build-shards", total=100, info="")
        for _ in range(100):
            bar.advance(task)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # the first update, then the completion
    assert lines[0].startswith("build-shards: 1/100") and lines[-1].startswith("build-shards: 100/100")


def test_a_drawn_bar_prints_no_plain_lines() -> None:
    out = io.StringIO()
    bar = LoggedProgress(console=Console(file=out, force_terminal=True, width=80), disable=False, every_s=0)
    with bar:
        task = bar.add_task("train", total=3, info="")
        bar.update(task, completed=3)
    assert "train: 3/3" not in out.getvalue()


def test_plain_line_has_an_eta_midway() -> None:
    clock = [100.0]
    bar = LoggedProgress(console=Console(file=io.StringIO()), disable=True, every_s=0, get_time=lambda: clock[0])
    task = bar.add_task("train", total=100, info="loss 1.0")
    bar.start_task(task)
    clock[0] += 60.0  # half the work in a minute: a minute left
    bar.update(task, completed=50)
    assert plain_progress_line(bar.tasks[0]) == "train: 50/100 loss 1.0 | 60 s elapsed, ETA 0:01:00"


def test_under_torchrun_only_rank_0_prints_an_error(tmp_path, capsys, monkeypatch) -> None:  # noqa: ANN001
    import pytest

    import warnings

    from dvector.cli import main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own; restored after
    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            main(["index", str(tmp_path)])  # not a build folder: a DvectorError
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert ("error:" in err) == shown, (rank, err)
        assert "Traceback" not in err


def test_warnings_print_as_one_line() -> None:
    import warnings

    from dvector.cli.console import show_warnings_as_lines

    before = warnings.formatwarning
    try:
        show_warnings_as_lines()
        text = warnings.formatwarning("skipping shard x.tar: truncated", RuntimeWarning, "/some/file.py", 12)
    finally:
        warnings.formatwarning = before
    assert text == "warning: skipping shard x.tar: truncated\n"


def test_user_text_is_printed_literally_not_as_emoji(tmp_path, capsys) -> None:  # noqa: ANN001
    """``--dask local:abc`` printed ``local🔤``: rich read ``:abc:`` as an emoji code."""
    import pytest

    from dvector.cli import main
    from dvector.cli.console import console, say, warn

    with pytest.raises(SystemExit) as exit_info:
        main(["build-shards", "-o", str(tmp_path / "out"), "--dask", "local:abc", str(tmp_path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "--dask local:abc:" in err and "\N{INPUT SYMBOL FOR LATIN LETTERS}" not in err, err
    assert console.stderr and not console._emoji  # every message goes through this console
    say("file a:smile:b.wav")
    warn("speaker :thumbs_up: skipped")
    err = capsys.readouterr().err
    assert "a:smile:b.wav" in err and ":thumbs_up:" in err, err
