"""Everything :func:`dvector.training.loop.train` sets up before its first step.

The shards, the checkpoint and the model config (:func:`setup_run`); the validation speakers (:func:`validation_speakers`); the model, loss,
optimizer and scheduler (:func:`build_parts`, restored by :func:`restore_parts`); this rank's batch
stream (:func:`make_loader`) and what a step calls (:func:`make_runner`).
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import torch
from torch import nn

from dvector.augment import AugmentPlan
from dvector.config import FeatureConfig, ModelConfig, TrainConfig
from dvector.errors import DvectorError
from dvector.nn.criteria import make_criterion
from dvector.nn.encoders import build_encoder
from dvector.nn.model import count_parameters
from dvector.stream.batches import BatchSettings
from dvector.stream.loader import GE2ELoader
from dvector.stream import ShardSource, resolve_shards
from dvector.training.checkpoint import checkpoint_dir, load_resume_checkpoint
from dvector.training.continued import continued_config, continued_notes
from dvector.training.distributed import Distributed
from dvector.training.transfer import InitSource, load_init, settle_network
from dvector.training.validation import ValidationSet, collect_validation, heldout_speakers, perturbed_copies


class Trainee(nn.Module):
    """The network and the loss's parameters (GE2E's w, b; a classifier) as one module, so DDP averages
    every gradient and all ranks keep one set of weights."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, mels: torch.Tensor, speakers: torch.Tensor, n_speakers: int, n_utterances: int,
                amp: bool) -> torch.Tensor:
        """The loss of a batch of ``mels`` (N*M, L, n_mels), rows speaker-major; ``speakers`` (N*M,): each
        row's global speaker index (what a classifier's loss needs)."""
        context = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
        with context:
            embeds = self.model(mels)  # (N*M, D)
        embeds = embeds.float().view(n_speakers, n_utterances, -1)  # (N, M, D)
        return self.criterion(embeds, speakers)


# ---- the run ------------------------------------------------------------------------------------

def _silent(message: str) -> None:
    """``say`` on ranks other than 0."""


@dataclass
class RunContext:
    """Where and with what this process trains, resolved once by :func:`setup_run`."""

    ddp: Distributed
    dev: torch.device
    model_dir: Path
    source: ShardSource
    checkpoint: dict[str, Any] | None
    features: FeatureConfig | None  # the shards' feature settings (else the continued or init run's)
    model_cfg: ModelConfig
    say: Callable[[str], None]  # silent on ranks other than 0
    cfg: TrainConfig  # the training settings, a continued run's loss settings settled
    resume_path: Path | None = None  # the checkpoint file continued from (latest.pt, or the one used instead)
    vad: dict[str, Any] | None = None  # the shards' VAD settings (else the continued or init run's)
    init: dict[str, Any] | None = None  # where the run started (--init): path, sha256, step; carried by -c
    init_source: InitSource | None = None  # the encoder to start from: a fresh --init run only


def setup_run(shards: str | Sequence[str], model_dir: str | os.PathLike[str], cfg: TrainConfig,
              model_cfg: ModelConfig | None, resume: str | os.PathLike[str] | None, ddp: Distributed,
              dev: torch.device, index: str | None, say: Callable[[str], None],
              init: str | os.PathLike[str] | None = None, given: Collection[str] | None = None) -> RunContext:
    """For this process (``ddp``, ``dev``: :func:`dvector.training.distributed.setup_process`), find the
    shards, load the checkpoint (the newest readable one when ``latest.pt`` is damaged) or the ``init``
    run's encoder, and settle the model config (and, continuing, the loss settings: ``given`` names the
    ``cfg`` fields set on purpose, see :func:`continued_config`; the settled config is ``ctx.cfg``);
    refuses to train afresh into a folder that holds a run."""
    model_dir = Path(model_dir)
    if not ddp.main:
        say = _silent
    if resume is None and checkpoint_dir(model_dir).is_dir() and any(checkpoint_dir(model_dir).glob("*.pt")):
        raise DvectorError(f"{model_dir} already holds a run: continue it with -c {model_dir}, or choose another MODEL_DIR")
    if resume is None and init is None and cfg.freeze_steps:
        raise DvectorError(f"--freeze-steps {cfg.freeze_steps} needs --init: it keeps a pretrained encoder fixed while "
                           "the new loss's weights warm up")
    source = resolve_shards(shards, index)
    checkpoint, resume_path = load_resume_checkpoint(resume, say) if resume is not None else (None, None)
    if checkpoint is not None:
        cfg = continued_config(cfg, checkpoint, given, resume, say)
        continued_notes(checkpoint, cfg, init, say)
    init_source = load_init(init, model_cfg, say) if init is not None and checkpoint is None else None
    net = settle_network(model_cfg, source.index, checkpoint, resume_path, init_source, say)
    return RunContext(ddp, dev, model_dir, source, checkpoint, net.features, net.model_cfg, say, cfg, resume_path,
                      net.vad, net.init, init_source)


@dataclass
class ValidationSpeakers:
    """The validation speakers of a run."""

    heldout: list[int]  # speakers of the training shards held out of training (none with --valid)
    data: ValidationSet | None  # their utterances; rank 0 only
    active: bool  # whether the run validates: the same on every rank
    copies: list[int] = field(default_factory=list)  # speed-perturbed copies of ``heldout``: not trained, not validated

    @property
    def excluded(self) -> list[int]:
        """The speakers kept out of training: the held-out ones and their speed-perturbed copies."""
        return sorted({*self.heldout, *self.copies})


def validation_speakers(cfg: TrainConfig, ctx: RunContext, valid: str | None) -> ValidationSpeakers:
    """Validation speakers: a separate shard set (``valid``), or a held-out fraction of the training
    speakers when the shards have an index, else none (with a warning)."""
    heldout: list[int] = []
    copies: list[int] = []
    data: ValidationSet | None = None
    frames = cfg.seg_len[1]
    if valid is not None:
        vsource = resolve_shards(valid)
        if ctx.ddp.main:
            data = collect_validation(vsource.urls, vsource.index, None, cfg.valid_utterances, frames, cfg.seed)
    elif ctx.source.index is not None:
        heldout = heldout_speakers(ctx.source.index, cfg.valid_fraction, cfg.seed)
        copies = perturbed_copies(ctx.source.index, heldout)
        if ctx.ddp.main:
            data = collect_validation(ctx.source.urls, ctx.source.index, heldout, cfg.valid_utterances, frames, cfg.seed)
    else:
        ctx.say("warning: no index.json beside the shards and no --valid set: training without validation")
    for line in data.root_notes() if data is not None else ():
        ctx.say(line)
    return ValidationSpeakers(heldout, data, valid is not None or ctx.source.index is not None, copies)


# ---- model, loss, optimizer ----------------------------------------------------------------------

@dataclass
class Parts:
    """What training changes, and where it stands."""

    model: nn.Module  # an encoder of dvector.nn.encoders
    criterion: nn.Module  # a loss of dvector.nn.criteria
    trainee: Trainee
    optimizer: torch.optim.Optimizer
    scheduler: Any  # StepLR
    step: int = 0
    best_eer: float | None = None
    best_min_dcf: float | None = None  # the validation minDCF of the best checkpoint (None: not known)
    best_step: int | None = None  # the step of the best checkpoint (None: not known)
    counters: dict[str, Any] = field(default_factory=dict)  # a checkpoint's "counters": totals of the runs before


def make_optimizer(cfg: TrainConfig, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam or SGD (with momentum) at the configured learning rate."""
    if cfg.optimizer_kind == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_parts(cfg: TrainConfig, ctx: RunContext) -> Parts:
    """A fresh model (seeded with ``cfg.seed``), loss, optimizer and step-decay scheduler on the device.
    A classifier's loss gets one class per speaker of the shards' index (held-out speakers included)."""
    torch.manual_seed(cfg.seed)
    model = build_encoder(ctx.model_cfg).to(ctx.dev)
    n_classes = len(ctx.source.index["speakers"]) if ctx.source.index else None
    criterion = make_criterion(cfg, n_classes, ctx.model_cfg.embed_dim).to(ctx.dev)
    trainee = Trainee(model, criterion)
    optimizer = make_optimizer(cfg, list(trainee.parameters()))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.decay_every, gamma=cfg.decay_factor)
    return Parts(model, criterion, trainee, optimizer, scheduler)


def apply_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig, step: int,
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


def restore_parts(parts: Parts, checkpoint: dict[str, Any], cfg: TrainConfig, dev: torch.device,
             say: Callable[[str], None]) -> None:
    """Load weights, optimizer (when it is the same kind), scheduler, step, best EER (and minDCF), counters and
    the RNG state from a checkpoint, then apply this run's learning-rate settings."""
    parts.model.load_state_dict(checkpoint["model"])
    try:
        parts.criterion.load_state_dict(checkpoint["criterion"])
    except RuntimeError:  # a classifier's shape: one class per speaker of the shards' index
        shapes = {k: tuple(v.shape) for k, v in checkpoint["criterion"].items() if hasattr(v, "shape")}
        raise DvectorError(f"the loss's saved weights {shapes} do not fit these shards (a classifier has one class per "
                           "speaker of the index): continue on the shards the run was trained on, or start a new "
                           "run from its encoder with --init") from None
    if TrainConfig.from_dict(checkpoint["train_config"]).optimizer_kind == cfg.optimizer_kind:
        parts.optimizer.load_state_dict(checkpoint["optimizer"])
        for group in parts.optimizer.param_groups:
            group.setdefault("initial_lr", cfg.learning_rate)
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    parts.scheduler.step_size, parts.scheduler.gamma = cfg.decay_every, cfg.decay_factor
    parts.step = int(checkpoint["step"])
    apply_learning_rate(parts.optimizer, parts.scheduler, cfg, parts.step, say)
    parts.best_eer = checkpoint.get("best_eer")
    best = checkpoint.get("best_valid") or {}
    parts.best_min_dcf, parts.best_step = best.get("min_dcf"), best.get("step")
    parts.counters = dict(checkpoint.get("counters") or {})
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if dev.type == "cuda" and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], dev)


def make_runner(trainee: Trainee, cfg: TrainConfig, ctx: RunContext) -> nn.Module:
    """What a step calls: the trainee, wrapped in DDP with several processes, compiled if asked (CUDA)."""
    runner: nn.Module = trainee
    if ctx.ddp.world > 1:
        runner = nn.parallel.DistributedDataParallel(trainee, device_ids=[ctx.dev.index] if ctx.dev.type == "cuda" else None)
    if cfg.compile and ctx.dev.type == "cuda":
        runner = torch.compile(runner)
    return runner


# ---- data ----------------------------------------------------------------------------------------

def make_loader(cfg: TrainConfig, ctx: RunContext, heldout: Sequence[int]) -> GE2ELoader:
    """This rank's batch stream without the held-out speakers, where the checkpoint left it."""
    settings = BatchSettings(n_speakers=cfg.n_speakers, n_utterances=cfg.n_utterances, seg_len=tuple(cfg.seg_len),
                             pool_size=cfg.pool_size, short_policy=cfg.short_policy, seed=cfg.seed,
                             exclude_speakers=tuple(heldout), augment=augment_plan(cfg, ctx))
    loader = GE2ELoader(ctx.source, settings, workers=cfg.workers, rank=ctx.ddp.rank, world=ctx.ddp.world,
                        pin_memory=ctx.dev.type == "cuda")
    if ctx.checkpoint is not None:
        message = loader.restore(ctx.checkpoint.get("loader"))
        if message:
            ctx.say(message)
    return loader


def augment_plan(cfg: TrainConfig, ctx: RunContext) -> AugmentPlan | None:
    """What the loader workers need to augment (None: augmentation off); the user's noise and room
    recordings are turned into mel-domain sources once, cached in the run folder."""
    features = ctx.features or FeatureConfig(n_mels=ctx.model_cfg.n_mels)
    return AugmentPlan.prepare(cfg.augment, features, cfg.seed, ctx.model_dir / "augment", ctx.say,
                               ctx.ddp.first_on_rank0)


def describe(cfg: TrainConfig, ctx: RunContext, model: nn.Module, valid_set: ValidationSet | None) -> str:
    """The one-line summary said before the first step."""
    valid = ""
    if valid_set is not None:
        roots = len(valid_set.speakers_per_root())
        valid = (f"; validating on {valid_set.n_speakers} held-out speakers"
                 + (f" of {roots} roots (trials within a root)" if roots > 1 else ""))
    return (f"model {ctx.model_cfg.name}: {count_parameters(model):,} parameters; loss {cfg.loss}; device {ctx.dev}"
            + (f" x {ctx.ddp.world} processes" if ctx.ddp.world > 1 else "")
            + f"; batches of {cfg.n_speakers} speakers x {cfg.n_utterances} utterances x {cfg.seg_len[0]}"
            + (f"-{cfg.seg_len[1]}" if cfg.seg_len[1] != cfg.seg_len[0] else "") + " frames"
            + valid + "; augmentation: " + (", ".join(cfg.augment.kinds) or "none"))
