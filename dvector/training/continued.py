"""What a continued run (``train -c RUN``) keeps from its checkpoint, what it may change, and what it says.

The loss is the run's: its weights (GE2E's w and b, a classifier) are in the checkpoint, so a loss
setting left out of the command is the run's own, and another ``--loss`` (or ``--subcentres``, which
shapes a classifier) is refused with one line that points to ``--init`` instead. Settings that only
change how training goes on (the optimizer, margin, scale, reduction) may change, with a note.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Callable, Collection

from dvector.config import TrainConfig
from dvector.errors import DvectorError

LOSS_SETTINGS = ("loss", "subcentres", "reduction", "margin", "scale", "margin_warmup", "optimizer")
SHAPING = ("loss", "subcentres")  # settings the loss's saved weights were made for


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def continued_config(cfg: TrainConfig, checkpoint: dict[str, Any], given: Collection[str] | None,
                     run: str | os.PathLike[str], say: Callable[[str], None]) -> TrainConfig:
    """``cfg`` for continuing ``checkpoint``: the loss settings not in ``given`` (the fields the caller set
    on purpose; None: all of them) are the run's; a given ``--loss`` or ``--subcentres`` other than the
    run's is a :class:`DvectorError`; other changed loss settings are said as notes."""
    saved = TrainConfig.from_dict(checkpoint["train_config"])
    chosen = set(LOSS_SETTINGS) if given is None else set(given) & set(LOSS_SETTINGS)
    for name in SHAPING:
        if name in chosen and getattr(cfg, name) != getattr(saved, name):
            raise DvectorError(
                f"{run} was trained with {_flag(name)} {getattr(saved, name)}, and a continued run keeps its loss "
                f"(the checkpoint holds that loss's weights): leave {_flag(name)} out, or start a new run from this "
                f"one's encoder with --init {run} {_flag(name)} {getattr(cfg, name)}")
    settled = replace(cfg, **{name: getattr(saved, name) for name in LOSS_SETTINGS if name not in chosen})
    for name in LOSS_SETTINGS:
        if name == "optimizer":
            if settled.optimizer_kind != saved.optimizer_kind:
                say(f"note: --optimizer {settled.optimizer_kind} now (the run so far used {saved.optimizer_kind}): "
                    "its state starts anew")
        elif getattr(settled, name) != getattr(saved, name):
            say(f"note: {_flag(name)} {getattr(settled, name)} now (the run so far had {getattr(saved, name)})")
    return settled


def continued_notes(checkpoint: dict[str, Any], cfg: TrainConfig, init: str | os.PathLike[str] | None,
                    say: Callable[[str], None]) -> None:
    """What a continued run says about --init (used only when a run starts) and about --freeze-steps
    changed while the encoder is still frozen."""
    if init is not None:
        started = (checkpoint.get("init") or {}).get("path")
        say(f"note: continuing a run; --init {init} is used only when a run starts"
            + (f" (this one started from {started})" if started else ""))
    was = int(checkpoint["train_config"].get("freeze_steps", 0))
    if was != cfg.freeze_steps and int(checkpoint["step"]) < max(was, cfg.freeze_steps):
        say(f"note: --freeze-steps {cfg.freeze_steps} now (the run so far had {was})")
