"""Checkpoints: plain dicts of tensors and plain values, written atomically, loadable with
``torch.load(weights_only=True)``; ``latest.pt`` and ``best.pt`` sit beside the numbered ones.

A checkpoint whose weights hold NaN or Inf is never written; a run continues from the newest
readable checkpoint when its ``latest.pt`` is damaged (:func:`load_resume_checkpoint`).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from dvector.errors import DvectorError
from dvector.files import atomic_write, stale_temps

FORMAT = "dvector-checkpoint"
VERSION = 1
NUMBERED = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_dir(model_dir: Path) -> Path:
    return Path(model_dir) / "checkpoints"


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` atomically: a killed save never leaves a half-written checkpoint.

    Serialized in memory first and written by Python: torch's own file writer turns a full disk into a
    long C++ ``RuntimeError`` (or an abort); here it is an ``OSError`` with its errno.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` (a hard link, else a copy), atomically."""
    with atomic_write(dst, sync=False) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def nonfinite_weights(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a checkpoint's ``model`` and ``criterion`` that hold NaN or Inf."""
    named = [(f"{part}.{name}", value) for part in ("model", "criterion")
             for name, value in (state.get(part) or {}).items()
             if isinstance(value, torch.Tensor) and value.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([value.isfinite().all().cpu() for _, value in named]).tolist()  # one device sync
    return [name for (name, _), ok in zip(named, finite) if not ok]


def check_finite(state: dict[str, Any]) -> None:
    """Raise :class:`DvectorError` naming the step when the weights of ``state`` hold NaN or Inf."""
    bad = nonfinite_weights(state)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DvectorError(f"refusing to save the checkpoint of step {state.get('step')}: NaN or Inf in "
                           f"{', '.join(bad[:3])}{more}; the checkpoints already saved are left as they were")


def save_checkpoint(state: dict[str, Any], model_dir: Path, keep: int, best: bool = False) -> Path:
    """Write ``step-NNNNNNNNN.pt``, point ``latest.pt`` (and ``best.pt``) at it, keep the last ``keep``.

    Refuses (:class:`DvectorError`, nothing written) when the weights hold NaN or Inf.
    """
    check_finite(state)
    folder = checkpoint_dir(model_dir)
    path = folder / f"step-{int(state['step']):09d}.pt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in stale_temps(folder):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        save_atomic({"format": FORMAT, "version": VERSION, **state}, path)
        _link_or_copy(path, folder / "latest.pt")
        if best:
            _link_or_copy(path, folder / "best.pt")
    except OSError as exc:
        raise DvectorError(f"cannot save the checkpoint of step {state.get('step')} as {path}: "
                           f"{exc.strerror or exc}; the checkpoints saved before are kept") from exc
    numbered = sorted(p for p in folder.iterdir() if NUMBERED.match(p.name))
    for old in numbered[:-keep]:
        old.unlink()
    return path


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or a run folder (its latest checkpoint)."""
    p = Path(path)
    if p.is_dir():
        for folder in (checkpoint_dir(p), p):
            if (folder / "latest.pt").exists():
                return folder / "latest.pt"
            numbered = sorted(c for c in folder.glob("step-*.pt") if NUMBERED.match(c.name)) if folder.is_dir() else []
            if numbered:  # a run killed between writing a checkpoint and pointing latest.pt at it
                return numbered[-1]
        raise DvectorError(f"{p} holds no checkpoints (checkpoints/latest.pt or step-*.pt)")
    if not p.exists():
        raise DvectorError(f"checkpoint {p} does not exist")
    return p


def _reason(exc: Exception, path: Path) -> str:
    """Why ``torch.load`` failed, in one short line (torch's first sentence; an empty file named so)."""
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
    except OSError:
        pass
    first = " ".join(str(exc).split()).split(". ")[0].rstrip(".")
    return first or type(exc).__name__


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: no code runs)."""
    p = resolve_checkpoint(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise DvectorError(f"cannot load checkpoint {p}: {_reason(exc, p)}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DvectorError(f"{p} is not a dvector checkpoint")
    if state.get("version") != VERSION:
        raise DvectorError(f"{p} has checkpoint version {state.get('version')}; this dvector reads {VERSION}")
    return state


RESUME_KEYS = ("step", "model", "criterion", "optimizer", "scheduler", "model_config", "train_config", "rng")
INIT_KEYS = ("model", "model_config")  # what ``train --init`` reads: an encoder and its network


def _load_for_resume(path: Path, keys: tuple[str, ...] = RESUME_KEYS) -> dict[str, Any]:
    """A checkpoint that training can continue from (every part a run restores), else DvectorError."""
    state = load_checkpoint(path)
    missing = [k for k in keys if k not in state]
    if missing:
        raise DvectorError(f"{path} is not a training checkpoint: it lacks {', '.join(missing)}")
    return state


def load_resume_checkpoint(path: str | os.PathLike[str], say: Callable[[str], None] = print,
                           keys: tuple[str, ...] = RESUME_KEYS) -> tuple[dict[str, Any], Path]:
    """The checkpoint to continue training from (``keys``: the entries it must hold; ``INIT_KEYS`` for
    ``train --init``), and the file it came from.

    ``path`` is a checkpoint file or a run folder (its ``latest.pt``). When that is ``latest.pt``
    and cannot be read (truncated, not a checkpoint), the newest readable ``step-*.pt`` beside it
    is used instead, and ``say`` tells which; a damaged numbered file named on its own is an error.
    """
    chosen = resolve_checkpoint(path)
    try:
        return _load_for_resume(chosen, keys), chosen
    except DvectorError as exc:
        if chosen.name != "latest.pt":
            raise
        problem = str(exc)
    unreadable = []
    numbered = sorted((p for p in chosen.parent.iterdir() if NUMBERED.match(p.name)), reverse=True)
    for candidate in numbered:
        try:
            state = _load_for_resume(candidate, keys)
        except DvectorError:
            unreadable.append(candidate.name)
            continue
        skipped = f" ({', '.join(unreadable)} cannot be read either)" if unreadable else ""
        say(f"note: {problem}; continuing from {candidate}, the newest readable checkpoint beside it{skipped}")
        return state, candidate
    raise DvectorError(f"{problem}; and no readable step-*.pt beside it to continue from instead")
