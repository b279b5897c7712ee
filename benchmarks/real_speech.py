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
    python benchmarks/real_speech.py --folds all --rows imported                # no training
    python benchmarks/real_speech.py --rows imported,finetuned --finetune-folds emodb --finetune-minutes 10
    python benchmarks/real_speech.py --rows trained,scratch_all --build-arg=--split-seconds --build-arg=3

``--build-arg`` and ``--train-arg`` take one word each, written with ``=`` when it starts with ``-``.

Rows (``--rows``, comma list; default ``trained``), all on the same folds and lists:

- ``trained``: the above (with the untrained network beside it).
- ``imported``: ``dvector import resemblyzer -o WORK/imported`` (Resemblyzer's weights with its own
  front end), then ``dvector eval`` of it on every list: no training; it should land on the
  Resemblyzer peer row (differences: our VAD against webrtcvad, the decoding and resampling).
- ``finetuned``: shards of the fold's training speakers built with ``--features WORK/imported`` (the
  import's mel-power features), then ``dvector train --init WORK/imported`` for ``--finetune-minutes``
  (defaults ``FINETUNE_DEFAULTS``; ``--finetune-arg`` adds or overrides) and ``dvector eval`` of its
  ``latest.pt``. ``--finetune-folds`` limits it to some folds.
- ``scratch_all``: the ``trained`` row's recipe (``--model``, ``--train-arg``, ``--minutes``) on every
  visible speaker: the fold's real-dev training speakers, every ``--all-root`` (default real-extra's
  251 LibriSpeech speakers and real-more's speechocean762_train) and ``--extra``.

Held-out real-more speakers: a seeded 25 of real-more's 125 (``splits_more.tsv``, written by
``--make-lists`` with ``trials_speechocean762_train_heldout.txt``, the same rules as the held-out lists,
paths relative to ``--more``) are linked out of every training set (also of ``--extra`` roots) and that
list is scored for every row and Resemblyzer, as kind ``more`` (outside the in-corpus mean, whose
lists are real-dev's).

The last printed line is ``real_dev_mean_eer=<x>``: the trained model's cross-corpus EER in percent,
averaged over the folds run (printed when the ``trained`` row ran). Before it:
``real_dev_mean_eer_<row>=`` for ``imported``, ``finetuned``, ``scratch_all`` and ``resemblyzer``, and
``real_more_heldout_eer_<row>=`` on the held-out real-more list. Results: ``WORK/results.json``.
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
DEFAULT_MORE = HERE.parent.parent / "shared" / "data" / "real-more"
DEFAULT_EXTRA = HERE.parent.parent / "shared" / "data" / "real-extra" / "librispeech_train_clean_100"
MORE_CORPUS, MORE_HELDOUT_N = "speechocean762_train", 25  # real-more: a seeded 25 of its 125 speakers held out
MORE_LIST = LISTS / f"trials_{MORE_CORPUS}_heldout.txt"
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


def more_manifest(more: Path) -> dict[str, list[str]]:
    """real-more's speaker -> sorted file paths, relative to the real-more root
    (``speechocean762_train/SPEAKER/file.flac``; its MANIFEST's paths are relative to the corpus folder)."""
    out: dict[str, list[str]] = {}
    for line in (more / "MANIFEST.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        corpus, speaker, path = line.split("\t")[:3]
        if corpus == MORE_CORPUS:
            out.setdefault(speaker, []).append(f"{corpus}/{path}")
    return {s: sorted(f) for s, f in sorted(out.items())}


def choose_more_heldout(speakers: list[str]) -> list[str]:
    """The held-out real-more speakers: a seeded sample of ``MORE_HELDOUT_N`` (seed ``SEED``)."""
    return sorted(random.Random(f"{SEED}/{MORE_CORPUS}/heldout").sample(sorted(speakers), MORE_HELDOUT_N))


def more_heldout(lists: Path = LISTS) -> set[str]:
    """The held-out real-more speakers, as committed in ``splits_more.tsv`` (empty when absent)."""
    path = lists / "splits_more.tsv"
    if not path.is_file():
        return set()
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return {speaker for corpus, speaker, side in rows if corpus == MORE_CORPUS and side == "heldout"}


def make_more_lists(more: Path, out: Path = LISTS) -> list[Path]:
    """``splits_more.tsv`` and ``trials_speechocean762_train_heldout.txt``: the same rules as the
    held-out lists of real-dev (at most 40 files per speaker, seed ``SEED``), paths relative to real-more."""
    table = more_manifest(more)
    heldout = set(choose_more_heldout(list(table)))
    split_lines = ["corpus\tspeaker\tside"] + [f"{MORE_CORPUS}\t{s}\t{'heldout' if s in heldout else 'train'}"
                                               for s in table]
    (out / "splits_more.tsv").write_text("\n".join(split_lines) + "\n", encoding="utf-8")
    rng = random.Random(f"{SEED}/{MORE_CORPUS}/heldout-trials")
    trials = make_trials({s: f for s, f in table.items() if s in heldout}, rng, FILES_PER_SPEAKER["heldout"])
    n_target = sum(t[0] for t in trials)
    path = out / MORE_LIST.name
    head = (f"# real-speech yardstick, {MORE_CORPUS} (real-more), held-out speakers ({len(heldout)} of {len(table)}): "
            f"{n_target} target, {len(trials) - n_target} non-target trials\n"
            f"# made by benchmarks/real_speech.py --make-lists (seed {SEED}); paths relative to real-more\n")
    path.write_text(head + "".join(f"{l} {a} {b}\n" for l, a, b in trials), encoding="utf-8")
    return [out / "splits_more.tsv", path]


def make_lists(data: Path, out: Path = LISTS, more: Path | None = DEFAULT_MORE) -> list[Path]:
    """Write ``splits.tsv`` and the trial lists (deterministic: seed ``SEED``); with real-more present,
    also its held-out split and list (``make_more_lists``)."""
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
    if more is not None and (more / "MANIFEST.tsv").is_file():
        written += make_more_lists(more, out)
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


def extra_roots(args: argparse.Namespace, row: str = "trained") -> list[Path]:
    """The extra training roots of a row: ``--extra`` (repeatable) for the trained and fine-tuned rows;
    for ``scratch_all`` every ``--all-root`` (default: real-extra and real-more) and ``--extra``."""
    roots = [Path(e) for e in args.extra]
    if row == "scratch_all":
        roots = [Path(r) for r in args.all_root] + roots
    return list(dict.fromkeys(r.resolve() for r in roots))


def shard_cache(work: Path, key: str) -> tuple[str, Path, Path | None]:
    """``(digest, shards folder, tree folder)`` for a build described by ``key``; the tree is None when
    those shards are already built (``DONE.json``), else both folders are emptied for a new build."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = work / "shards" / digest
    if (out / "DONE.json").is_file():
        return digest, out, None
    tree = work / "trees" / digest
    shutil.rmtree(tree, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return digest, out, tree


def build_train_shards(args: argparse.Namespace, fold: str, row: str = "trained",
                       features: Path | None = None) -> Path:
    """The fold's training shards (of ``row``'s speakers), built from symlinked speaker folders;
    reused when the same. Held-out real-more speakers (``splits_more.tsv``) never reach training, even
    through ``--extra``. ``features``: a run whose feature settings the shards take (``--features``)."""
    table = manifest(args.data)
    speakers = [(c, s) for c in CORPORA if c != fold for s in table[c] if s not in HELDOUT[c]]
    extras = extra_roots(args, row)
    held_more = sorted(more_heldout())
    key_data = {"speakers": speakers, "data": str(args.data.resolve()), "build_args": args.build_arg,
                "workers": args.build_workers}
    # the key of a build with one --extra (or none) stays what it was before roots were repeatable
    key_data["extra"] = (str(extras[0]) if len(extras) == 1 else [str(e) for e in extras]) if extras else None
    if any(e.name == MORE_CORPUS for e in extras):
        key_data["heldout_more"] = held_more
    if features is not None:
        key_data["features"] = str(Path(features).resolve())
    key = json.dumps(key_data, sort_keys=True)
    digest, out, tree = shard_cache(args.work, key)
    if tree is None:
        return out
    roots = []
    for corpus, speaker in speakers:
        (tree / corpus).mkdir(parents=True, exist_ok=True)
        (tree / corpus / speaker).symlink_to((args.data / corpus / speaker).resolve())
        roots.append(str(tree / corpus))
    for extra in extras:  # linked speaker by speaker, so that held-out real-more speakers stay out
        if extra.name in CORPORA or (tree / extra.name).exists():
            raise SystemExit(f"extra root {extra} has the name of another root; rename or link it")
        for folder in sorted(p for p in extra.iterdir() if p.is_dir()):
            if extra.name == MORE_CORPUS and folder.name in held_more:
                continue
            (tree / extra.name).mkdir(parents=True, exist_ok=True)
            (tree / extra.name / folder.name).symlink_to(folder.resolve())
        roots.append(str(tree / extra.name))
    roots = list(dict.fromkeys(roots))
    cmd = dvector_cmd() + ["build-shards", *roots, "-o", str(out), "-e", "flac", "-j", str(args.build_workers),
                           *args.build_arg, *(["--features", str(features)] if features is not None else [])]
    run(cmd, args.work / "logs" / f"build-{digest}.log")
    (out / "DONE.json").write_text(key + "\n", encoding="utf-8")
    return out


def train_fold(args: argparse.Namespace, fold: str, shards: Path, row: str = "trained") -> dict:
    """Train one fold's ``row`` for ``--minutes`` (``--finetune-minutes`` for the fine-tuned row);
    the steps done and the command."""
    folder = args.work / "folds" / fold
    run_dir = folder / ("run" if row == "trained" else f"run-{row}")
    shutil.rmtree(run_dir, ignore_errors=True)
    common = ["-i", "100000000", "--threads", str(args.threads), "-w", str(args.workers), "-s", "100000000",
              "--valid", str(shards), "--valid-every", "1000", "--seed", str(args.seed)]
    if row == "finetuned":
        minutes = args.finetune_minutes if args.finetune_minutes is not None else args.minutes
        cmd = dvector_cmd() + ["train", str(shards), str(run_dir), "--init", str(imported_run(args)),
                               "--max-minutes", str(minutes), *common, *FINETUNE_DEFAULTS, *args.finetune_arg]
    else:
        minutes = args.minutes
        cmd = dvector_cmd() + ["train", str(shards), str(run_dir), "--max-minutes", str(minutes),
                               "--model", args.model, "--optimizer", "adam", "-n", "16", "-m", "8", "-l", "100",
                               *common, *args.train_arg]
    print(f"[{fold}] training {row} {minutes} min: {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    usage: dict = {}
    run(cmd, folder / ("train.log" if row == "trained" else f"train-{row}.log"), usage=usage)
    return {"steps": checkpoint_step(run_dir / "checkpoints" / "latest.pt"), "command": cmd[1:],
            "seconds": round(time.monotonic() - start, 1), **usage}


# Fine-tuning the imported Resemblyzer encoder (``--finetune-arg`` values come after, and win): its
# GE2E loss with fresh w and b, held alone for 100 steps while the encoder stays as imported, then
# everything at a small Adam rate; Resemblyzer's own 1.6 s windows (160 frames), N=16 M=8.
FINETUNE_DEFAULTS = ["--loss", "ge2e", "--optimizer", "adam", "--lr", "1e-5", "--freeze-steps", "100",
                     "-n", "16", "-m", "8", "-l", "160"]


def imported_run(args: argparse.Namespace) -> Path:
    """``WORK/imported``: ``dvector import resemblyzer`` (once)."""
    out = args.work / "imported"
    if not (out / "checkpoints" / "latest.pt").is_file():
        run(dvector_cmd() + ["import", "resemblyzer", "-o", str(out), "--overwrite"],
            args.work / "logs" / "import-resemblyzer.log")
    return out


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


def eval_model(args: argparse.Namespace, model: Path, root: Path, trials: Path, log: Path,
               *flags: str) -> dict[str, float]:
    """EER (percent) and minDCF (0.01) of one model on one list (``flags`` passed to ``dvector eval``)."""
    out = run(dvector_cmd() + ["eval", str(model), str(root), "--trials", str(trials), "--threads", str(args.threads),
                               *flags], log)
    return parse_eval(out)


def eval_fold(args: argparse.Namespace, fold: str, trials: Path, name: str,
              root: Path | None = None) -> dict[str, dict[str, float]]:
    """EER (percent) and minDCF (0.01) of the untrained and the last checkpoint on one list."""
    folder = args.work / "folds" / fold
    run_dir = folder / "run"
    common = [str(root or args.data), "--trials", str(trials), "--threads", str(args.threads)]
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


def resemblyzer_metrics(args: argparse.Namespace, python: str | None, trials: Path,
                        root: Path | None = None) -> dict[str, float] | None:
    """Resemblyzer's EER (percent) and minDCF (0.01) on one list (paths relative to ``root``, default
    ``--data``), its scores cached per list."""
    if python is None:
        return None
    from dvector.metrics import eer, min_dcf
    import numpy as np

    root = root or args.data
    digest = hashlib.sha256(trials.read_bytes() + str(root.resolve()).encode()).hexdigest()[:12]
    out = args.work / "resemblyzer" / f"{trials.stem}-{digest}.scores"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        try:
            run([python, str(HERE / "resemblyzer_scores.py"), str(trials), str(root), str(out),
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


SYSTEMS = ("untrained", "trained", "normalised", "imported", "finetuned", "scratch_all", "resemblyzer")
KINDS = (("cross", "cross-corpus mean"), ("in", "in-corpus mean"), ("more", "held-out real-more"))


def report(results: dict) -> float | None:
    """Print the summary lines; the trained model's cross-corpus mean EER (None: that row not run)."""
    entries_all = [e for f in results["folds"].values() for e in f["lists"].values()]
    systems = [s for s in SYSTEMS if any(s in e for e in entries_all)]
    print(f"\n{'fold':24s}{'test list':24s}kind  " + "".join(f"{s + ' EER minDCF':>24s}" for s in systems))
    for fold, f in results["folds"].items():
        for entry in f["lists"].values():
            print(f"{fold:24s}{entry['corpus']:24s}{entry['kind']:6s}"
                  + "".join(f"{cell(entry.get(s)):>24s}" for s in systems))
    lines = {}
    for kind, label in KINDS:
        entries = [e for e in entries_all if e["kind"] == kind]
        if not entries:
            continue
        parts = []
        for s in systems:
            eers = [e[s]["eer"] for e in entries if e.get(s)]
            dcfs = [e[s]["min_dcf"] for e in entries if e.get(s)]
            lines[(kind, s)] = mean(eers) if len(eers) == len(entries) else None
            parts.append(cell({"eer": mean(eers), "min_dcf": mean(dcfs)}) if len(eers) == len(entries) else cell(None))
        print(f"{label:48s}{'':6s}" + "".join(f"{p:>24s}" for p in parts))
    results["summary"] = {f"{k}_{s}_mean_eer": v for (k, s), v in lines.items()}
    return lines.get(("cross", "trained"))


def fold_lists(args: argparse.Namespace, fold: str) -> list[tuple[str, str, Path, Path]]:
    """The fold's lists ``(corpus, kind, path, root)``: ``fold_plan``'s, and the held-out real-more list
    (kind ``more``) when real-more and the committed list are there."""
    lists = [(c, k, t, args.data) for c, k, t in fold_plan(fold)[1]]
    if args.more is not None and (args.more / "MANIFEST.tsv").is_file() and MORE_LIST.is_file():
        lists.append((MORE_CORPUS, "more", MORE_LIST, args.more))
    return lists


def benchmark(args: argparse.Namespace) -> None:
    folds = list(CORPORA) if args.folds == "all" else [f.strip() for f in args.folds.split(",") if f.strip()]
    unknown = [f for f in folds if f not in CORPORA]
    if unknown:
        raise SystemExit(f"unknown folds {unknown}; choose from {', '.join(CORPORA)} or 'all'")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        raise SystemExit(f"unknown rows {bad}; choose from {', '.join(ROWS)}")
    ft_folds = folds if args.finetune_folds is None else [
        f.strip() for f in args.finetune_folds.split(",") if f.strip()]
    args.work.mkdir(parents=True, exist_ok=True)
    trainable = [r for r in ("trained", "finetuned", "scratch_all") if r in rows]
    jobs = [(f, r) for r in trainable for f in (ft_folds if r == "finetuned" else folds) if f in folds]
    if "imported" in rows or "finetuned" in rows:
        imported_run(args)
    shards, seconds = {}, {f: {"build": 0.0, "eval": 0.0, "resemblyzer": 0.0} for f in folds}
    for fold, row in jobs:  # builds one at a time (the shards are shared between runs with the same arguments)
        start = time.monotonic()
        shards[fold, row] = build_train_shards(args, fold, row, imported_run(args) if row == "finetuned" else None)
        took = round(time.monotonic() - start, 1)
        seconds[fold]["build"] += took
        print(f"[{fold}] {row} train shards: {shards[fold, row]} ({took:.0f} s)", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        trained = dict(zip(jobs, pool.map(lambda j: train_fold(args, j[0], shards[j], j[1]), jobs)))
    python = resemblyzer_python(args) if not args.no_resemblyzer else None
    results = {"arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "folds": {}}
    imported_cache: dict[str, dict[str, float]] = {}
    for fold in folds:
        entry = {"train": {r: {**trained[fold, r], "shards": str(shards[fold, r])}
                           for r in trainable if (fold, r) in trained}, "lists": {}}
        if "trained" in entry["train"]:  # the layout results.json had before the other rows
            entry["train"].update(entry["train"]["trained"])
        for corpus, kind, trials, root in fold_lists(args, fold):
            start = time.monotonic()
            folder = args.work / "folds" / fold
            scores: dict = {}
            if "trained" in rows:
                scores.update(eval_fold(args, fold, trials, trials.stem, root))
            if "imported" in rows:
                if trials.name not in imported_cache:  # the same model on every fold: scored once per list
                    imported_cache[trials.name] = eval_model(
                        args, imported_run(args) / "checkpoints" / "latest.pt", root, trials,
                        args.work / "imported-evals" / f"{trials.stem}.log", "--no-save")
                scores["imported"] = imported_cache[trials.name]
            for row in ("finetuned", "scratch_all"):
                if (fold, row) in trained:
                    scores[row] = eval_model(args, folder / f"run-{row}" / "checkpoints" / "latest.pt", root, trials,
                                             folder / f"eval-{row}-{trials.stem}.log", "--no-save")
            middle = time.monotonic()
            scores["resemblyzer"] = resemblyzer_metrics(args, python, trials, root)
            seconds[fold]["eval"] += round(middle - start, 1)
            seconds[fold]["resemblyzer"] += round(time.monotonic() - middle, 1)
            entry["lists"][trials.name] = {"corpus": corpus, "kind": kind, **scores}
            shown = " | ".join(f"{s} {cell(scores[s])}" for s in SYSTEMS if s in scores)
            print(f"[{fold}] {kind:5s} {corpus:24s} {shown}", flush=True)
        entry["seconds"] = seconds[fold]
        results["folds"][fold] = entry
        for row, t in entry["train"].items():
            if isinstance(t, dict):
                print(f"[{fold}] {row}: {t['steps']} training steps in {t['seconds']:.0f} s "
                      f"({t.get('cpu_s', 0):.0f} CPU-s with its loader)", flush=True)
        print(f"[{fold}] build {seconds[fold]['build']:.0f} s, dvector evals {seconds[fold]['eval']:.0f} s, "
              f"resemblyzer {seconds[fold]['resemblyzer']:.0f} s", flush=True)
    mean_eer = report(results)
    (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"results: {args.work / 'results.json'}")
    summary = results["summary"]
    normalised = summary.get("cross_normalised_mean_eer")
    if normalised is not None:
        print(f"real_dev_mean_eer_{args.norm}={normalised:.2f}")
    for row in ("imported", "finetuned", "scratch_all", "resemblyzer"):  # the new rows, before the last line
        if summary.get(f"cross_{row}_mean_eer") is not None:
            print(f"real_dev_mean_eer_{row}={summary[f'cross_{row}_mean_eer']:.2f}")
    for s in SYSTEMS:
        if summary.get(f"more_{s}_mean_eer") is not None:
            print(f"real_more_heldout_eer_{s}={summary[f'more_{s}_mean_eer']:.2f}")
    if mean_eer is not None:
        print(f"real_dev_mean_eer={mean_eer:.2f}")


ROWS = ("trained", "imported", "finetuned", "scratch_all")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="real-dev root (default: ../shared/data/real-dev)")
    p.add_argument("--work", type=Path, default=Path("/tmp/dvector-real-speech"), help="work folder")
    p.add_argument("--make-lists", action="store_true", help="regenerate splits and trial lists, then stop")
    p.add_argument("--folds", default="audiomnist_az,emodb", help="held-out corpora, comma list, or 'all'")
    p.add_argument("--extra", action="append", default=[],
                   help="a root of extra training speakers (e.g. real-extra/librispeech_train_clean_100); "
                        "repeatable; held-out real-more speakers are left out of it")
    p.add_argument("--more", type=Path, default=DEFAULT_MORE,
                   help="real-more root: its held-out speakers' list is scored for every row (default: "
                        "../shared/data/real-more; skipped when absent)")
    p.add_argument("--rows", default="trained",
                   help="comma list of " + ", ".join(ROWS) + ": trained (and untrained) on the fold's real-dev "
                        "speakers (+ --extra); imported: `dvector import resemblyzer`, evaluated as is; "
                        "finetuned: train --init the import on the fold's speakers (shards built with "
                        "--features); scratch_all: the trained row's recipe on every visible speaker "
                        "(+ every --all-root)")
    p.add_argument("--all-root", action="append", default=None,
                   help="extra roots of the scratch_all row (repeatable; default: real-extra's LibriSpeech "
                        "and real-more's speechocean762_train, minus its held-out speakers)")
    p.add_argument("--finetune-minutes", type=float,
                   help="training wall time of the finetuned row (default: --minutes)")
    p.add_argument("--finetune-folds", help="folds of the finetuned row (default: every fold run)")
    p.add_argument("--finetune-arg", action="append", default=[],
                   help="passed to the finetuned row's dvector train after its defaults "
                        f"({' '.join(FINETUNE_DEFAULTS)}); repeatable")
    p.add_argument("--no-resemblyzer", action="store_true", help="leave Resemblyzer's peer row out")
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
    if args.all_root is None:
        args.all_root = [str(DEFAULT_EXTRA), str(DEFAULT_MORE / MORE_CORPUS)]
    if args.make_lists:
        for path in make_lists(args.data, LISTS, args.more):
            print(path)
        return
    if not (args.data / "MANIFEST.tsv").is_file():
        raise SystemExit(f"no real-dev data at {args.data} (MANIFEST.tsv missing)")
    benchmark(args)


if __name__ == "__main__":
    main()
