"""Embedding throughput: windows (and seconds of speech) embedded per second, for each encoder.

Times the networks alone on random log-mel windows (B windows x L frames x n_mels), in eval mode under
``torch.inference_mode``: on CUDA with bf16 autocast (``--no-amp`` for fp32) and optionally
``torch.compile``; on CPU in fp32 with ``--threads`` torch threads. Weights are untrained: speed does not
depend on them. A window of L frames at the 10 ms hop is L/100 s of speech, so ``windows/s x L/100`` is
the real-time factor of embedding one stream (without the log-mel front-end and VAD, which
``benchmarks/bench_build.py`` measures).

    python benchmarks/bench_embed.py --model all --threads 2                 # CPU
    python benchmarks/bench_embed.py --model all --device cuda --compile     # GPU (benchmarks/gpu.sh)

Last line: ``embed_windows_per_s_<model>=<number>`` for the last model (one such line per model).

``--resemblyzer``: the same network through two whole pipelines instead. ``dvector embed`` of the
imported Resemblyzer encoder (``dvector import resemblyzer`` into a temporary folder; what
``dvector embed RUN FILES... -o OUT.npz`` runs, ``embed_paths``, without writing the ``.npz``) against
Resemblyzer's own ``VoiceEncoder.embed_utterance(preprocess_wav(path))``, on the same files (every
``.flac``/``.wav`` under ``--data``, default ``../shared/data/real-dev``), in this one process with
``--threads`` torch threads (default 1), file by file from the file on disk to the vector (decoding,
resampling, level, VAD or trimming, features, windows, network). Each side first runs untimed on 20
files (numba, oneDNN, librosa warm-up); the two sides alternate in order per ``--repeats`` and each
side's fastest pass counts. x realtime = seconds of audio / seconds of wall time. Needs
``pip install 'dvector[resemblyzer]'``. Last line: ``embed_speed_ratio_vs_resemblyzer=<x>``.

    python benchmarks/bench_embed.py --resemblyzer                     # all of real-dev, 1 thread
    python benchmarks/bench_embed.py --resemblyzer --limit 300         # a quicker look
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import warnings
from pathlib import Path

import torch

from dvector.config import MODEL_PRESETS, ModelConfig
from dvector.nn.encoders import build_encoder
from dvector.nn.model import count_parameters


def windows_per_second(model: torch.nn.Module, batch: torch.Tensor, repeats: int, amp: bool) -> float:
    """Windows per second over ``repeats`` batches, after two warm-up batches (compilation, caches)."""
    context = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    cuda = batch.is_cuda
    with torch.inference_mode(), context:
        for _ in range(2):
            model(batch)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(batch)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return repeats * batch.size(0) / elapsed


DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dev"


def audio_files(data: Path, limit: int) -> list[Path]:
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".flac", ".wav"))
    return files[:limit] if limit else files


def time_dvector(run: Path, files: list[Path]) -> float:
    import dvector
    from dvector.inference.embed_inputs import embed_paths

    embedder = dvector.load(run, threads=torch.get_num_threads())
    embed_paths(embedder, [str(f) for f in files[:20]])
    start = time.perf_counter()
    result = embed_paths(embedder, [str(f) for f in files])
    elapsed = time.perf_counter() - start
    if result.skipped:
        print(f"dvector skipped {len(result.skipped)} files, e.g. {result.skipped[0]}")
    return elapsed


def time_resemblyzer(files: list[Path]) -> float:
    from resemblyzer import VoiceEncoder, preprocess_wav

    encoder = VoiceEncoder("cpu", verbose=False)
    for f in files[:20]:
        encoder.embed_utterance(preprocess_wav(f))
    start = time.perf_counter()
    for f in files:
        encoder.embed_utterance(preprocess_wav(f))
    return time.perf_counter() - start


def compare_with_resemblyzer(data: Path, limit: int, repeats: int) -> None:
    """Print both pipelines' x realtime and, last, their ratio (see the module's docstring)."""
    import soundfile as sf

    from dvector.pretrained.resemblyzer import import_resemblyzer

    warnings.filterwarnings("ignore")
    files = audio_files(data, limit)
    if not files:
        raise SystemExit(f"no .flac/.wav files under {data}")
    audio_s = sum(sf.info(str(f)).duration for f in files)
    with tempfile.TemporaryDirectory() as tmp:
        run = import_resemblyzer(Path(tmp) / "resemblyzer").run
        ours: list[float] = []
        theirs: list[float] = []
        for r in range(repeats):
            sides = [lambda: ours.append(time_dvector(run, files)), lambda: theirs.append(time_resemblyzer(files))]
            for go in (sides if r % 2 == 0 else sides[::-1]):
                go()
    ours_x, theirs_x = audio_s / min(ours), audio_s / min(theirs)
    print(f"{len(files)} files, {audio_s / 60:.1f} min of audio, {torch.get_num_threads()} torch thread(s), "
          f"{repeats} repeat(s)")
    print(f"dvector embed (imported Resemblyzer): {min(ours):.1f} s, {ours_x:.0f}x realtime")
    print(f"Resemblyzer embed_utterance(preprocess_wav): {min(theirs):.1f} s, {theirs_x:.0f}x realtime")
    print(f"embed_speed_ratio_vs_resemblyzer={ours_x / theirs_x:.3g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="all", help=f"a preset, a comma list, or all ({', '.join(sorted(MODEL_PRESETS))})")
    p.add_argument("--device", default="cpu")
    p.add_argument("-b", "--batch", type=int, default=0, help="windows per batch (0: 256 on CUDA, 32 on CPU)")
    p.add_argument("-l", "--frames", type=int, default=160, help="frames per window (the training L)")
    p.add_argument("--n-mels", type=int, default=40)
    p.add_argument("--repeats", type=int, default=0, help="timed batches (0: 20 on CUDA, 3 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model first")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (default: bf16 autocast)")
    p.add_argument("--resemblyzer", action="store_true",
                   help="compare dvector embed of the imported Resemblyzer encoder with Resemblyzer's own pipeline")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="--resemblyzer: folder of audio files")
    p.add_argument("--limit", type=int, default=0, help="--resemblyzer: the first N files in path order (0: all)")
    args = p.parse_args()
    if args.resemblyzer:
        torch.set_num_threads(args.threads or 1)
        compare_with_resemblyzer(args.data, args.limit, args.repeats or 1)
        return
    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = sorted(MODEL_PRESETS) if args.model == "all" else [m.strip() for m in args.model.split(",") if m.strip()]
    batch_size = args.batch or (256 if cuda else 32)
    repeats = args.repeats or (20 if cuda else 3)
    device = torch.device(args.device)
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}; "
          f"{torch.get_num_threads()} CPU threads; batches of {batch_size} x {args.frames} frames x {args.n_mels} mels; "
          f"{'bf16 autocast' if cuda and not args.no_amp else 'fp32'}{'; compiled' if args.compile else ''}")
    rates: dict[str, float] = {}
    for name in names:
        torch.manual_seed(0)
        model = build_encoder(ModelConfig.preset(name, n_mels=args.n_mels)).to(device).eval()
        runner = torch.compile(model) if args.compile else model
        batch = torch.randn(batch_size, args.frames, args.n_mels, device=device)
        rates[name] = windows_per_second(runner, batch, repeats, cuda and not args.no_amp)
        print(f"{name}: {count_parameters(model):,} parameters, {rates[name]:,.0f} windows/s, "
              f"{rates[name] * args.frames / 100:,.0f} s of speech per s", flush=True)
    for name, rate in rates.items():
        print(f"embed_windows_per_s_{name.replace('-', '_')}={rate:.4g}")


if __name__ == "__main__":
    main()
