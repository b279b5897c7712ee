"""Peak memory of one long file through the front end and through build-shards (reliability item 3).

Writes a speech-like WAV of ``--minutes`` (synthetic voices in turns, with pauses), then runs, each in
a fresh process (its peak RSS is its own): the front end as it was (the whole file at once, every
frame transformed at once), the whole file with the frames transformed in chunks, the file in
blocks (what a file over LONG_FILE_S now gets), and ``build-shards -j 1`` of a corpus of that one
file (which also cuts the features into members every reader accepts; then ``check`` reads them back).
Run by hand::

    .venv/bin/python benchmarks/bench_long_file.py --minutes 60

Last line ``long_file_build_peak_mb=<MB>``: the peak resident memory of ``build-shards -j 1`` of that file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from dvector.config import BuildConfig, FeatureConfig, VadConfig
from dvector.signal import features, process
from dvector.signal.vad import warm_up
mode, path = sys.argv[1], Path(sys.argv[2])
warm_up()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if mode == "build":
    from dvector.shards.build import build_shards
    report = build_shards([str(path.parent.parent)], sys.argv[3], BuildConfig(min_shards=1), workers=1)
    frames = report.frames
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from dvector.shards.check import check_shards
    checked = check_shards(sys.argv[3])
    print(json.dumps({"mode": mode, "peak_rss_mb": peak / 1024, "after_imports_mb": base / 1024,
                      "seconds": time.perf_counter() - t0, "frames": frames, "samples": report.samples_ok,
                      "cut_to_fit": report.cut_to_fit, "check_ok": checked.ok, "problems": checked.problems}))
    sys.exit(0)
else:
    if mode == "as-before":
        process.LONG_FILE_S, features.MEL_CHUNK_FRAMES = float("inf"), 1 << 40
    elif mode == "whole-chunked":
        process.LONG_FILE_S = float("inf")
    frames = int(process.process_file(path, FeatureConfig(), VadConfig()).mel.shape[0])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mode": mode, "peak_rss_mb": peak / 1024, "after_imports_mb": base / 1024,
                  "seconds": time.perf_counter() - t0, "frames": frames}))
"""


def write_long_wav(path: Path, minutes: float, rate: int = 16000, seed: int = 0) -> None:
    """Speech-like audio: a few voices taking turns, pauses between, written a piece at a time."""
    from dvector.demo.synth import random_voice, utterance

    rng = np.random.default_rng(seed)
    voices = [random_voice(rng) for _ in range(4)]
    pieces = [utterance(voices[i % 4], float(rng.uniform(3, 8)), rate, rng) for i in range(24)]
    total = int(minutes * 60 * rate)
    written = 0
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        while written < total:
            piece = pieces[int(rng.integers(len(pieces)))]
            pause = np.zeros(int(rng.uniform(0.2, 2.0) * rate), np.float32)
            chunk = np.concatenate([piece, pause])[: total - written]
            f.write(chunk)
            written += chunk.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--modes", default="as-before,whole-chunked,blocks,build")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "corpus" / "spk0" / "long.wav"
        wav.parent.mkdir(parents=True)
        write_long_wav(wav, args.minutes)
        print(f"{args.minutes:g} min WAV, {wav.stat().st_size / 1e6:.0f} MB", flush=True)
        peaks = {}
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(wav), str(Path(tmp) / f"shards-{mode}")],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(mode, "failed:", out.stderr.strip().splitlines()[-1:], flush=True)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[mode] = result["peak_rss_mb"]
            print(json.dumps(result), flush=True)
        last = "build" if "build" in peaks else next(reversed(peaks), None)
        if last is not None:
            print(f"long_file_{last.replace('-', '_')}_peak_mb={peaks[last]:.0f}")


if __name__ == "__main__":
    main()
