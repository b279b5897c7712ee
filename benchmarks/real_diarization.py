"""Diarization yardstick from real speech: DER of ``dvector diarize`` on "conversations" made of
held-out real-dev speakers, with the number of speakers given and estimated.

Protocol:

- Speakers: the ``heldout`` side of ``benchmarks/real_speech/splits.tsv`` (20 speakers of four
  corpora, never in the training of a model made by the real-speech protocol, ``benchmarks/real_speech.py``).
- Conversations (seeded: ``--seed``, the same list every time): conversation ``i`` takes the corpus
  ``i mod 4`` among those with two or more held-out speakers (a conversation never mixes corpora,
  whose channels would give the speakers away), 2 to 4 of its speakers (as many as it has, at most),
  and ``--turns`` turns. A turn is one speaker (never the previous one) for a target of 1-8 s:
  consecutive files of that speaker, each with its silence trimmed by the project's VAD (pauses
  over 0.3 s shortened), concatenated and cut at the target. Each turn is scaled to a random
  level (-26 dBFS RMS +- 3 dB); 80% of turns follow a pause of 0.2-1.5 s, 20% overlap the previous
  turn by 0.2-1.0 s (at most half of either turn). Everything at 16 kHz, with white noise at -70 dBFS.
- Reference: ``WORK/ref/convNNN.rttm``, one line per turn (its whole span, short pauses included).
- Hypotheses: ``dvector diarize RUN ... --speakers K`` (one call per K, each conversation with its
  own K) into ``WORK/hyp_given``, and ``dvector diarize RUN ...`` (K estimated, default bounds) into
  ``WORK/hyp_estimated``; ``--diarize-arg`` values are passed to both verbatim.
- Score: ``dvector diarize-eval`` (pyannote.metrics, 0.25 s collar each side, overlap scored: a
  one-speaker-at-a-time hypothesis misses the overlapped second speaker).

    python benchmarks/real_diarization.py --run /tmp/rs/folds/emodb/run --work /tmp/rd

The last line is ``real_dev_der=<x>``: the DER in percent with the number of speakers given.
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dvector.config import VadConfig  # noqa: E402
from dvector.signal.audio import decode, resample, to_mono  # noqa: E402
from dvector.signal.vad import trim_silence  # noqa: E402
from dvector.diarization.rttm import Turn, write_rttm  # noqa: E402

DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "real-dev"
SPLITS = HERE / "real_speech" / "splits.tsv"
RATE = 16000


def heldout_files(data: Path) -> dict[str, dict[str, list[str]]]:
    """corpus -> held-out speaker -> sorted files (relative to ``data``), from splits.tsv and MANIFEST.tsv."""
    held = {tuple(line.split("\t")[:2]) for line in SPLITS.read_text(encoding="utf-8").splitlines()[1:]
            if line.endswith("\theldout")}
    out: dict[str, dict[str, list[str]]] = {}
    for line in (data / "MANIFEST.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        corpus, speaker, path = line.split("\t")[:3]
        if (corpus, speaker) in held:
            out.setdefault(corpus, {}).setdefault(speaker, []).append(path)
    return {c: {s: sorted(f) for s, f in sorted(spk.items())} for c, spk in sorted(out.items()) if len(spk) >= 2}


class Clips:
    """Each file's audio at 16 kHz with silence trimmed, read once."""

    def __init__(self, data: Path) -> None:
        self.data, self.cache = data, {}

    def __call__(self, rel: str) -> np.ndarray:
        if rel not in self.cache:
            wav, rate = decode(self.data / rel)
            wav = resample(to_mono(wav), rate, RATE)
            self.cache[rel] = trim_silence(wav, RATE, VadConfig())[0]
        return self.cache[rel]


def make_turn(clips: Clips, files: list[str], rng: random.Random, target_s: float) -> np.ndarray:
    """About ``target_s`` of one speaker: consecutive trimmed files from a random one, cut at the target."""
    need, parts, i = int(target_s * RATE), [], rng.randrange(len(files))
    while sum(p.size for p in parts) < need:
        parts.append(clips(files[i % len(files)]))
        i += 1
    wav = np.concatenate(parts)[:need].astype(np.float64)
    rms = np.sqrt(np.mean(wav ** 2)) or 1.0
    return wav * 10 ** (rng.uniform(-29, -23) / 20) / rms


def make_conversation(clips: Clips, corpus: str, speakers: dict[str, list[str]], rng: random.Random,
                      n_turns: int) -> tuple[np.ndarray, list[Turn]]:
    """One conversation's audio (16 kHz) and reference turns."""
    chosen = sorted(rng.sample(sorted(speakers), rng.randint(2, min(4, len(speakers)))))
    order = list(chosen)
    rng.shuffle(order)  # everyone speaks once first, then at random (never twice in a row)
    while len(order) < n_turns:
        order.append(rng.choice([s for s in chosen if s != order[-1]]))
    pieces, turns, end = [], [], 0.0
    for speaker in order:
        wav = make_turn(clips, speakers[speaker], rng, rng.uniform(1.0, 8.0))
        length = wav.size / RATE
        if turns and rng.random() < 0.2:
            start = end - min(rng.uniform(0.2, 1.0), 0.5 * length, 0.5 * (turns[-1].end - turns[-1].start))
        else:
            start = end + rng.uniform(0.2, 1.5)
        pieces.append((int(round(start * RATE)), wav))
        turns.append(Turn(start, start + length, f"{corpus}/{speaker}"))
        end = max(end, start + length)
    total = np.zeros(int((end + 1.0) * RATE))
    for at, wav in pieces:
        total[at:at + wav.size] += wav
    total += 10 ** (-70 / 20) * np.random.default_rng(rng.randrange(2 ** 32)).standard_normal(total.size)
    return np.clip(total, -1, 1).astype(np.float32), turns


def make_set(args: argparse.Namespace) -> dict[str, int]:
    """Write WORK/audio/convNNN.wav and WORK/ref/convNNN.rttm; returns name -> number of speakers."""
    table = heldout_files(args.data)
    corpora = sorted(table)
    clips, counts = Clips(args.data), {}
    for i in range(args.conversations):
        corpus = corpora[i % len(corpora)]
        rng = random.Random(f"{args.seed}/{i}")
        wav, turns = make_conversation(clips, corpus, table[corpus], rng, args.turns)
        name = f"conv{i:03d}"
        sf.write(str(args.work / "audio" / f"{name}.wav"), wav, RATE)
        write_rttm(args.work / "ref" / f"{name}.rttm", turns, name)
        counts[name] = len({t.speaker for t in turns})
        print(f"{name}: {corpus}, {counts[name]} speakers, {len(turns)} turns, {wav.size / RATE:.1f} s", flush=True)
    return counts


def dvector(*args: str) -> str:
    """Run ``python -m dvector ARGS`` from the repository; its stdout (stderr passes through)."""
    cmd = [sys.executable, "-m", "dvector", *args]
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=HERE.parent, stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        sys.exit(f"command failed ({done.returncode}): {' '.join(cmd)}")
    return done.stdout


def der_of(output: str) -> float:
    match = re.search(r"^DER=([0-9.]+|nan)%$", output, re.MULTILINE)
    if match is None:
        sys.exit("diarize-eval printed no DER line")
    return float(match.group(1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run folder (or checkpoint) of the real-speech protocol")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="real-dev root (default: ../shared/data/real-dev)")
    p.add_argument("--work", type=Path, default=Path("/tmp/dvector-real-diarization"), help="work folder")
    p.add_argument("--conversations", type=int, default=32, help="how many conversations")
    p.add_argument("--turns", type=int, default=12, help="turns per conversation")
    p.add_argument("--seed", type=int, default=0, help="conversation seed (tune on another seed than you report)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for diarize")
    p.add_argument("--diarize-arg", action="append", default=[],
                   help="one word passed to both diarize calls (write --diarize-arg=--hop)")
    args = p.parse_args(argv)
    for sub in ("audio", "ref", "hyp_given", "hyp_estimated"):
        (args.work / sub).mkdir(parents=True, exist_ok=True)
    counts = make_set(args)
    common = ["--threads", str(args.threads), *args.diarize_arg]
    for k in sorted(set(counts.values())):
        files = [str(args.work / "audio" / f"{n}.wav") for n, c in counts.items() if c == k]
        dvector("diarize", str(args.run), *files, "-o", str(args.work / "hyp_given"), "--speakers", str(k), *common)
    dvector("diarize", str(args.run), *(str(args.work / "audio" / f"{n}.wav") for n in counts),
            "-o", str(args.work / "hyp_estimated"), *common)
    given = der_of(dvector("diarize-eval", str(args.work / "ref"), str(args.work / "hyp_given")))
    estimated = der_of(dvector("diarize-eval", str(args.work / "ref"), str(args.work / "hyp_estimated")))
    print(f"DER with the number of speakers given: {given:.2f}%; estimated: {estimated:.2f}% "
          f"({len(counts)} conversations, seed {args.seed}, model {args.run})")
    print(f"real_dev_der={given:.2f}")


if __name__ == "__main__":
    main()
