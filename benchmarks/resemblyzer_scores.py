"""Score a trials file with Resemblyzer's pretrained d-vector through Resemblyzer's own pipeline (the
peer row; dvector itself never imports resemblyzer, which is only an optional extra for
``dvector import resemblyzer``, and this script imports it only in the process it runs in).

    python resemblyzer_scores.py TRIALS DATA_ROOT OUT [--threads N]

TRIALS: ``label path1 path2`` lines (``#`` lines skipped), paths relative to DATA_ROOT. Each distinct
file is embedded once: ``VoiceEncoder().embed_utterance(preprocess_wav(path))`` (preprocess_wav
resamples to the 16 kHz Resemblyzer wants, normalises the volume and trims long silences). OUT gets
one ``score label path1 path2`` line per trial, the score the cosine of the two embeddings; it is
written to a temporary name and renamed at the end, so a present OUT is complete.

Run it in a venv of its own: ``python -m venv V && V/bin/pip install resemblyzer "setuptools<81"``
(webrtcvad imports pkg_resources, which setuptools 81 removes).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trials", type=Path)
    p.add_argument("root", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    from resemblyzer import VoiceEncoder, preprocess_wav

    torch.set_num_threads(max(1, args.threads))
    trials = []
    for line in args.trials.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            label, a, b = line.split()
            trials.append((label, a, b))
    files = list(dict.fromkeys(f for _, a, b in trials for f in (a, b)))
    encoder = VoiceEncoder("cpu", verbose=False)
    vectors = {}
    for n, rel in enumerate(files, start=1):
        vectors[rel] = encoder.embed_utterance(preprocess_wav(args.root / rel))
        if n % 200 == 0:
            print(f"{n}/{len(files)} files", file=sys.stderr, flush=True)
    tmp = args.out.with_name(args.out.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"# resemblyzer cosine scores of {args.trials.name}: score label path1 path2\n")
        for label, a, b in trials:
            u, v = vectors[a], vectors[b]
            score = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-12))
            f.write(f"{score:.6f} {label} {a} {b}\n")
    os.replace(tmp, args.out)
    print(f"{len(trials)} trials over {len(files)} files -> {args.out}")


if __name__ == "__main__":
    main()
