"""Real-speech yardstick: cross-corpus and in-corpus EER on ``../shared/data/real-dev``, side by side
with the untrained network and Resemblyzer's pretrained encoder, on trial lists kept in the repo.

Protocol (also in ``benchmarks/real_speech/README.md``):

- Four corpora (roots of real-dev): audiomnist_az, emodb, fsdd, librispeech_test_other. In-corpus
  held-out speakers: az48-az59, emodb spk14-16, fsdd theo and
  yweweler, LibriSpeech 3331, 367, 533 (20 speakers); ``benchmarks/real_speech/splits.tsv``.
- A fold holds out one whole corpus X. It trains on the other three corpora minus their held-out
  speakers (plus every speaker of ``--extra DIR``, e.g. real-extra's 251 LibriSpeech speakers) and
  tests (a) cross-corpus: ``trials_X_all.txt``, trials among every speaker of X; (b) in-corpus:
  ``trials_Y_heldout.txt`` for each training corpus Y, trials among Y's held-out speakers. Every trial
  pairs two files of one corpus; splits go by source speaker (a speed-perturbed copy ``SPK@sp0.9``
  made by the build belongs to its source speaker, which is on one side only).
- Trial lists (``--make-lists``, seed 9, committed): per speaker at most 16 files (40 in the
  held-out lists, which have few speakers; a seeded sample),
  all same-speaker pairs among them (a seeded sample of 1,500 when there are more) and as many
  different-speaker pairs (a seeded sample; all of them when there are fewer). Paths relative to the
  real-dev root, the ``label path1 path2`` format of ``dvector eval --trials``.
- Training: ``dvector build-shards`` of symlinked speaker folders (``-e flac``, ``--build-arg`` values
  passed verbatim; a shard set is reused when its speakers and build arguments are the same), then
  ``dvector train`` for ``--minutes`` of wall time (``--max-minutes``), Adam, ``-n 16 -m 8 -l 100``,
  ``--model``, ``--threads``, ``-w`` and ``--train-arg`` values verbatim.
- No checkpoint choice on any test speaker: validation runs on the fold's own training shards
  (``--valid TRAIN_SHARDS``), so no training speaker is held out for it and no test speaker is seen;
  it is a monitor only, because the evaluated checkpoint is ``checkpoints/latest.pt`` (the last one,
  given as a file: a run folder would make ``dvector eval`` pick ``best.pt``).
- Scores: ``dvector eval --untrained`` (the run's network at step 0, same seed) and ``dvector eval`` of
  the last checkpoint on each list; Resemblyzer (``benchmarks/resemblyzer_scores.py`` in its own venv)
  scores each list once (cached); its EER and minDCF (p_target 0.01) come from ``dvector.metrics``,
  the code ``dvector eval`` uses. ``--norm asnorm`` adds the trained model's AS-norm scores (cohort: the
  fold's training shards, which the checkpoint records), printed as ``real_dev_mean_eer_asnorm=``.

    python benchmarks/real_speech.py --make-lists                       # regenerate the committed lists
    python benchmarks/real_speech.py --work /tmp/rs --minutes 10 --threads 1 --parallel 2   # 2 cores
    python benchmarks/real_speech.py --folds all --train-arg=--augment --train-arg=noise
    python benchmarks/real_speech.py --extra ../shared/data/real-extra/librispeech_train_clean_100 \
        --build-arg=--split-seconds --build-arg=3

``--build-arg`` and ``--train-arg`` take one word each, written with ``=`` when it starts with ``-``.

The last printed line is ``real_dev_mean_eer=<x>``: the trained model's cross-corpus EER in percent,
averaged over the folds run. Results: ``WORK/results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
LISTS = HERE / "real_speech"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "real-dev"
CORPORA = ("audiomnist_az", "emodb", "fsdd", "librispeech_test_other")
HELDOUT = {
    "audiomnist_az": {f"az{i:02d}" for i in range(48, 60)},
    "emodb": {"spk14", "spk15", "spk16"},
    "fsdd": {"theo", "yweweler"},
    "librispeech_test_other": {"3331", "367", "533"},
}
SEED, MAX_TARGET = 9, 1500
FILES_PER_SPEAKER = {"all": 16, "heldout": 40}  # a seeded sample of at most this many files per speaker


# ---- splits and trial lists ----------------------------------------------------------------------

def manifest(data: Path) -> dict[str, dict[str, list[str]]]:
    """corpus -> speaker -> sorted file paths (relative to ``data``), from ``MANIFEST.tsv``."""
    out: dict[str, dict[str, list[str]]] = {}
    lines = (data / "MANIFEST.tsv").read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:
        corpus, speaker, path = line.split("\t")[:3]
        out.setdefault(corpus, {}).setdefault(speaker, []).append(path)
    return {c: {s: sorted(f) for s, f in sorted(spk.items())} for c, spk in sorted(out.items())}


def make_trials(files_by_speaker: dict[str, list[str]], rng: random.Random,
                per_speaker: int) -> list[tuple[int, str, str]]:
    """At most ``per_speaker`` files per speaker; same-speaker pairs (capped) and as many others."""
    chosen = {s: sorted(rng.sample(f, min(per_speaker, len(f)))) for s, f in sorted(files_by_speaker.items())}
    targets = [p for f in chosen.values() for p in itertools.combinations(f, 2)]
    if len(targets) > MAX_TARGET:
        targets = sorted(rng.sample(targets, MAX_TARGET))
    speakers = sorted(chosen)
    nontargets = [(a, b) for i, s in enumerate(speakers) for t in speakers[i + 1:]
                  for a in chosen[s] for b in chosen[t]]
    nontargets = sorted(rng.sample(nontargets, min(len(targets), len(nontargets))))
    return [(1, a, b) for a, b in targets] + [(0, a, b) for a, b in nontargets]


def make_lists(data: Path, out: Path = LISTS) -> list[Path]:
    """Write ``splits.tsv`` and the trial lists (deterministic: seed ``SEED``)."""
    table = manifest(data)
    out.mkdir(parents=True, exist_ok=True)
    split_lines = ["corpus\tspeaker\tside"]
    split_lines += [f"{c}\t{s}\t{'heldout' if s in HELDOUT[c] else 'train'}" for c in CORPORA for s in table[c]]
    (out / "splits.tsv").write_text("\n".join(split_lines) + "\n", encoding="utf-8")
    written = []
    for corpus in CORPORA:
        for kind in ("all", "heldout"):
            speakers = {s: f for s, f in table[corpus].items() if kind == "all" or s in HELDOUT[corpus]}
            rng = random.Random(f"{SEED}/{corpus}/{kind}")
            trials = make_trials(speakers, rng, FILES_PER_SPEAKER[kind])
            n_target = sum(t[0] for t in trials)
            path = out / f"trials_{corpus}_{kind}.txt"
            head = (f"# real-speech yardstick, {corpus}, {'every speaker' if kind == 'all' else 'held-out speakers'} "
                    f"({len(speakers)}): {n_target} target, {len(trials) - n_target} non-target trials\n"
                    f"# made by benchmarks/real_speech.py --make-lists (seed {SEED}); paths relative to real-dev\n")
            path.write_text(head + "".join(f"{l} {a} {b}\n" for l, a, b in trials), encoding="utf-8")
            written.append(path)
    return written


def fold_plan(fold: str) -> tuple[list[tuple[str, str]], list[tuple[str, str, Path]]]:
    """(the training corpora's sides ``(corpus, 'train')``, the test lists ``(corpus, kind, path)``)."""
    others = [c for c in CORPORA if c != fold]
    tests = [(fold, "cross", LISTS / f"trials_{fold}_all.txt")]
    tests += [(c, "in", LISTS / f"trials_{c}_heldout.txt") for c in others]
    return [(c, "train") for c in others], tests


# ---- running dvector -----------------------------------------------------------------------------

def run(cmd: list[str], log: Path, env: dict[str, str] | None = None, usage: dict | None = None) -> str:
    """Run a command, its output to ``log``; the output on success, else exit with its tail. ``usage``
    gets ``cpu_s``: the CPU seconds of the command and the processes it waited for (loader workers)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = proc.stdout.read()
    proc.stdout.close()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if usage is not None:
        usage["cpu_s"] = round(rusage.ru_utime + rusage.ru_stime, 1)
    log.write_text(" ".join(cmd) + "\n" + output, encoding="utf-8")
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-15:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}\nlog: {log}")
    return output


def dvector_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("dvector")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dvector"]


def build_train_shards(args: argparse.Namespace, fold: str) -> Path:
    """The fold's training shards, built from symlinked speaker folders; reused when the same."""
    table = manifest(args.data)
    speakers = [(c, s) for c in CORPORA if c != fold for s in table[c] if s not in HELDOUT[c]]
    extra = str(Path(args.extra).resolve()) if args.extra else None
    key = json.dumps({"speakers": speakers, "data": str(args.data.resolve()), "extra": extra,
                      "build_args": args.build_arg, "workers": args.build_workers}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = args.work / "shards" / digest
    if (out / "DONE.json").is_file():
        return out
    tree = args.work / "trees" / digest
    shutil.rmtree(tree, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    roots = []
    for corpus, speaker in speakers:
        (tree / corpus).mkdir(parents=True, exist_ok=True)
        (tree / corpus / speaker).symlink_to((args.data / corpus / speaker).resolve())
        roots.append(str(tree / corpus))
    roots = list(dict.fromkeys(roots)) + ([extra] if extra else [])
    cmd = dvector_cmd() + ["build-shards", *roots, "-o", str(out), "-e", "flac", "-j", str(args.build_workers),
                           *args.build_arg]
    run(cmd, args.work / "logs" / f"build-{digest}.log")
    (out / "DONE.json").write_text(key + "\n", encoding="utf-8")
    return out


def train_fold(args: argparse.Namespace, fold: str, shards: Path) -> dict:
    """Train one fold for ``--minutes``; the steps done and the command."""
    run_dir = args.work / "folds" / fold / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = dvector_cmd() + ["train", str(shards), str(run_dir), "-i", "100000000", "--max-minutes", str(args.minutes),
                           "--model", args.model, "--optimizer", "adam", "-n", "16", "-m", "8", "-l", "100",
                           "--threads", str(args.threads), "-w", str(args.workers), "-s", "100000000",
                           "--valid", str(shards), "--valid-every", "1000", "--seed", str(args.seed), *args.train_arg]
    print(f"[{fold}] training {args.minutes} min: {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    usage: dict = {}
    run(cmd, args.work / "folds" / fold / "train.log", usage=usage)
    return {"steps": checkpoint_step(run_dir / "checkpoints" / "latest.pt"), "command": cmd[1:],
            "seconds": round(time.monotonic() - start, 1), **usage}


def checkpoint_step(path: Path) -> int | None:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return int(state["step"]) if "step" in state else None


def parse_eval(text: str) -> dict[str, float]:
    eer = re.search(r"^EER=([0-9.]+)%", text, re.M)
    dcf = re.search(r"^minDCF: ([0-9.]+) \(p_target 0\.01\)", text, re.M)
    if not eer or not dcf:
        raise SystemExit(f"cannot read EER/minDCF from dvector eval's output:\n{text[-2000:]}")
    return {"eer": float(eer.group(1)), "min_dcf": float(dcf.group(1))}


def eval_fold(args: argparse.Namespace, fold: str, trials: Path, name: str) -> dict[str, dict[str, float]]:
    """EER (percent) and minDCF (0.01) of the untrained and the last checkpoint on one list."""
    folder = args.work / "folds" / fold
    run_dir = folder / "run"
    common = [str(args.data), "--trials", str(trials), "--threads", str(args.threads)]
    untrained = run(dvector_cmd() + ["eval", str(run_dir), *common, "--untrained"],
                    folder / f"eval-untrained-{name}.log")
    norm = ["--norm", args.norm] if args.norm != "none" else []
    trained = run(dvector_cmd() + ["eval", str(run_dir / "checkpoints" / "latest.pt"), *common, "--no-save",
                                   "--det", str(folder / f"det-{name}.png"), *norm], folder / f"eval-trained-{name}.log")
    out = {"untrained": parse_eval(untrained), "trained": parse_eval(trained)}
    if norm:
        out["normalised"] = parse_norm_row(trained, args.norm)
    return out


def parse_norm_row(text: str, method: str) -> dict[str, float]:
    """The normalised row of ``dvector eval --norm``'s table: EER (percent) and minDCF (0.01)."""
    row = re.search(rf"^{method}\s+([0-9.]+)%\s+([0-9.]+)", text, re.M)
    if not row:
        raise SystemExit(f"cannot read the {method} row from dvector eval's output:\n{text[-2000:]}")
    return {"eer": float(row.group(1)), "min_dcf": float(row.group(2))}


# ---- Resemblyzer ---------------------------------------------------------------------------------

def resemblyzer_python(args: argparse.Namespace) -> str | None:
    """A python with resemblyzer: ``--resemblyzer-python``, else WORK/.venv-resemblyzer (made on first use)."""
    if args.resemblyzer_python:
        probe = subprocess.run([args.resemblyzer_python, "-c", "import resemblyzer"], capture_output=True, text=True)
        if probe.returncode != 0:
            why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"resemblyzer: {args.resemblyzer_python} cannot import it ({why}); its rows are left out", flush=True)
            return None
        return args.resemblyzer_python
    venv = args.work / ".venv-resemblyzer"
    python = venv / "bin" / "python"
    if not (venv / "READY").is_file():
        print(f"resemblyzer: installing into {venv} (once)", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "resemblyzer", "setuptools<81"],
                           check=True, capture_output=True, text=True)
        except (subprocess.CalledProcessError, OSError) as exc:
            why = (getattr(exc, "stderr", "") or str(exc)).strip().splitlines()
            print(f"resemblyzer: cannot install ({why[-1] if why else exc}); its rows are left out", flush=True)
            return None
        (venv / "READY").write_text("ok\n")
    return str(python)


def resemblyzer_metrics(args: argparse.Namespace, python: str | None, trials: Path) -> dict[str, float] | None:
    """Resemblyzer's EER (percent) and minDCF (0.01) on one list, its scores cached per list."""
    if python is None:
        return None
    from dvector.metrics import eer, min_dcf
    import numpy as np

    digest = hashlib.sha256(trials.read_bytes() + str(args.data.resolve()).encode()).hexdigest()[:12]
    out = args.work / "resemblyzer" / f"{trials.stem}-{digest}.scores"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        try:
            run([python, str(HERE / "resemblyzer_scores.py"), str(trials), str(args.data), str(out),
                 "--threads", str(args.threads)], args.work / "logs" / f"resemblyzer-{trials.stem}.log", env)
        except SystemExit as exc:
            print(f"resemblyzer: scoring failed, its rows are left out ({str(exc).splitlines()[0]})", flush=True)
            return None
    rows = [line.split() for line in out.read_text().splitlines() if line and not line.startswith("#")]
    scores = np.array([float(r[0]) for r in rows])
    labels = np.array([r[1] == "1" for r in rows])
    return {"eer": 100 * eer(scores, labels)[0], "min_dcf": min_dcf(scores, labels, p_target=0.01)[0]}


# ---- the benchmark -------------------------------------------------------------------------------

def cell(m: dict[str, float] | None) -> str:
    return f"{m['eer']:6.2f}% {m['min_dcf']:.3f}" if m else "     -       -"


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def report(results: dict) -> float:
    """Print the summary lines; the trained model's cross-corpus mean EER."""
    normalised = any("normalised" in e for f in results["folds"].values() for e in f["lists"].values())
    systems = ("untrained", "trained", *(("normalised",) if normalised else ()), "resemblyzer")
    print(f"\n{'fold':24s}{'test list':24s}kind  " + "".join(f"{s + ' EER minDCF':>24s}" for s in systems))
    for fold, f in results["folds"].items():
        for entry in f["lists"].values():
            print(f"{fold:24s}{entry['corpus']:24s}{entry['kind']:6s}"
                  + "".join(f"{cell(entry[s]):>24s}" for s in systems))
    lines = {}
    for kind, label in (("cross", "cross-corpus mean"), ("in", "in-corpus mean")):
        entries = [e for f in results["folds"].values() for e in f["lists"].values() if e["kind"] == kind]
        parts = []
        for s in systems:
            eers = [e[s]["eer"] for e in entries if e[s]]
            dcfs = [e[s]["min_dcf"] for e in entries if e[s]]
            lines[(kind, s)] = mean(eers) if len(eers) == len(entries) else None
            parts.append(cell({"eer": mean(eers), "min_dcf": mean(dcfs)}) if len(eers) == len(entries) else cell(None))
        print(f"{label:48s}{'':6s}" + "".join(f"{p:>24s}" for p in parts))
    results["summary"] = {f"{k}_{s}_mean_eer": v for (k, s), v in lines.items()}
    return lines[("cross", "trained")]


def benchmark(args: argparse.Namespace) -> None:
    folds = list(CORPORA) if args.folds == "all" else [f.strip() for f in args.folds.split(",") if f.strip()]
    unknown = [f for f in folds if f not in CORPORA]
    if unknown:
        raise SystemExit(f"unknown folds {unknown}; choose from {', '.join(CORPORA)} or 'all'")
    args.work.mkdir(parents=True, exist_ok=True)
    shards, seconds = {}, {}
    for fold in folds:  # builds one at a time (the shards are shared between runs with the same arguments)
        start = time.monotonic()
        shards[fold] = build_train_shards(args, fold)
        seconds[fold] = {"build": round(time.monotonic() - start, 1), "eval": 0.0, "resemblyzer": 0.0}
        print(f"[{fold}] train shards: {shards[fold]} ({seconds[fold]['build']:.0f} s)", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        trained = dict(zip(folds, pool.map(lambda f: train_fold(args, f, shards[f]), folds)))
    python = resemblyzer_python(args)
    results = {"arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "folds": {}}
    for fold in folds:
        entry = {"train": {**trained[fold], "shards": str(shards[fold])}, "lists": {}}
        for corpus, kind, trials in fold_plan(fold)[1]:
            start = time.monotonic()
            scores = eval_fold(args, fold, trials, trials.stem)
            middle = time.monotonic()
            scores["resemblyzer"] = resemblyzer_metrics(args, python, trials)
            seconds[fold]["eval"] += round(middle - start, 1)
            seconds[fold]["resemblyzer"] += round(time.monotonic() - middle, 1)
            entry["lists"][trials.name] = {"corpus": corpus, "kind": kind, **scores}
            norm = f" | {args.norm} {cell(scores['normalised'])}" if "normalised" in scores else ""
            print(f"[{fold}] {kind:5s} {corpus:24s} untrained {cell(scores['untrained'])} | trained "
                  f"{cell(scores['trained'])}{norm} | resemblyzer {cell(scores['resemblyzer'])}", flush=True)
        entry["seconds"] = seconds[fold]
        results["folds"][fold] = entry
        print(f"[{fold}] {trained[fold]['steps']} training steps in {trained[fold]['seconds']:.0f} s "
              f"({trained[fold].get('cpu_s', 0):.0f} CPU-s with its loader); build "
              f"{seconds[fold]['build']:.0f} s, dvector evals {seconds[fold]['eval']:.0f} s, resemblyzer "
              f"{seconds[fold]['resemblyzer']:.0f} s", flush=True)
    mean_eer = report(results)
    (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"results: {args.work / 'results.json'}")
    normalised = results["summary"].get("cross_normalised_mean_eer")
    if normalised is not None:
        print(f"real_dev_mean_eer_{args.norm}={normalised:.2f}")
    print(f"real_dev_mean_eer={mean_eer:.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="real-dev root (default: ../shared/data/real-dev)")
    p.add_argument("--work", type=Path, default=Path("/tmp/dvector-real-speech"), help="work folder")
    p.add_argument("--make-lists", action="store_true", help="regenerate splits and trial lists, then stop")
    p.add_argument("--folds", default="audiomnist_az,emodb", help="held-out corpora, comma list, or 'all'")
    p.add_argument("--extra", help="a root of extra training speakers (e.g. real-extra/librispeech_train_clean_100)")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time per fold")
    p.add_argument("--norm", choices=["none", "asnorm", "snorm"], default="none",
                   help="also score the trained model with this normalisation (cohort: its training shards)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--threads", type=int, default=2, help="torch threads per training and eval")
    p.add_argument("-w", "--workers", type=int, default=1, help="data loader processes per training")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--parallel", type=int, default=1,
                   help="folds trained at once (on 2 cores: --parallel 2 --threads 1)")
    p.add_argument("--build-workers", type=int, default=1, help="build-shards -j")
    p.add_argument("--build-arg", action="append", default=[],
                   help="passed to build-shards verbatim; repeatable: --build-arg=--split-seconds --build-arg=3")
    p.add_argument("--train-arg", action="append", default=[],
                   help="passed to dvector train verbatim; repeatable: --train-arg=--augment --train-arg=noise")
    p.add_argument("--resemblyzer-python", help="python of a venv with resemblyzer (default: WORK/.venv-resemblyzer)")
    args = p.parse_args(argv)
    if args.make_lists:
        for path in make_lists(args.data):
            print(path)
        return
    if not (args.data / "MANIFEST.tsv").is_file():
        raise SystemExit(f"no real-dev data at {args.data} (MANIFEST.tsv missing)")
    benchmark(args)


if __name__ == "__main__":
    main()
