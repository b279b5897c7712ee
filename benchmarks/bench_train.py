"""Training throughput: steps/s and the fraction of time spent waiting for data, on whatever device is present.

Runs the real trainer (:func:`dvector.training.loop.train`: streaming loader with its worker processes,
model, GE2E loss, paper gradient scaling, clipping, SGD, scheduler, TensorBoard) on synthetic
shards: float16 log-mels of Gaussian "speakers", written straight with
:func:`dvector.shards.format.write_shard` by ``benchmarks/bench_loader.py``'s ``build_corpus`` (cached in
``--data-dir``; no audio). Steps/s and the data-wait fraction come from the trainer's own
``StepLog`` windows (read through ``on_log``), over the steps after ``--warmup``; the trainer's
start (validation set, first DataLoader batch) and its final validation and save fall outside them.

Then it times the GE2E loss alone (forward + backward, N x M x D, CPU) against the original
project's N*M*N*D formulation (``benchmarks/bench_loss.py``) and prints the ratio.

    python benchmarks/bench_train.py                                   # paper model, N=64 M=10 L=160
    python benchmarks/bench_train.py --model paper --steps 2 --warmup 1  # on a CPU: a few slow steps
    python benchmarks/bench_train.py --model tiny -n 16 -m 8 -l 100 --steps 50
    python benchmarks/bench_train.py --model attentive -n 32 -m 8 -l 80 --threads 1   # CPU threads: 1 against the rule

    python benchmarks/bench_train.py --model all -n 16 -m 8 -l 100 --steps 4 --warmup 2 --threads 1
                                      # every encoder at the real-speech protocol's batch: steps/s per encoder

The last printed line is ``train_steps_per_s=<number>`` (several models: one ``train_steps_per_s_<model>=`` line
each, the last model's last).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import build_corpus  # noqa: E402
from bench_loss import time_loss  # noqa: E402

from dvector.config import MODEL_PRESETS, ModelConfig, TrainConfig  # noqa: E402
from dvector.nn.encoders import build_encoder  # noqa: E402
from dvector.nn.model import count_parameters  # noqa: E402
from dvector.training.distributed import Distributed, cpu_threads  # noqa: E402
from dvector.training.loop import StepLog, train  # noqa: E402


def device_name(on_cpu: bool, threads: int) -> str:
    if not on_cpu:
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({os.cpu_count()} cores, {threads} torch threads)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="paper", help="a preset, a comma list of presets, or all "
                   f"({', '.join(sorted(MODEL_PRESETS))})")
    p.add_argument("--loss", default="ge2e", help="the training loss (ge2e, contrast, angleproto, aamsoftmax, ...)")
    p.add_argument("-n", "--n-speakers", type=int, default=64)
    p.add_argument("-m", "--n-utterances", type=int, default=10)
    p.add_argument("-l", "--seg-len", type=int, default=160)
    p.add_argument("--steps", type=int, default=20, help="measured steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="steps before measuring (one trainer log window)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (training's default)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the trainer's rule: all cores)")
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "dvector-bench-train")
    p.add_argument("--speakers", type=int, default=256)
    p.add_argument("--utterances", type=int, default=32, help="per speaker")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--loss-dim", type=int, default=256, help="D of the loss-only timing")
    p.add_argument("--loss-repeats", type=int, default=20)
    p.add_argument("--skip-loss", action="store_true", help="do not time the GE2E loss alone")
    args = p.parse_args()
    N, M, L = args.n_speakers, args.n_utterances, args.seg_len

    frames = (max(L, 160), max(L, 160) * 3)
    index = build_corpus(args.data_dir, args.speakers, args.utterances, frames, 16, args.shards)
    names = sorted(MODEL_PRESETS) if args.model == "all" else [m.strip() for m in args.model.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODEL_PRESETS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {sorted(MODEL_PRESETS)} or all")
    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    rates: dict[str, float] = {}
    for name in names:
        model_cfg = ModelConfig.preset(name, n_mels=index["config"]["features"]["n_mels"])
        rates[name], threads = measure(args, model_cfg, index, on_cpu)
    if len(rates) > 1:
        print("steps/s per encoder, N={} M={} L={}, loss {}: ".format(N, M, L, args.loss)
              + ", ".join(f"{name} {rate:.3g}" for name, rate in rates.items()))
    if not args.skip_loss:
        loss = time_loss(N, M, args.loss_dim, repeats=args.loss_repeats, threads=threads)
        print(f"GE2E softmax loss alone, forward+backward, N={N} M={M} D={args.loss_dim}, CPU, {threads} threads: "
              f"dvector {loss['ours_ms']:.2f} ms, original N*M*N*D formulation {loss['original_ms']:.2f} ms, "
              f"ratio {loss['speedup']:.1f}x (|loss difference| {loss['max_abs_diff']:.1e})")
    for name, rate in rates.items():
        print(f"train_steps_per_s{'' if len(rates) == 1 else '_' + name.replace('-', '_')}={rate:.4g}")


def measure(args: argparse.Namespace, model_cfg: ModelConfig, index: dict, on_cpu: bool) -> tuple[float, int]:
    """Train ``model_cfg`` for the warm-up and measured steps; print what it saw; (steps/s, torch threads)."""
    N, M, L = args.n_speakers, args.n_utterances, args.seg_len
    warmup = max(1, args.warmup)
    measured = max(1, math.ceil(args.steps / warmup)) * warmup  # whole trainer log windows
    total = warmup + measured
    cfg = TrainConfig(steps=total, save_every=10**9, decay_every=10**9, valid_every=10**9, log_every=warmup,
                      n_speakers=N, n_utterances=M, seg_len=(L, L), workers=args.workers, keep_checkpoints=1,
                      valid_utterances=4, amp=not args.no_amp, compile=args.compile, threads=args.threads,
                      loss=args.loss)
    threads = cpu_threads(cfg, Distributed())  # what train() gives torch on CPU (--threads, else its rule)
    print(f"device: {device_name(on_cpu, threads)}")
    print(f"model {model_cfg.name}: {count_parameters(build_encoder(model_cfg)):,} parameters; loss {cfg.loss}; "
          f"batch N={N} M={M} L={L} ({N * M} segments); {args.workers} loader workers; corpus "
          f"{index['totals']['utterances']} utterances of {args.speakers} speakers in {args.shards} shards")
    if on_cpu and threads > (os.cpu_count() or 1):
        print(f"note: {threads} torch threads on {os.cpu_count()} cores oversubscribe the CPU; small models can run "
              f"many times slower")
    print(f"{warmup} warm-up + {measured} measured steps ...", flush=True)

    logs: list[StepLog] = []
    run_dir = Path(tempfile.mkdtemp(prefix="dvector-bench-train-run-"))
    try:
        started = time.perf_counter()
        result = train(str(args.data_dir), run_dir / "run", cfg, model_cfg, device=args.device,
                       on_log=logs.append, say=lambda message: None)
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    windows = [e for e in logs if e.step > warmup and e.step % warmup == 0 and e.steps_per_s == e.steps_per_s]
    seconds = sum(warmup / e.steps_per_s for e in windows)
    waited = sum(e.data_wait * warmup / e.steps_per_s for e in windows)
    steps = warmup * len(windows)
    rate = steps / seconds
    first = next(e for e in logs if e.step == warmup)
    print(f"warm-up: {warmup} steps at {first.steps_per_s:.3g} steps/s (includes the loader's start)")
    print(f"measured: {steps} steps in {seconds:.2f} s: {rate:.3g} steps/s, {1000 / rate:.1f} ms/step, "
          f"{rate * N * M:.0f} segments/s")
    print(f"data-wait fraction: {100 * waited / seconds:.1f}% of the measured time spent waiting for batches")
    print(f"whole run: {result.final_step} steps in {wall:.1f} s (start-up, validation set and final save included); "
          f"last loss {result.last_loss:.3f}", flush=True)
    if on_cpu:
        print(f"torch threads while training: {torch.get_num_threads()}")
    return rate, threads


if __name__ == "__main__":
    main()
