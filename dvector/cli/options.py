"""Options that several commands share, declared once as ``Annotated`` aliases, and ``default``: the
defaults of the config dataclasses, read from them rather than retyped.

An option whose help must say something particular to a command is made with the option's one
factory (``seed_option("Seed of the block shuffle.")``): its names and type stay declared here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dvector.config import DEFAULT_EXTENSIONS


def given_options(ctx: typer.Context) -> set[str]:
    """The parameters of the running command that its command line (or environment) set, not their defaults."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}  # Typer may bring its own copy of
    return {name for name, source in sources.items()  # click's ParameterSource: compare names, not the class
            if getattr(source, "name", "") not in ("", "DEFAULT", "DEFAULT_MAP")}


def default(config: type, name: str) -> Any:
    """The default of setting ``name`` of the config dataclass ``config``: ``default(TrainConfig, "steps")``.

    Raises ``LookupError`` if there is no such setting or it has no default (a typo must not pass).
    """
    for f in dataclasses.fields(config):
        if f.name != name:
            continue
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        raise LookupError(f"{config.__name__}.{name} has no default")
    raise LookupError(f"{config.__name__} has no setting {name!r}")


def range_text(value: tuple[Any, Any]) -> str:
    """``(160, 160)`` -> "160"; ``(140, 180)`` -> "140-180": a (lo, hi) default as it is typed."""
    lo, hi = value
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


EXTENSIONS = ",".join(DEFAULT_EXTENSIONS)  # the -e default, as typed on the command line

# ---- factories: each option's names and type, once -----------------------------------------------


def model_argument(help: str) -> Any:  # noqa: A002 - Typer's word
    return Annotated[Path, typer.Argument(help=help)]


def extensions_option(help: str) -> Any:  # noqa: A002
    return Annotated[str, typer.Option("-e", "--extensions", help=help)]


def threads_option(help: str) -> Any:  # noqa: A002
    return Annotated[int, typer.Option("--threads", help=help)]


def workers_option(help: str) -> Any:  # noqa: A002
    return Annotated[int, typer.Option("-j", "--workers", help=help)]


def dask_option(help: str) -> Any:  # noqa: A002
    return Annotated[Optional[str], typer.Option("--dask", help=help)]


def seed_option(help: str) -> Any:  # noqa: A002
    return Annotated[int, typer.Option("--seed", help=help)]


def out_option(help: str, *more_names: str) -> Any:  # noqa: A002
    return Annotated[Path, typer.Option("-o", "--out", *more_names, help=help)]


# ---- the shared aliases --------------------------------------------------------------------------

Model = model_argument("Run folder, checkpoint file, or exported folder.")
Extensions = extensions_option("Comma-separated audio extensions looked for in folders, case-insensitive "
                               "(m4a/aac need dvector\\[m4a]).")
Threads = threads_option("CPU threads for torch while embedding (0: torch's default).")
Workers = workers_option("Worker processes (0: every core).")
Dask = dask_option("Run the jobs on a Dask cluster: its scheduler's address (tcp://host:8786), or local:K to "
                   "start K worker processes here. Needs dvector\\[dask].")
Seed = seed_option("Random seed: the same seed, the same result.")
