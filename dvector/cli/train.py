"""The train command: options -> TrainConfig -> ``dvector.training.loop.train``, a progress bar, a summary."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dvector.cli.console import console, progress, say
from dvector.cli.options import Seed, default, given_options, range_text, threads_option
from dvector.config import AUGMENT_KINDS, AugmentConfig, TrainConfig

train_default = partial(default, TrainConfig)
augment_default = partial(default, AugmentConfig)


def _span(name: str) -> str:
    """A (lo, hi) augmentation default as typed (``0:15``)."""
    lo, hi = augment_default(name)
    return f"{lo:g}:{hi:g}"


Shards = Annotated[str, typer.Argument(help="Shard folder (with index.json), brace pattern, or http(s)/pipe: URLs.")]
ModelDir = Annotated[Path, typer.Argument(help="Run folder: checkpoints/, logs/ (TensorBoard).")]
Steps = Annotated[int, typer.Option("-i", "--steps", help="Total steps (a continued run counts from its checkpoint).")]
SaveEvery = Annotated[int, typer.Option("-s", "--save-every", help="Save a checkpoint every this many steps.")]
DecayEvery = Annotated[int, typer.Option("-d", "--decay-every", help="Halve the learning rate every this many steps.")]
NSpeakers = Annotated[int, typer.Option("-n", "--n-speakers", help="N: speakers per batch.")]
NUtterances = Annotated[int, typer.Option("-m", "--n-utterances", help="M: utterances per speaker.")]
SegLen = Annotated[str, typer.Option(
    "-l", "--seg-len", help="L: frames per segment, or a range drawn per batch (140-180).")]
Resume = Annotated[Optional[Path], typer.Option(
    "-c", "--continue", help="Checkpoint (or run folder) to continue from.")]
Init = Annotated[Optional[Path], typer.Option(
    "--init", metavar="RUN_OR_CHECKPOINT", help="Start from another run's encoder: its run folder (its latest "
    "checkpoint, as -c finds it) or a checkpoint file (e.g. RUN/checkpoints/best.pt). Its network and feature "
    "settings come with it (no --model needed; the shards must have its features: build them with `build-shards "
    "... --features RUN`); the loss's weights (GE2E's w and b, a classifier over these shards' speakers), the "
    "optimizer, the schedule and the step count start anew. Checkpoints record it; -c does not load it again.")]
FreezeSteps = Annotated[int, typer.Option(
    "--freeze-steps", metavar="K", help="With --init: train only the loss's own weights for the first K steps "
    "(a new classifier warms up while the pretrained encoder stays exactly as it was), then everything. "
    "Give it again with -c.")]
Valid = Annotated[Optional[str], typer.Option(
    "--valid", help="Validation shards (other speakers); default: hold out ~10% of the speakers.")]
ValidEvery = Annotated[int, typer.Option("--valid-every", help="Validate every this many steps.")]
ModelName = Annotated[Optional[str], typer.Option(
    "--model", help="LSTMs: paper (3x768, 256 proj), attentive (original, 3x256; the default), tiny; "
    "ECAPA-TDNN: ecapa (C=512), ecapa-small (C=256); thin ResNet-34: resnet34 (32-256), resnet34-quarter (16-128); "
    "resemblyzer (Resemblyzer's VoiceEncoder, 3x256, last frame). With --init: the init run's network.")]
Loss = Annotated[str, typer.Option(
    "--loss", help="ge2e (GE2E softmax; also 'softmax'), contrast (GE2E contrast), angleproto (angular "
    "prototypical), aamsoftmax (additive angular margin; one class per speaker of the index), softmaxproto.")]
Reduction = Annotated[str, typer.Option(
    "--reduction", help="GE2E losses: sum (the paper's) or mean (SGD rate scaled by N*M). The others average.")]
Optimizer = Annotated[str, typer.Option(
    "--optimizer", help="sgd, adam, or auto: sgd (the paper's) for ge2e and contrast, adam for the others.")]
Margin = Annotated[float, typer.Option("--margin", help="aamsoftmax: additive angular margin m (radians).")]
Scale = Annotated[float, typer.Option("--scale", help="aamsoftmax: logit scale s.")]
MarginWarmup = Annotated[int, typer.Option(
    "--margin-warmup", help="aamsoftmax: steps over which the margin grows linearly from 0 (0: full at once).")]
Subcentres = Annotated[int, typer.Option("--subcentres", help="aamsoftmax: sub-centres per speaker (1: plain).")]
Gather = Annotated[bool, typer.Option(
    "--gather/--no-gather", help="angleproto, softmaxproto under DDP: compare with every rank's utterances, "
    "so N grows with the number of processes.")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="L2 weight decay of the optimizer.")]
Lr = Annotated[float, typer.Option("--lr", help="Learning rate (0: 0.01 for SGD, 1e-3 for Adam).")]
LoaderWorkers = Annotated[int, typer.Option("-w", "--workers", help="Data loader processes per training process.")]
Device = Annotated[Optional[str], typer.Option("--device", help="cuda or cpu (default: cuda when available).")]
Amp = Annotated[bool, typer.Option("--amp/--no-amp", help="bf16 mixed precision on CUDA.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the model (CUDA).")]
Keep = Annotated[int, typer.Option("--keep", help="Numbered checkpoints to keep.")]
LogEvery = Annotated[int, typer.Option("--log-every", help="Log every this many steps.")]
ShortPolicy = Annotated[str, typer.Option("--short-policy", help="Utterances shorter than L: repeat (tile) or drop.")]
TrainThreads = threads_option(
    "Torch threads on CPU (0: every core, shared by the torchrun processes of a machine; 1 where other jobs keep "
    "the cores busy).")
StallTimeout = Annotated[Optional[float], typer.Option(
    "--stall-timeout", help="Seconds a remote read (http(s), pipe:) may wait for data before it counts as stalled "
    "(default: $DVECTOR_STALL_TIMEOUT, else 60).")]
Augment = Annotated[str, typer.Option(
    "--augment", help=f"Online augmentation of the training crops: a comma list of {', '.join(AUGMENT_KINDS)}; "
    "all; none; or default (" + ",".join(augment_default("kinds")) + ", chosen on real speech: see the README).")]
AugmentProb = Annotated[str, typer.Option(
    "--augment-prob", help="Probability per utterance of some kinds, e.g. noise=0.5,reverb=0.3 (defaults: "
    + ",".join(f"{k}={augment_default(k + '_prob'):g}" for k in AUGMENT_KINDS) + ").")]
NoiseSnr = Annotated[str, typer.Option("--noise-snr", help="SNR range of added noise, dB (LO:HI).")]
BabbleSnr = Annotated[str, typer.Option("--babble-snr", help="SNR range of babble (3-7 other speakers), dB.")]
ReverbRt60 = Annotated[str, typer.Option(
    "--reverb-rt60", help="RT60 range of the simulated rooms, seconds (the top mel band decays in 0.6 of it).")]
NoiseDir = Annotated[Optional[Path], typer.Option(
    "--noise-dir", help="Folder of noise recordings (e.g. MUSAN) for 'noise' instead of coloured noise.")]
RirDir = Annotated[Optional[Path], typer.Option(
    "--rir-dir", help="Folder of room impulse responses (e.g. RIRS_NOISES) for 'reverb' instead of simulated rooms.")]
MaxMinutes = Annotated[float, typer.Option(
    "--max-minutes", help="Stop with a checkpoint after this long (e.g. a job's time limit); 0: none.")]


def train_cmd(
    ctx: typer.Context,
    shards: Shards,
    model_dir: ModelDir,
    steps: Steps = train_default("steps"),
    save_every: SaveEvery = train_default("save_every"),
    decay_every: DecayEvery = train_default("decay_every"),
    n_speakers: NSpeakers = train_default("n_speakers"),
    n_utterances: NUtterances = train_default("n_utterances"),
    seg_len: SegLen = range_text(train_default("seg_len")),
    resume: Resume = None,
    init: Init = None,
    freeze_steps: FreezeSteps = train_default("freeze_steps"),
    valid: Valid = None,
    valid_every: ValidEvery = train_default("valid_every"),
    model: ModelName = None,
    loss: Loss = train_default("loss"),
    reduction: Reduction = train_default("reduction"),
    optimizer: Optimizer = train_default("optimizer"),
    lr: Lr = train_default("lr"),
    margin: Margin = train_default("margin"),
    scale: Scale = train_default("scale"),
    margin_warmup: MarginWarmup = train_default("margin_warmup"),
    subcentres: Subcentres = train_default("subcentres"),
    gather: Gather = train_default("gather"),
    weight_decay: WeightDecay = train_default("weight_decay"),
    workers: LoaderWorkers = train_default("workers"),
    seed: Seed = train_default("seed"),
    device: Device = None,
    amp: Amp = train_default("amp"),
    compile: Compile = train_default("compile"),  # noqa: A002 - the option's name
    keep: Keep = train_default("keep_checkpoints"),
    log_every: LogEvery = train_default("log_every"),
    short_policy: ShortPolicy = train_default("short_policy"),
    threads: TrainThreads = train_default("threads"),
    max_minutes: MaxMinutes = train_default("max_minutes"),
    stall_timeout: StallTimeout = None,
    augment: Augment = "default",
    augment_prob: AugmentProb = "",
    noise_snr: NoiseSnr = _span("noise_snr"),
    babble_snr: BabbleSnr = _span("babble_snr"),
    reverb_rt60: ReverbRt60 = _span("reverb_rt60"),
    noise_dir: NoiseDir = None,
    rir_dir: RirDir = None,
) -> None:
    """Train a speaker encoder (the d-vector LSTM, ECAPA-TDNN or a thin ResNet) with GE2E or a margin/prototypical
    loss on streamed, speaker-balanced batches.

    Several GPUs: torchrun --nproc-per-node=8 -m dvector train SHARDS MODEL_DIR

    Fine-tune a trained run on new shards:
    dvector train SHARDS MODEL_DIR --init RUN --loss aamsoftmax --freeze-steps 500
    """
    from dvector.cli.summary import print_train_summary
    from dvector.config import ModelConfig, parse_probabilities, parse_seg_len
    from dvector.shards.streams import set_stall_timeout
    from dvector.training.loop import train

    set_stall_timeout(stall_timeout)
    cfg = TrainConfig(steps=steps, save_every=save_every, decay_every=decay_every, valid_every=valid_every,
                      log_every=log_every, n_speakers=n_speakers, n_utterances=n_utterances,
                      seg_len=parse_seg_len(seg_len), loss=loss, reduction=reduction, optimizer=optimizer, lr=lr,
                      margin=margin, scale=scale, margin_warmup=margin_warmup, subcentres=subcentres, gather=gather,
                      weight_decay=weight_decay,
                      workers=workers, seed=seed, keep_checkpoints=keep, amp=amp, compile=compile,
                      short_policy=short_policy, threads=threads, max_minutes=max_minutes, freeze_steps=freeze_steps,
                      augment=AugmentConfig(kinds=augment, noise_snr=noise_snr, babble_snr=babble_snr,
                                            reverb_rt60=reverb_rt60, noise_dir=str(noise_dir or ""),
                                            rir_dir=str(rir_dir or "")).with_probabilities(
                          parse_probabilities(augment_prob)))
    with progress(every_s=0) as bar:  # without a terminal: a line per --log-every steps
        on_log = _train_bar(bar, steps)
        result = train(shards, model_dir, cfg, ModelConfig.preset(model) if model else None,
                       resume=str(resume) if resume else None, valid=valid, device=device, on_log=on_log,
                       say=partial(say, out=bar.console),  # the library is silent on ranks other than 0
                       init=str(init) if init else None, given=given_options(ctx))
    if result.is_main:
        print_train_summary(result, console)


def _train_bar(bar: Any, steps: int) -> Any:
    """An ``on_log`` that shows the step, the loss, the last validation EER and the speed on ``bar``."""
    task = bar.add_task("train", total=steps, info="starting")
    state: dict[str, Optional[float]] = {"eer": None}

    def on_log(entry: Any) -> None:
        if entry.valid_eer is not None:
            state["eer"] = entry.valid_eer
        eer = f", EER {100 * state['eer']:.2f}%" if state["eer"] is not None else ""
        speed = ""
        if not math.isnan(entry.steps_per_s):  # a log step measured it
            speed = f", {entry.steps_per_s:.1f} steps/s, {100 * entry.data_wait:.0f}% data wait"
        bar.update(task, completed=entry.step, info=f"loss {entry.loss:.3f}{eer}{speed}")

    return on_log
