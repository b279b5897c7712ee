"""The step loop of :func:`dvector.training.loop.train`: each step, then its log entry, validation
and checkpoint, decided alike on every rank.

A step whose loss or gradient norm is NaN or Inf changes no weights (it is skipped and counted);
:data:`MAX_NONFINITE_IN_A_ROW` of them in a row stop training with an error. What was skipped
(steps here, samples and shards by the loader) is counted in the checkpoint (``"counters"``) and in
TensorBoard. Whether to stop early (a signal, ``--max-minutes``, a dead loader worker) is checked after
every step: :mod:`dvector.training.stopping`.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dvector.config import TrainConfig
from dvector.errors import DvectorError, Stopped
from dvector.nn.loss import apply_paper_gradient_scale
from dvector.stream.loader import GE2ELoader
from dvector.training.checkpoint import check_finite, save_checkpoint
from dvector.training.distributed import main_value, sum_over_ranks
from dvector.training.prepare import Parts, RunContext, ValidationSpeakers
from dvector.training.stopping import StopReason, StopSignals, stop_reason, worker_death
from dvector.training.validation import ValidationScores, improves, validation_scores


@dataclass
class StepLog:
    """What rank 0 logs at a step (every ``log_every`` steps, and when it validates)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    w: float  # the loss's scale w (NaN for a loss without one)
    b: float  # the loss's bias b (NaN for a loss without one)
    steps_per_s: float
    data_wait: float  # fraction of the time spent waiting for batches
    valid_eer: float | None = None
    skipped_steps: int = 0  # steps skipped so far for a non-finite loss or gradient norm (continued runs included)
    valid_min_dcf: float | None = None  # the validation minDCF (p_target 0.01), when it validates
    margin: float | None = None  # aamsoftmax: the margin in use (it warms up)


MAX_NONFINITE_IN_A_ROW = 10  # steps in a row with a NaN/Inf loss or gradient norm that stop training
MAX_SKIPS_SAID = 5  # skipped steps said one by one; the rest are only counted


def run_counters(before: dict[str, Any], skipped_steps: int, sampling: dict[str, int],
                 in_a_row: int = 0, validation: dict[str, int] | None = None) -> dict[str, Any]:
    """A checkpoint's ``"counters"``: the totals ``before`` (a checkpoint's, when continuing) plus this
    call's skipped steps and the loader's sampling counters (read, tiled, dropped, bad samples...);
    ``skipped_in_a_row``: the skipped steps that end the run so far (a continued run counts on);
    ``validation``: the damage met reading the validation set (read anew by each call: replaced, not added)."""
    earlier = before.get("sampling") or {}
    return {"skipped_steps": int(before.get("skipped_steps", 0)) + skipped_steps, "skipped_in_a_row": in_a_row,
            "sampling": {k: int(earlier.get(k, 0)) + int(sampling.get(k, 0)) for k in sorted({*earlier, *sampling})},
            "validation": dict(validation if validation is not None else before.get("validation") or {})}


# ---- checkpoints and logs ------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch (and, on CUDA, the device's) RNG state."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def plain_config(d: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists: plain values that ``torch.load(weights_only=True)`` reads."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def best_valid(parts: Parts) -> dict[str, Any] | None:
    """A checkpoint's ``"best_valid"``: the step and validation measures (eer, min_dcf) of the best so far."""
    if parts.best_eer is None:
        return None
    return {"step": parts.best_step, "eer": parts.best_eer, "min_dcf": parts.best_min_dcf}


def checkpoint_state(cfg: TrainConfig, ctx: RunContext, parts: Parts, loader_entry: dict[str, Any],
                      heldout: list[int], loss: float, counters: dict[str, Any],
                      valid: ValidationScores | None = None) -> dict[str, Any]:
    """Everything a checkpoint holds (plain values and tensors), in the order it is saved; ``valid``:
    this step's validation measures, when it validated."""
    return {
        "step": parts.step, "model": parts.model.state_dict(), "criterion": parts.criterion.state_dict(),
        "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
        "model_config": ctx.model_cfg.to_dict(), "train_config": plain_config(cfg.to_dict()),
        "feature_config": ctx.features.to_dict() if ctx.features else None,
        "vad_config": ctx.vad, "init": ctx.init,
        "rng": rng_state(ctx.dev), "loader": loader_entry,
        "best_eer": parts.best_eer, "best_valid": best_valid(parts),
        "valid": valid.to_dict() if valid is not None else None, "heldout_speakers": heldout, "loss": loss,
        "counters": counters, "shards": recorded_urls(ctx.source.urls),
    }


def recorded_urls(urls: Sequence[str]) -> list[str]:
    """The training shards as a checkpoint records them (local paths made absolute): the default
    score-normalisation cohort of ``dvector eval --norm``."""
    return [u if "://" in u or u.startswith("pipe:") else os.path.abspath(u) for u in urls]


def open_writer(ctx: RunContext, step: int) -> Any:
    """Rank 0's TensorBoard writer in MODEL_DIR/logs (dropping events after ``step`` when continuing)."""
    if not ctx.ddp.main:
        return None
    from torch.utils.tensorboard import SummaryWriter
    ctx.model_dir.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(str(ctx.model_dir / "logs"), purge_step=step + 1 if step else None)


def write_scalars(writer: Any, entry: StepLog, sampling: dict[str, int] | None = None) -> None:
    """One log entry as TensorBoard scalars (those that have a value), and the sampling counters as ``data/*``."""
    valid = {"valid_eer": "valid/eer", "valid_min_dcf": "valid/min_dcf"}
    for name in ("loss", "lr", "grad_norm", "w", "b", "steps_per_s", "data_wait", "valid_eer", "valid_min_dcf",
                 "skipped_steps", "margin"):
        value = getattr(entry, name)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            writer.add_scalar(valid.get(name, f"train/{name}"), value, entry.step)
    for name, count in (sampling or {}).items():
        writer.add_scalar(f"data/{name}", count, entry.step)


def freeze(model: nn.Module) -> None:
    """Keep this step from moving the encoder (``--freeze-steps``): its gradients are dropped after the
    backward pass (and so after DDP's all-reduce), so clipping measures the loss's weights alone and the
    optimizer skips the encoder's parameters: no update, no momentum or Adam moments, no weight decay."""
    for p in model.parameters():
        p.grad = None


# ---- the step loop -------------------------------------------------------------------------------

@dataclass
class Window:
    """Steps taken and time spent waiting for batches since the last log entry."""

    start: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    steps: int = 0

    def rates(self) -> tuple[float, float]:
        """(steps per second, fraction of the time spent waiting) since the last call; starts anew."""
        elapsed = time.perf_counter() - self.start
        speed, wait = self.steps / elapsed, self.wait / elapsed
        self.start, self.wait, self.steps = time.perf_counter(), 0.0, 0
        return speed, wait


class StepLoop:
    """The steps of one :func:`train` call: each step, then its log entry, validation and checkpoint."""

    def __init__(self, cfg: TrainConfig, ctx: RunContext, parts: Parts, validation: ValidationSpeakers,
                 loader: GE2ELoader, runner: nn.Module, on_log: Callable[[StepLog], None] | None):
        self.cfg, self.ctx, self.parts, self.validation = cfg, ctx, parts, validation
        self.loader, self.runner, self.on_log = loader, runner, on_log
        self.amp = cfg.amp and ctx.dev.type == "cuda"
        self.params = list(parts.trainee.parameters())
        self.saved: list[Path] = []
        self.last_loss = math.nan
        self.wait_total = 0.0
        self.writer: Any = None
        self.skipped = 0  # steps skipped by this call (non-finite loss or gradient norm)
        self.bad_in_a_row = int(parts.counters.get("skipped_in_a_row", 0))
        self.signals = StopSignals()
        self.stopped: StopReason | None = None  # why the loop stopped before cfg.steps, if it did
        self.in_step = False  # True while a step is changing the weights and the optimizer
        self.first_step = parts.step

    def counters(self) -> dict[str, Any]:
        """This process's totals so far (a checkpoint's sum the loader's counters over every rank)."""
        return run_counters(self.parts.counters, self.skipped, self.loader.stats.to_dict(), self.bad_in_a_row,
                            self._validation_damage())

    def _validation_damage(self) -> dict[str, int] | None:
        """What reading the validation set skipped (rank 0 holds it; None elsewhere)."""
        data = self.validation.data
        return dict(data.skipped) if data is not None else None

    def run(self, started: float) -> None:
        """Step until ``cfg.steps``, or stop early with a checkpoint: at ``--max-minutes`` (counted from
        ``started``), or on SIGTERM/SIGINT (then :class:`Stopped`); a loader worker that dies ends the run
        with one line, after a checkpoint when the step state allows (see :mod:`dvector.training.stopping`)."""
        self.writer = open_writer(self.ctx, self.parts.step)
        window = Window()
        batches = None
        try:
            with self.signals:
                batches = iter(self.loader)
                while self.parts.step < self.cfg.steps:
                    loss, grad_norm = self._step(batches, window)
                    if not self._after_step(loss, grad_norm, window, started):
                        break
        except RuntimeError as exc:
            death = worker_death(exc)
            if death is None:
                raise
            self._after_worker_death(death)
        finally:
            if batches is not None:
                batches.close()  # stop the loader's workers now, not at interpreter exit
            if self.writer is not None:
                self.writer.close()
        if self.stopped is not None and self.stopped.signum:
            kept = (f"saved {self.saved[-1]} as the run's latest checkpoint" if self.ctx.ddp.main and self.saved
                    else "rank 0 saved a checkpoint")
            raise Stopped(f"{self.stopped.signal_name} at step {self.parts.step}: {kept}; continue with the same "
                          f"command and -c {self.ctx.model_dir}", self.stopped.signum)

    def _after_worker_death(self, death: str) -> None:
        """A loader worker died (killed, out of memory): save the step reached when no step was half done
        (a single process: under torchrun the other ranks cannot join the save), then one line."""
        kept = ""
        if not self.in_step and self.ctx.ddp.world == 1 and self.parts.step > self.first_step:
            self._save(None, False)
            kept = (f"; saved {self.saved[-1]} at step {self.parts.step}, continue with the same command and "
                    f"-c {self.ctx.model_dir}")
        elif self.saved:
            kept = f"; the last checkpoint is {self.saved[-1]}"
        raise DvectorError(f"training stopped at step {self.parts.step}: {death} (lower -w or the batch size if "
                           f"memory ran out){kept}")

    def _step(self, batches: Any, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the next batch, or none when its loss or gradient norm is not finite
        (the step still counts, and the learning rate follows it); returns (loss, grad norm) as tensors."""
        cfg, parts = self.cfg, self.parts
        t0 = time.perf_counter()
        mels, speakers = next(batches)
        if mels.shape[-1] != self.ctx.model_cfg.n_mels:
            raise DvectorError(f"the batches hold {mels.shape[-1]} mel bands per frame, but the network reads "
                               f"{self.ctx.model_cfg.n_mels}: these shards were built with other features")
        mels = mels.to(self.ctx.dev, non_blocking=True)  # (N*M, L, n_mels)
        speakers = speakers.to(self.ctx.dev, non_blocking=True)  # (N*M,)
        t1 = time.perf_counter()
        self.in_step = True  # from here until the step is counted, weights and optimizer may be half updated
        parts.optimizer.zero_grad(set_to_none=True)
        parts.criterion.begin_step(parts.step)
        loss = self.runner(mels, speakers, cfg.n_speakers, cfg.n_utterances, self.amp)
        loss.backward()
        if parts.step < cfg.freeze_steps:
            freeze(parts.model)
        if cfg.paper_grad_scale:
            apply_paper_gradient_scale(parts.model, parts.criterion)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        if self._finite(loss, grad_norm):
            parts.optimizer.step()
            parts.scheduler.step()
            parts.criterion.project_()
            self.bad_in_a_row = 0
        else:
            self._skip()
        parts.step += 1
        self.in_step = False
        window.wait += t1 - t0
        self.wait_total += t1 - t0
        window.steps += 1
        if self.bad_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise DvectorError(f"training stopped at step {parts.step}: {self.bad_in_a_row} steps in a row had a NaN "
                               "or Inf loss or gradient norm (none changed the weights; the checkpoints saved so far "
                               "are kept): check the shards with `dvector check`, or lower --lr")
        return loss, grad_norm

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether the step may change the weights: a finite gradient norm (the same on every rank, the
        gradients being averaged) and, in a single process, a finite loss. One GPU sync per step."""
        finite = torch.isfinite(grad_norm)
        if self.ctx.ddp.world == 1:
            finite = finite & torch.isfinite(loss.detach())
        return bool(finite)

    def _skip(self) -> None:
        """Count a step without an optimizer step; the scheduler still steps, so the rate follows the step."""
        self.skipped += 1
        self.bad_in_a_row += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
            self.parts.scheduler.step()
        if self.skipped <= MAX_SKIPS_SAID:
            more = "; further ones are only counted" if self.skipped == MAX_SKIPS_SAID else ""
            self.ctx.say(f"warning: step {self.parts.step + 1}: NaN or Inf in the loss or gradient norm: "
                         f"skipped, the weights are unchanged{more}")

    def _after_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, window: Window, started: float) -> bool:
        """Log, validate and save as the step calls for; False when ``--max-minutes`` says stop.

        Every rank decides alike (only rank 0 holds the validation set; all join the broadcasts).
        """
        cfg, ctx, step = self.cfg, self.ctx, self.parts.step
        self.stopped = stop_reason(self.signals, started, cfg.max_minutes, ctx.ddp, ctx.dev)
        stop = self.stopped is not None
        final = step == cfg.steps or stop
        log_now = step % cfg.log_every == 0 or final
        valid_now = self.validation.active and (step % cfg.valid_every == 0 or final)
        save_now = step % cfg.save_every == 0 or final
        if log_now or valid_now or save_now:
            self.last_loss = float(loss.detach())
        speed, wait = window.rates() if log_now else (math.nan, math.nan)
        scores = self._validate() if valid_now else None
        improved = scores is not None and improves(scores, self.parts.best_eer, self.parts.best_min_dcf)
        if ctx.ddp.main and (log_now or scores is not None):
            counters = self.counters()
            scalars = self.parts.criterion.scalars()
            self._log(StepLog(step, self.last_loss, self.parts.scheduler.get_last_lr()[0], float(grad_norm),
                              scalars.get("w", math.nan), scalars.get("b", math.nan), speed, wait,
                              scores.eer if scores else None, counters["skipped_steps"],
                              scores.min_dcf if scores else None, scalars.get("margin")),
                      {**counters["sampling"], **{f"valid_{k}": v for k, v in counters["validation"].items()}})
        if save_now or improved:
            self._save(scores, improved)
        if stop and self.stopped is not None and not self.stopped.signum:
            ctx.say(f"stopping at step {step}: --max-minutes {cfg.max_minutes:g} reached (continue with the same "
                    f"command and -c {ctx.model_dir})")
        return not stop

    def _validate(self) -> ValidationScores | None:
        """The validation EER and minDCF, computed by rank 0 and shared with every rank (they all decide
        whether to save)."""
        data = self.validation.data
        scores = None
        if self.ctx.ddp.main and data is not None:
            scores = validation_scores(self.parts.model, data, self.ctx.dev)
        return main_value(scores, self.ctx.ddp)

    def _log(self, entry: StepLog, sampling: dict[str, int]) -> None:
        """Hand a log entry (and the sampling counters) to TensorBoard, the entry to ``on_log`` (rank 0)."""
        if self.writer is not None:
            write_scalars(self.writer, entry, sampling)
        if self.on_log:
            self.on_log(entry)

    def _save(self, scores: ValidationScores | None, new_best: bool) -> None:
        """Save a checkpoint (rank 0 writes it; every rank gives its loader position). ``scores``: this
        step's validation measures, if it validated; ``new_best``: they make this the best checkpoint
        so far. Weights holding NaN or Inf (the same on every rank) stop training with an error instead."""
        check_finite({"step": self.parts.step, "model": self.parts.model.state_dict(),
                      "criterion": self.parts.criterion.state_dict()})
        loader_entry = self.loader.checkpoint_entry()
        sampling = sum_over_ranks(self.loader.stats.to_dict(), self.ctx.ddp)
        if new_best and scores is not None:
            self.parts.best_eer, self.parts.best_min_dcf = scores.eer, scores.min_dcf
            self.parts.best_step = self.parts.step
        if self.ctx.ddp.main:
            counters = run_counters(self.parts.counters, self.skipped, sampling, self.bad_in_a_row,
                                    self._validation_damage())
            state = checkpoint_state(self.cfg, self.ctx, self.parts, loader_entry, self.validation.heldout,
                                      self.last_loss, counters, scores)
            self.saved.append(save_checkpoint(state, self.ctx.model_dir, self.cfg.keep_checkpoints, best=new_best))
