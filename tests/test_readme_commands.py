"""The README's and docs/*.md's commands run as written.

- The README's tour (the ```bash block after ``<!-- tour -->``) runs end to end in an empty folder.
- Every ``dvector SUBCOMMAND --flag`` in a shell code block or an inline code span of README.md and
  docs/*.md names a real subcommand, and each flag appears in ``dvector SUBCOMMAND --help``; every
  ``python benchmarks/X.py --flag`` names a script that defines the flag; every script path shown
  exists. Commands that cannot run here (torchrun on GPUs, Dask at tcp://, http URLs) are only
  checked this way.
- Relative links between the pages resolve.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]

SHELL_LANGS = {"bash", "sh", "shell", "console", ""}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")", "((", "))"}
TOUR_MARKER = "<!-- tour -->"


# ---- extraction ----

def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)]


def inline_spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks."""
    return INLINE.findall(FENCE.sub("", text))


def shell_lines(body: str) -> list[str]:
    """Logical lines of a shell block: backslash continuations joined."""
    return [line for line in body.replace("\\\n", " ").splitlines() if line.strip()]


def tokens(line: str) -> list[str]:
    """Shell words of one line, comments dropped, operators (|, &&, ;, ...) as their own tokens."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        return list(lex)
    except ValueError:  # an unbalanced quote: fall back to plain splitting
        return line.split("#", 1)[0].split()


def flags_of(words: list[str]) -> list[str]:
    """The option names among a command's words: '--x=1' -> '--x'; '[--x' -> '--x'; '-' (stdin) is not one."""
    found = []
    for word in words:
        word = word.strip("[]")
        if word.startswith("-") and word != "-" and not re.fullmatch(r"-[\d.]+", word):
            found.append(word.split("=", 1)[0])
    return found


def commands(words: list[str]) -> list[tuple[str, str, list[str]]]:
    """(kind, name, flags) of each command in a token list, kind 'dvector' (name: the subcommand,
    '' when none is given) or 'script' (name: a benchmarks/ or pipelines/ path)."""
    found = []
    segments: list[list[str]] = [[]]
    for word in words:
        if word in SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(word)
    for seg in segments:
        for i, word in enumerate(seg):
            if Path(word).name == "dvector" and (i == 0 or seg[i - 1] in {"-m", "exec", "time"}
                                                 or "/" in word):
                rest = seg[i + 1:]
                sub = rest[0] if rest and not rest[0].startswith("-") else ""
                found.append(("dvector", sub, flags_of(rest[1:] if sub else rest)))
                break
            if re.fullmatch(r"(\./)?(benchmarks|pipelines)/[\w./-]+\.(py|sh)", word):
                found.append(("script", word.removeprefix("./"), flags_of(seg[i + 1:])))
                break
    return found


def page_commands(text: str) -> list[tuple[str, str, list[str], str]]:
    """Every command in a page's shell blocks and inline code spans, with its source line."""
    found = []
    for lang, body in code_blocks(text):
        if lang in SHELL_LANGS:
            for line in shell_lines(body):
                found += [(*cmd, line.strip()) for cmd in commands(tokens(line))]
    for span in inline_spans(text):
        if re.match(r"(python (-m )?)?(dvector |benchmarks/|pipelines/|torchrun )", span):
            found += [(*cmd, span) for cmd in commands(tokens(span))]
    return found


# ---- what the CLI and the scripts accept ----

@lru_cache(maxsize=None)
def cli_help(sub: str) -> str | None:
    """`dvector SUB --help` as the user sees it (wide, no colour); None for an unknown subcommand."""
    from typer.testing import CliRunner

    from dvector.cli import app

    args = [sub, "--help"] if sub else ["--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250", "TERMINAL_WIDTH": "250", "NO_COLOR": "1",
                                                "TERM": "dumb"})
    if result.exit_code != 0:
        return None
    return result.output


def flag_in_help(flag: str, help_text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


@lru_cache(maxsize=None)
def script_flags(path: str) -> frozenset[str] | None:
    """Option strings a benchmark script's argparse defines (None: no such file)."""
    file = REPO / path
    if not file.is_file():
        return None
    if file.suffix != ".py":
        return frozenset()
    return frozenset(re.findall(r"""["'](--?[\w-]+)["']""", " ".join(
        m.group(0) for m in re.finditer(r"add_argument\([^)]*", file.read_text()))))


def problems(text: str) -> list[str]:
    """What a page shows that would not run: unknown subcommands, flags, scripts."""
    found = []
    for kind, name, flags, line in page_commands(text):
        if "[-" in line.split("#", 1)[0]:
            found.append(f"an optional part in brackets is not runnable as written: {line}")
        if kind == "dvector":
            help_text = cli_help(name)
            if help_text is None:
                found.append(f"unknown subcommand `dvector {name}` in: {line}")
                continue
            found += [f"`dvector {name}` has no {flag} (not in its --help), in: {line}"
                      for flag in flags if flag != "--help" and not flag_in_help(flag, help_text)]
        else:
            known = script_flags(name)
            if known is None:
                found.append(f"no such script {name}, in: {line}")
            elif name.endswith(".py"):
                found += [f"{name} defines no {flag}, in: {line}" for flag in flags
                          if flag != "--help" and flag not in known]
    return found


def tour_script(text: str) -> str:
    """The shell block right after the tour marker."""
    after = text.split(TOUR_MARKER, 1)
    assert len(after) == 2, f"README.md has no {TOUR_MARKER} marker before its tour"
    blocks = code_blocks(after[1].lstrip("\n"))
    assert blocks and blocks[0][0] == "bash", "the tour marker must be followed by a ```bash block"
    return blocks[0][1]


# ---- the extractor can fail ----

def test_extractor_detects_made_up_flags_and_commands():
    page = """
Text with `dvector train shards/ run --made-up-flag 3` inline.

```bash
dvector build-shards data/ -o shards/ --min-shards 4   # fine
torchrun --nproc-per-node=8 -m dvector train shards/ runs/x --gather --not-a-flag
arecord -f S16_LE | dvector embed runs/x - --per-window --sample-rate 8000
dvector frobnicate runs/x
dvector eval runs/x test/ [--trials t.txt]
python benchmarks/bench_loss.py -n 64 --no-such-option
python benchmarks/no_such_bench.py
```

```python
dvector.load("runs/x")  # python, not checked
```
"""
    found = problems(page)
    assert any("--made-up-flag" in p for p in found), found
    assert any("--not-a-flag" in p for p in found), found
    assert any("frobnicate" in p for p in found), found
    assert any("--no-such-option" in p for p in found), found
    assert any("no_such_bench.py" in p for p in found), found
    assert any("brackets" in p for p in found), found
    assert len(found) == 6, found  # and nothing else: --min-shards, --gather, --per-window, -n are real
    cmds = [c[:3] for c in page_commands(page)]
    assert ("dvector", "train", ["--gather", "--not-a-flag"]) in cmds
    assert ("dvector", "embed", ["--per-window", "--sample-rate"]) in cmds


def test_tour_block_is_found():
    script = tour_script(README.read_text())
    subs = [c[1] for line in shell_lines(script) for c in commands(tokens(line))]
    assert subs[-4:] == ["build-shards", "train", "eval", "export"], subs


# ---- the pages ----

@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_command_shown_exists_with_its_flags(page):
    text = page.read_text()
    assert problems(text) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_shows_the_ci_test_command_and_one_demo_figures_line():
    text = README.read_text()
    assert "python -m pytest -q" in text
    assert "python -m pytest -q" in (REPO / ".ci" / "run").read_text()
    marked = [line for line in text.splitlines() if line.rstrip().endswith("<!-- demo-figures -->")]
    assert len(marked) == 1, marked
    for page in ("building-shards", "training", "using-a-model", "export-and-streaming", "diarization",
                 "at-scale", "results", "architecture"):
        assert f"docs/{page}.md" in text, page


@pytest.mark.slow
def test_readme_tour_runs_end_to_end(tmp_path):
    script = tour_script(README.read_text())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVECTOR_PROGRESS": "0"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "shards" / "index.json").exists()
    assert (tmp_path / "runs" / "tour" / "eval.json").exists()
    assert (tmp_path / "exported" / "dvector.pt").exists()
    assert re.search(r"^EER=\d+(\.\d+)?%$", done.stdout, re.M), done.stdout[-2000:]
