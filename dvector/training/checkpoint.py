"""Checkpoints: plain dicts of tensors and plain values, written atomically, loadable with
``torch.load(weights_only=True)``; ``latest.pt`` and ``best.pt`` sit beside the numbered ones."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dvector.errors import DvectorError
from dvector.files import atomic_write, stale_temps

FORMAT = "dvector-checkpoint"
VERSION = 1
NUMBERED = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_dir(model_dir: Path) -> Path:
    return Path(model_dir) / "checkpoints"


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` atomically: a killed save never leaves a half-written checkpoint."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` (a hard link, else a copy), atomically."""
    with atomic_write(dst, sync=False) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def save_checkpoint(state: dict[str, Any], model_dir: Path, keep: int, best: bool = False) -> Path:
    """Write ``step-NNNNNNNNN.pt``, point ``latest.pt`` (and ``best.pt``) at it, keep the last ``keep``."""
    folder = checkpoint_dir(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in stale_temps(folder):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    path = folder / f"step-{int(state['step']):09d}.pt"
    save_atomic({"format": FORMAT, "version": VERSION, **state}, path)
    _link_or_copy(path, folder / "latest.pt")
    if best:
        _link_or_copy(path, folder / "best.pt")
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


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: no code runs)."""
    p = resolve_checkpoint(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise DvectorError(f"cannot load checkpoint {p}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DvectorError(f"{p} is not a dvector checkpoint")
    if state.get("version") != VERSION:
        raise DvectorError(f"{p} has checkpoint version {state.get('version')}; this dvector reads {VERSION}")
    return state
