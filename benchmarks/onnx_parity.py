"""ONNX parity on real speech: ``dvector.onnx`` (float and int8) against the PyTorch model of a run.

For a trained run (or checkpoint), exports ``dvector.onnx`` and ``dvector.int8.onnx`` with the
library's ``export_onnx`` (the code of ``dvector export --format onnx --quantize int8``), then embeds
every file of one real-speech trial list (``benchmarks/real_speech/*.txt``, paths relative to
``../shared/data/real-dev``) three ways: ``dvector.load(checkpoint).embed`` (PyTorch), the float ONNX
model and the int8 one under onnxruntime (each given the same decoded, resampled waveform). Prints
the cosine between the float ONNX and the PyTorch vectors (min and mean over the files), the EER of
each on the trial list (``dvector.metrics.eer``), and the EER change of int8 against float.

    python benchmarks/onnx_parity.py --run /tmp/c10/lstm-ge2e/folds/emodb/run/checkpoints/latest.pt \\
        --trials benchmarks/real_speech/trials_emodb_all.txt

Skips (exit 0, one line) where real-dev or onnxruntime is absent. The last line is
``int8_eer_change_pp=<x>``: int8 EER minus float ONNX EER, in percentage points.
"""

from __future__ import annotations

import importlib.util

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "real-dev"
TRIALS = HERE / "real_speech" / "trials_emodb_all.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder or checkpoint file")
    parser.add_argument("--trials", type=Path, default=TRIALS, help="a real-speech trial list")
    parser.add_argument("--data", type=Path, default=DATA, help="real-dev root (the trial paths are relative to it)")
    parser.add_argument("--out", type=Path, default=None, help="keep the exported models here (default: a temp dir)")
    parser.add_argument("--max-files", type=int, default=0, help="embed at most this many files (0: all)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"skipped: real-dev not found at {args.data}")
        return 0
    if importlib.util.find_spec("onnxruntime") is None:
        print("skipped: onnxruntime is not installed (pip install 'dvector[onnx]')")
        return 0
    import torch

    import dvector
    from dvector.metrics import eer
    from dvector.evaluation.evaluate import read_trials
    from dvector.signal.vad import speech_frames
    from dvector.export.onnx_graph import GraphVad, export_onnx, onnx_embed, onnx_session

    trials = read_trials(args.trials)
    files = sorted({t.a for t in trials} | {t.b for t in trials})
    if args.max_files:
        files = files[:args.max_files]
        keep = set(files)
        trials = [t for t in trials if t.a in keep and t.b in keep]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        t0 = time.perf_counter()
        float_path, int8_path = export_onnx(args.run, out, quantize="int8")
        print(f"exported {float_path.name} and {int8_path.name} in {time.perf_counter() - t0:.1f} s")
        embedder = dvector.load(args.run, threads=1)
        sessions = {"onnx": onnx_session(float_path), "int8": onnx_session(int8_path)}
        vectors: dict[str, dict[str, np.ndarray]] = {"torch": {}, "onnx": {}, "int8": {}}
        graph_vad = GraphVad(embedder.vad, embedder.sample_rate)
        vad_files = vad_frames = total_frames = 0
        for path in files:
            wav = embedder.waveform(args.data / path)
            kernel, _ = speech_frames(wav, embedder.sample_rate, embedder.vad)
            differ = int(np.sum(graph_vad.frame_mask(torch.from_numpy(wav)).numpy() != kernel))
            vad_files, vad_frames = vad_files + (differ > 0), vad_frames + differ
            total_frames += kernel.size
            vectors["torch"][path] = embedder.embed((wav, embedder.sample_rate))
            for name, session in sessions.items():
                vectors[name][path] = onnx_embed(session, wav)
    cosines = np.array([float(vectors["torch"][p] @ vectors["onnx"][p]) for p in files])
    int8_cos = np.array([float(vectors["torch"][p] @ vectors["int8"][p]) for p in files])
    labels = np.array([t.label for t in trials])
    eers = {}
    for name, table in vectors.items():
        scores = np.array([float(table[t.a] @ table[t.b]) for t in trials])
        eers[name] = 100 * eer(scores, labels)[0]
    print(f"run: {args.run}  model: {embedder.info.get('model_config', {}).get('name')}  "
          f"trials: {args.trials.name} ({len(trials)} over {len(files)} files)")
    print(f"vad: the graph's keep mask differs from the numba kernels' in {vad_frames} of {total_frames} frames "
          f"({vad_files} of {len(files)} files)")
    print(f"float_cos_min={cosines.min():.7f}")
    print(f"float_cos_mean={cosines.mean():.7f}")
    print(f"int8_cos_min={int8_cos.min():.6f}")
    print(f"int8_cos_mean={int8_cos.mean():.6f}")
    print(f"eer_torch={eers['torch']:.2f}%  eer_onnx={eers['onnx']:.2f}%  eer_int8={eers['int8']:.2f}%")
    print(f"int8_eer_change_pp={eers['int8'] - eers['onnx']:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
