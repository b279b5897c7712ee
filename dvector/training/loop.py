"""Train a d-vector with GE2E: one device or many (torchrun -> DDP), checkpoints that resume exactly.

Rank 0 alone logs, validates and saves; every rank draws its own slice of the data stream and
takes the same number of steps, so uneven data can never hang DDP.
"""

from __future__ import annotations

import functools
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dvector.training.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from dvector.config import FeatureConfig, ModelConfig, TrainConfig
from dvector.stream.loader import BatchSettings, GE2ELoader, ShardSource, resolve_shards
from dvector.errors import DvectorError
from dvector.nn.loss import GE2ELoss, apply_paper_gradient_scale
from dvector.nn.model import DVector, count_parameters
from dvector.training.validation import ValidationSet, collect_validation, heldout_speakers, validation_eer


class GE2ETrainee(nn.Module):
    """The network and the loss's w, b as one module, so DDP averages every gradient."""

    def __init__(self, model: DVector, criterion: GE2ELoss):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, mels: torch.Tensor, n_speakers: int, n_utterances: int, amp: bool) -> torch.Tensor:
        context = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
        with context:
            embeds = self.model(mels)  # (N*M, D)
        embeds = embeds.float().view(n_speakers, n_utterances, -1)  # (N, M, D)
        return self.criterion(embeds)


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    grad_norm: float
    w: float
    b: float
    steps_per_s: float
    data_wait: float  # fraction of the time spent waiting for batches
    valid_eer: float | None = None


@dataclass
class TrainResult:
    model_dir: Path
    steps_done: int  # steps taken in this run
    final_step: int
    last_loss: float
    best_eer: float | None
    seconds: float
    data_wait: float
    checkpoints: list[Path] = field(default_factory=list)
    sampling: dict[str, int] = field(default_factory=dict)  # this rank's SamplingStats: read, tiled, dropped...


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def cpu_threads(cfg: TrainConfig, ddp: Distributed) -> int:
    """Torch threads per training process on CPU: ``cfg.threads``, or the cores left over once the
    loader's workers have one each. More threads than cores makes small LSTM steps many times slower."""
    if cfg.threads:
        return cfg.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ddp.world))
    return max(1, cores // max(1, local_world) - cfg.workers)


def choose_device(requested: str | None, ddp: Distributed) -> torch.device:
    kind = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DvectorError("--device cuda was asked for, but torch sees no CUDA GPU")
        torch.cuda.set_device(ddp.local_rank)
        return torch.device("cuda", ddp.local_rank)
    return torch.device(kind)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_loader(loader: GE2ELoader, saved: dict[str, Any] | None, say: Callable[[str], None]) -> None:
    """Put the data stream where the checkpoint left it, or at a fresh pass if batch options changed.

    ``saved`` is the checkpoint's ``"loader"`` entry (world size and every rank's position). The
    fresh pass is the one after the last pass any rank or worker reached, so every rank starts
    the same pass (and, if the world size changed, nobody silently re-reads pass 0).
    """
    if not saved:
        return
    ranks = saved.get("ranks") or []
    if saved.get("world") == loader.world and loader.rank < len(ranks) and loader.load_state_dict(ranks[loader.rank]):
        return
    passes = [int(s["pass"]) for r in ranks if r for s in r.get("states", {}).values()]
    new_pass = max(passes, default=-1) + 1
    fresh = {"settings": loader.settings.shape_key(), "rank": loader.rank, "world": loader.world,
             "workers": loader.workers, "next_worker": 0,
             "states": {str(k): {"round": 1_000_000 * new_pass, "pass": new_pass, "shard": 0, "sample": 0, "drawn": 0}
                        for k in range(max(1, loader.workers))}}
    loader.load_state_dict(fresh)
    say(f"batch options, world size or workers changed since the checkpoint: "
        f"the data stream restarts at a new pass ({new_pass})")


def _out_of_time(started: float, cfg: TrainConfig, ddp: Distributed, dev: torch.device) -> bool:
    """Whether --max-minutes is spent; rank 0's clock decides for every rank."""
    spent = time.perf_counter() - started > 60.0 * cfg.max_minutes
    if ddp.world > 1:
        flag = torch.tensor([int(spent)], device=dev if dev.type == "cuda" else torch.device("cpu"))
        dist.broadcast(flag, src=0)
        spent = bool(flag.item())
    return spent


def _apply_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig, step: int,
                         say: Callable[[str], None]) -> None:
    """On resume, follow this run's --lr and -d: the rate is lr x decay_factor^(step // decay_every).

    Left alone when it already has that value, so an unchanged run continues bit for bit.
    """
    wanted = cfg.learning_rate * cfg.decay_factor ** (step // cfg.decay_every)
    scheduler.base_lrs = [cfg.learning_rate for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.learning_rate
        if not math.isclose(group["lr"], wanted, rel_tol=1e-9):
            say(f"learning rate now {wanted:g} (was {group['lr']:g})")
            group["lr"] = wanted
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _optimizer(cfg: TrainConfig, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum)


def _ends_own_process_group(fn: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """Under torchrun, a process group the call starts is also ended by it (a process that exits
    with a live gloo group aborts with "terminate called without an active exception")."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> TrainResult:
        owns_group = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
        try:
            result = fn(*args, **kwargs)
            if owns_group and dist.is_initialized():
                dist.barrier()  # no rank tears down gloo while a peer still talks to it (aborts seen in CI)
            return result
        finally:
            if owns_group and dist.is_initialized():
                dist.destroy_process_group()

    return wrapper


@_ends_own_process_group
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
) -> TrainResult:
    """Train (or continue training) and return a summary; see the module doc."""
    started = time.perf_counter()
    ddp_probe_kind = (device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    ddp = setup_distributed(ddp_probe_kind)
    dev = choose_device(device, ddp)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg, ddp))
    model_dir = Path(model_dir)
    if not ddp.main:
        say = lambda message: None  # noqa: E731
    if resume is None and checkpoint_dir(model_dir).is_dir() and any(checkpoint_dir(model_dir).glob("*.pt")):
        raise DvectorError(f"{model_dir} already holds a run: continue it with -c {model_dir}, or choose another MODEL_DIR")

    source: ShardSource = resolve_shards(shards, index)
    checkpoint = load_checkpoint(resume) if resume is not None else None
    features = FeatureConfig.from_dict(source.index["config"]["features"]) if source.index else None
    if checkpoint is not None:
        saved_cfg = ModelConfig.from_dict(checkpoint["model_config"])
        if model_cfg is not None and model_cfg.name != saved_cfg.name:
            say(f"note: continuing the checkpoint's {saved_cfg.name!r} model; --model {model_cfg.name} is ignored")
        model_cfg = saved_cfg
    else:
        n_mels = features.n_mels if features else 40
        model_cfg = model_cfg or ModelConfig.preset("attentive", n_mels=n_mels)
        if features and model_cfg.n_mels != features.n_mels:
            model_cfg = replace(model_cfg, n_mels=features.n_mels)
    if checkpoint is not None and features and checkpoint.get("feature_config") not in (None, features.to_dict()):
        say("warning: these shards were made with other feature settings than the checkpoint's")

    # validation speakers: a separate shard set, or a held-out fraction of these speakers
    heldout: list[int] = []
    valid_set: ValidationSet | None = None
    frames = cfg.seg_len[1]
    if valid is not None:
        vsource = resolve_shards(valid)
        if ddp.main:
            valid_set = collect_validation(vsource.urls, vsource.index, None, cfg.valid_utterances, frames, cfg.seed)
    elif source.index is not None:
        heldout = heldout_speakers(source.index, cfg.valid_fraction, cfg.seed)
        if ddp.main:
            valid_set = collect_validation(source.urls, source.index, heldout, cfg.valid_utterances, frames, cfg.seed)
    else:
        say("warning: no index.json beside the shards and no --valid set: training without validation")
    validating = valid is not None or source.index is not None  # the same on every rank

    torch.manual_seed(cfg.seed)
    model = DVector(model_cfg).to(dev)
    criterion = GE2ELoss(cfg.loss, cfg.reduction).to(dev)
    trainee = GE2ETrainee(model, criterion)
    optimizer = _optimizer(cfg, list(trainee.parameters()))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.decay_every, gamma=cfg.decay_factor)
    step = 0
    best_eer: float | None = None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        criterion.load_state_dict(checkpoint["criterion"])
        same_optimizer = checkpoint["train_config"].get("optimizer") == cfg.optimizer
        if same_optimizer:
            optimizer.load_state_dict(checkpoint["optimizer"])
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", cfg.learning_rate)
        scheduler.load_state_dict(checkpoint["scheduler"])
        scheduler.step_size, scheduler.gamma = cfg.decay_every, cfg.decay_factor
        step = int(checkpoint["step"])
        _apply_learning_rate(optimizer, scheduler, cfg, step, say)
        best_eer = checkpoint.get("best_eer")
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if dev.type == "cuda" and "cuda" in checkpoint["rng"]:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], dev)
        say(f"continuing from {resume} at step {step}")
    if step >= cfg.steps:
        say(f"nothing to do: the checkpoint is at step {step} and -i asks for {cfg.steps} steps in all")

    settings = BatchSettings(n_speakers=cfg.n_speakers, n_utterances=cfg.n_utterances, seg_len=tuple(cfg.seg_len),
                             pool_size=cfg.pool_size, short_policy=cfg.short_policy, seed=cfg.seed,
                             exclude_speakers=tuple(heldout))
    loader = GE2ELoader(source, settings, workers=cfg.workers, rank=ddp.rank, world=ddp.world,
                        pin_memory=dev.type == "cuda")
    if checkpoint is not None:
        _restore_loader(loader, checkpoint.get("loader"), say)

    amp = cfg.amp and dev.type == "cuda"
    runner: nn.Module = trainee
    if ddp.world > 1:
        runner = nn.parallel.DistributedDataParallel(trainee, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile and dev.type == "cuda":
        runner = torch.compile(runner)
    say(f"model {model_cfg.name}: {count_parameters(model):,} parameters; device {dev}"
        + (f" x {ddp.world} processes" if ddp.world > 1 else "")
        + f"; batches of {cfg.n_speakers} speakers x {cfg.n_utterances} utterances x {cfg.seg_len[0]}"
        + (f"-{cfg.seg_len[1]}" if cfg.seg_len[1] != cfg.seg_len[0] else "") + " frames"
        + (f"; validating on {valid_set.n_speakers} held-out speakers" if valid_set is not None else ""))

    writer = None
    if ddp.main:
        from torch.utils.tensorboard import SummaryWriter
        model_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(model_dir / "logs"), purge_step=step + 1 if step else None)

    first_step = step
    saved: list[Path] = []
    last_loss = math.nan
    wait_total = 0.0
    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
    params = list(trainee.parameters())
    batches = None
    try:
        batches = iter(loader)
        while step < cfg.steps:
            t0 = time.perf_counter()
            mels, _speakers = next(batches)
            mels = mels.to(dev, non_blocking=True)
            t1 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = runner(mels, cfg.n_speakers, cfg.n_utterances, amp)
            loss.backward()
            if cfg.paper_grad_scale:
                apply_paper_gradient_scale(model, criterion)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # a tensor: no GPU sync per step
            optimizer.step()
            scheduler.step()
            criterion.project_()
            step += 1
            window_wait += t1 - t0
            wait_total += t1 - t0
            window_steps += 1
            out_of_time = cfg.max_minutes > 0 and step % cfg.log_every == 0 and _out_of_time(started, cfg, ddp, dev)
            final = step == cfg.steps or out_of_time
            log_now = step % cfg.log_every == 0 or final
            # every rank decides alike (only rank 0 holds valid_set; all join the broadcast below)
            valid_now = validating and (step % cfg.valid_every == 0 or final)
            save_now = step % cfg.save_every == 0 or final
            if log_now or valid_now or save_now:
                last_loss = float(loss.detach())
            speed = wait = math.nan
            if log_now:
                elapsed = time.perf_counter() - window_start
                speed, wait = window_steps / elapsed, window_wait / elapsed
                window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
            eer_now = None
            if valid_now:
                if ddp.main:
                    eer_now = validation_eer(model, valid_set, dev)
                if ddp.world > 1:  # every rank must know whether to save (they all join the gather)
                    shared = [eer_now]
                    dist.broadcast_object_list(shared, src=0)
                    eer_now = shared[0]
            improved = eer_now is not None and (best_eer is None or eer_now < best_eer)
            save_now = save_now or improved
            if ddp.main and (log_now or eer_now is not None):
                entry = StepLog(step, last_loss, scheduler.get_last_lr()[0], float(grad_norm), criterion.w.item(),
                                criterion.b.item(), speed, wait, eer_now)
                if writer is not None:
                    _write_scalars(writer, entry)
                if on_log:
                    on_log(entry)
            if save_now:
                loader_states = [loader.state_dict()]
                if ddp.world > 1:
                    loader_states = [None] * ddp.world
                    dist.all_gather_object(loader_states, loader.state_dict())
                if improved:
                    best_eer = eer_now
                if ddp.main:
                    state = {
                        "step": step, "model": model.state_dict(), "criterion": criterion.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "model_config": model_cfg.to_dict(), "train_config": _plain(cfg.to_dict()),
                        "feature_config": features.to_dict() if features else None,
                        "vad_config": source.index["config"].get("vad") if source.index else None,
                        "rng": _rng_state(dev), "loader": {"world": ddp.world, "ranks": loader_states},
                        "best_eer": best_eer, "heldout_speakers": heldout, "loss": last_loss,
                    }
                    saved.append(save_checkpoint(state, model_dir, cfg.keep_checkpoints, best=improved))
            if out_of_time:
                say(f"stopping at step {step}: --max-minutes {cfg.max_minutes:g} reached (continue with -c)")
                break
    finally:
        if batches is not None:
            batches.close()  # stop the loader's workers now, not at interpreter exit
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - started
    return TrainResult(model_dir, step - first_step, step, last_loss, best_eer, seconds,
                       wait_total / max(seconds, 1e-9), saved, loader.stats.to_dict())


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _write_scalars(writer: Any, entry: StepLog) -> None:
    for name in ("loss", "lr", "grad_norm", "w", "b", "steps_per_s", "data_wait", "valid_eer"):
        value = getattr(entry, name)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            writer.add_scalar(f"train/{name}" if name != "valid_eer" else "valid/eer", value, entry.step)
