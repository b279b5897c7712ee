"""Whole-file parity of the imported Resemblyzer encoder with Resemblyzer itself, on real recordings.

For every audio file under ``--data`` (default ``../shared/data/real-dev``; ``--every K`` takes every
K-th in path order): ``dvector.load(IMPORT).embed(path)`` (what ``dvector embed`` computes) against
``VoiceEncoder().embed_utterance(preprocess_wav(path))``, their cosine. The network, features, level
and windows are the same computation (tests/nn/test_resemblyzer_parity.py); what differs is the VAD:
ours set to trim as webrtcvad does (``VadConfig.preset("resemblyzer")``) against webrtcvad itself.
Prints the distribution per corpus (first folder under the data root) and overall, one torch thread.

    python benchmarks/resemblyzer_parity.py                  # every file of real-dev
    python benchmarks/resemblyzer_parity.py --every 16       # a quicker look

Needs ``pip install 'dvector[resemblyzer]'``. Last line: ``resemblyzer_parity_median_cosine=<x>``.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dev"


def cosines(data: Path, every: int = 1, run: Path | None = None) -> dict[str, list[float]]:
    """corpus -> cosines of the import's and Resemblyzer's embeddings of each file (see the docstring)."""
    import dvector
    from resemblyzer import VoiceEncoder, preprocess_wav

    from dvector.pretrained.resemblyzer import import_resemblyzer

    warnings.filterwarnings("ignore")
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".flac", ".wav"))[::every]
    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ours = dvector.load(run or import_resemblyzer(Path(tmp) / "rz").run, threads=1)
        theirs = VoiceEncoder("cpu", verbose=False)
        for f in files:
            corpus = f.relative_to(data).parts[0]
            out.setdefault(corpus, []).append(float(ours.embed(f) @ theirs.embed_utterance(preprocess_wav(f))))
    return out


def describe(values: list[float]) -> str:
    v = np.asarray(values)
    return (f"{len(v):5d} files  median {np.median(v):.4f}  p10 {np.percentile(v, 10):.4f}  "
            f"p1 {np.percentile(v, 1):.4f}  min {v.min():.4f}  >=0.99: {100 * np.mean(v >= 0.99):.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="root of corpus folders of audio files")
    p.add_argument("--every", type=int, default=1, help="every K-th file in path order")
    args = p.parse_args()
    torch.set_num_threads(1)
    by_corpus = cosines(args.data, args.every)
    for corpus, values in sorted(by_corpus.items()):
        print(f"{corpus:<24} {describe(values)}")
    everything = [c for values in by_corpus.values() for c in values]
    print(f"{'all':<24} {describe(everything)}")
    print(f"resemblyzer_parity_median_cosine={np.median(everything):.4f}")


if __name__ == "__main__":
    main()
