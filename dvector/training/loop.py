"""Train a d-vector with GE2E: one device or many (torchrun -> DDP), checkpoints that resume exactly.

Rank 0 alone logs, validates and saves; every rank draws its own slice of the data stream and
takes the same number of steps, so uneven data can never hang DDP.

:func:`train` runs, in order: the setup of the process, shards, checkpoint and model config,
the validation speakers, the model, loss, optimizer and scheduler, and this rank's data stream
(all in :mod:`dvector.training.prepare`; torchrun/DDP in :mod:`dvector.training.distributed`),
then the step loop (:mod:`dvector.training.steps`), which logs, validates and saves checkpoints.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

from dvector.config import ModelConfig, TrainConfig
from dvector.errors import DvectorError
from dvector.files import one_writer
from dvector.training.distributed import Distributed, ends_own_process_group, main_value, setup_process
from dvector.training.prepare import (Trainee, build_parts, describe, make_loader, make_runner, restore_parts,
                                      setup_run, validation_speakers)
from dvector.training.steps import StepLog, StepLoop
from dvector.training.transfer import start_from
from dvector.training.validation import validation_note

__all__ = ["Trainee", "StepLog", "TrainResult", "train"]


@dataclass
class TrainResult:
    """What a call of :func:`train` did, as seen by this process."""

    model_dir: Path
    steps_done: int  # steps taken in this run
    final_step: int
    last_loss: float
    best_eer: float | None
    seconds: float
    data_wait: float
    checkpoints: list[Path] = field(default_factory=list)
    sampling: dict[str, int] = field(default_factory=dict)  # this rank's SamplingStats: read, tiled, dropped...
    is_main: bool = True  # rank 0 (or the only process): the one that logs and saves
    skipped_steps: int = 0  # steps of this run without an optimizer step: NaN or Inf in the loss or gradient norm
    counters: dict[str, Any] = field(default_factory=dict)  # totals over the continued runs too, as a checkpoint holds them
    best_min_dcf: float | None = None  # the validation minDCF (p_target 0.01) of the best checkpoint, where known
    best_step: int | None = None  # the step of the best checkpoint, where known
    validation_note: str = ""  # why validation could not choose a checkpoint well (too easy, narrow), or ""


@contextmanager
def run_folder_lock(model_dir: str | os.PathLike[str], ddp: Distributed, say: Callable[[str], None]) -> Iterator[None]:
    """The run folder has one writer: rank 0 holds its lock (:func:`dvector.files.one_writer`) while the
    block runs; when another run holds it, every rank stops with the same one line, before any data is read."""
    with ExitStack() as stack:
        refused = None
        if ddp.main:
            if not os.path.lexists(model_dir):  # a run refused before writing anything leaves no folder
                stack.callback(_remove_if_empty, Path(model_dir))
            try:
                stack.enter_context(one_writer(model_dir, "training run", say))
            except DvectorError as exc:
                refused = str(exc)
            except OSError as exc:  # read-only, or a file in the way
                refused = f"cannot write into the run folder {model_dir}: {exc.strerror or exc}"
        refused = main_value(refused, ddp)
        if refused:
            raise DvectorError(refused)
        yield


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only if empty
    except OSError:
        pass


@ends_own_process_group
def train(
    shards: str | Sequence[str],
    model_dir: str | os.PathLike[str],
    cfg: TrainConfig = TrainConfig(),
    model_cfg: ModelConfig | None = None,
    resume: str | os.PathLike[str] | None = None,
    valid: str | None = None,
    device: str | None = None,
    index: str | None = None,
    on_log: Callable[[StepLog], None] | None = None,
    say: Callable[[str], None] = print,
    init: str | os.PathLike[str] | None = None,
    given: Collection[str] | None = None,
) -> TrainResult:
    """Train (or continue training from ``resume``) and return a summary; see the module doc.

    ``init`` (a run folder or checkpoint file; ignored with a note when continuing): start from that
    run's encoder, network and feature settings (``model_cfg`` may only name the same network), with
    the loss's weights, the optimizer, the schedule and the step count new; ``cfg.freeze_steps``
    then trains only the loss's weights for that many steps.

    ``given``: the ``cfg`` fields the caller set on purpose (the CLI: the options on its command line;
    None: all). Continuing, the loss settings not given are the run's, and another loss is refused
    (:mod:`dvector.training.continued`).
    """
    started = time.perf_counter()
    ddp, dev = setup_process(device, cfg)
    with run_folder_lock(model_dir, ddp, say):
        return _train(shards, model_dir, cfg, model_cfg, resume, valid, ddp, dev, index, on_log, say, init, given,
                      started)


def _train(shards: str | Sequence[str], model_dir: str | os.PathLike[str], cfg: TrainConfig,
           model_cfg: ModelConfig | None, resume: str | os.PathLike[str] | None, valid: str | None,
           ddp: Distributed, dev: Any, index: str | None, on_log: Callable[[StepLog], None] | None,
           say: Callable[[str], None], init: str | os.PathLike[str] | None, given: Collection[str] | None,
           started: float) -> TrainResult:
    """:func:`train` once the process is set up and the run folder is this run's alone."""
    ctx = setup_run(shards, model_dir, cfg, model_cfg, resume, ddp, dev, index, say, init, given)
    cfg = ctx.cfg
    validation = validation_speakers(cfg, ctx, valid)
    parts = build_parts(cfg, ctx)
    if ctx.checkpoint is not None:
        restore_parts(parts, ctx.checkpoint, cfg, ctx.dev, ctx.say)
        ctx.say(f"continuing from {ctx.resume_path} at step {parts.step}")
    elif ctx.init_source is not None:
        start_from(parts.model, ctx.init_source, cfg, ctx.say)
        ctx.init_source = None  # its weights are copied: free the init checkpoint
    if parts.step >= cfg.steps:
        ctx.say(f"nothing to do: the checkpoint is at step {parts.step} and -i asks for {cfg.steps} steps in all")
    first_step = parts.step
    loader = make_loader(cfg, ctx, validation.excluded)
    runner = make_runner(parts.trainee, cfg, ctx)
    ctx.say(describe(cfg, ctx, parts.model, validation.data))
    loop = StepLoop(cfg, ctx, parts, validation, loader, runner, on_log)
    loop.run(started)
    seconds = time.perf_counter() - started
    return TrainResult(ctx.model_dir, parts.step - first_step, parts.step, loop.last_loss, parts.best_eer, seconds,
                       loop.wait_total / max(seconds, 1e-9), loop.saved, loader.stats.to_dict(), is_main=ctx.ddp.main,
                       skipped_steps=loop.skipped, counters=loop.counters(), best_min_dcf=parts.best_min_dcf,
                       best_step=parts.best_step,
                       validation_note=validation_note(validation.data, parts.best_eer, parts.best_min_dcf))
