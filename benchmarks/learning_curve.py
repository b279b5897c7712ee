"""Learning curve on real speech: the best from-scratch recipe of docs/results.md (``ecapa-small`` +
``aamsoftmax``, ``-n 16 -m 2 -l 100``, Adam, margin warm-up 200) trained at equal compute on nested
subsets of the visible training speakers, scored on the real-speech yardstick's lists.

Protocol (the folds, lists and held-out speakers of ``benchmarks/real_speech.py``):

- Visible speakers of a fold holding out corpus X: the real-dev ``train`` speakers of the other three
  corpora, every speaker of real-extra (251 LibriSpeech speakers, one utterance each) and the real-more
  speakers outside its committed held-out 25 (``benchmarks/real_speech/splits_more.tsv``): 409 for the
  EmoDB fold. No test speaker is visible.
- Subsets: the visible speakers in one seeded order (``--seed``, per fold); the subset of size k is the
  first k, so each subset contains the smaller ones (nested). Sizes ``--sizes`` (default
  20,60,150,all).
- Each point: ``dvector build-shards`` of its speakers (``--split-seconds 3`` by default, for the
  one-utterance speakers; ``--build-arg`` replaces it), then ``dvector train`` for ``--minutes`` of wall
  time (``--max-minutes``) on one torch thread and one loader process, every point of a round started
  together (``--parallel``, default: all at once) so that each gets the same share of the machine. The
  CPU seconds of each training (trainer and loader, ``os.wait4``) are recorded and printed: equal
  compute is what they show, not what the wall time promises on a shared machine. ``--steps N`` trains
  a fixed number of steps instead (equal compute by construction).
- Scores: ``dvector eval`` of ``checkpoints/latest.pt`` on the cross-corpus list ``trials_X_all.txt``,
  the in-corpus held-out lists of the other real-dev corpora (their mean) and the held-out real-more
  list; Resemblyzer's pretrained encoder on the same lists (scores cached, as real_speech.py does).
- ``--realdev-point`` adds a point trained on the fold's real-dev training speakers alone (the
  yardstick's training set) at the same compute: the reference of "scratch on every visible speaker".
  It is not part of the trend.
- Trend: the least-squares line of EER (percent) against log2(speakers) over the nested points, so its
  slope is the EER change per doubling of speakers; extrapolated to the Resemblyzer row's EER, it says
  how many speakers that line would need (a straight line in log(speakers) is an assumption, and far
  outside the measured range a weak one).

    python benchmarks/learning_curve.py --work /tmp/rs-lc --minutes 10              # one fold (emodb)
    python benchmarks/learning_curve.py --folds all --minutes 10 --parallel 2

The last line is ``learning_curve_eer_per_doubling=<x>``: the cross-corpus slope, in EER points per
doubling of training speakers. Results: ``WORK/results.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _real_speech():
    spec = importlib.util.spec_from_file_location("real_speech_bench", HERE / "real_speech.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


rs = _real_speech()
RECIPE = ["--model", "ecapa-small", "--loss", "aamsoftmax", "--optimizer", "adam", "-n", "16", "-m", "2",
          "-l", "100", "--margin-warmup", "200"]


def visible_speakers(args: argparse.Namespace, fold: str) -> list[tuple[str, Path]]:
    """``(corpus/speaker, folder)`` of every speaker a fold may train on, sorted."""
    table = rs.manifest(args.data)
    out = [(f"{c}/{s}", (args.data / c / s).resolve())
           for c in rs.CORPORA if c != fold for s in table[c] if s not in rs.HELDOUT[c]]
    held_more = rs.more_heldout()
    for root in args.root:
        root = Path(root).resolve()
        if not root.is_dir():
            raise SystemExit(f"no training root {root}")
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if root.name == rs.MORE_CORPUS and folder.name in held_more:
                continue
            out.append((f"{root.name}/{folder.name}", folder.resolve()))
    return sorted(out)


def realdev_speakers(args: argparse.Namespace, fold: str) -> list[tuple[str, Path]]:
    return [(k, p) for k, p in visible_speakers(args, fold) if k.split("/")[0] in rs.CORPORA]


def build(args: argparse.Namespace, speakers: list[tuple[str, Path]]) -> Path:
    """Shards of these speakers (symlinked folders, one root per corpus); reused when the same."""
    key = json.dumps({"speakers": [k for k, _ in speakers], "data": str(args.data.resolve()),
                      "roots": [str(Path(r).resolve()) for r in args.root], "build_args": args.build_arg},
                     sort_keys=True)
    digest, out, tree = rs.shard_cache(args.work, key)
    if tree is None:
        return out
    for name, folder in speakers:
        corpus, speaker = name.split("/")
        (tree / corpus).mkdir(parents=True, exist_ok=True)
        (tree / corpus / speaker).symlink_to(folder)
    roots = sorted(str(p) for p in tree.iterdir())
    cmd = rs.dvector_cmd() + ["build-shards", *roots, "-o", str(out), "-e", "flac", "-j", str(args.build_workers),
                              *args.build_arg]
    start = time.monotonic()
    rs.run(cmd, args.work / "logs" / f"build-{digest}.log")
    (out / "DONE.json").write_text(key + "\n", encoding="utf-8")
    print(f"built {out} ({len(speakers)} speakers, {time.monotonic() - start:.0f} s)", flush=True)
    return out


def train(args: argparse.Namespace, name: str, shards: Path) -> dict:
    run_dir = args.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    length = ["-i", str(args.steps)] if args.steps else ["-i", "100000000", "--max-minutes", str(args.minutes)]
    cmd = rs.dvector_cmd() + ["train", str(shards), str(run_dir), *length, *RECIPE, "--threads", "1",
                              "-w", str(args.workers), "-s", "100000000", "--valid", str(shards),
                              "--valid-every", "100000000", "--seed", str(args.train_seed), *args.train_arg]
    print(f"[{name}] training: {' '.join(cmd[1:])}", flush=True)
    usage: dict = {}
    start = time.monotonic()
    rs.run(cmd, args.work / "logs" / f"train-{name}.log", usage=usage)
    record = {"steps": rs.checkpoint_step(run_dir / "checkpoints" / "latest.pt"),
              "seconds": round(time.monotonic() - start, 1), "cpu_s": usage.get("cpu_s"), "command": cmd[1:]}
    (args.work / "runs" / f"{name}.train.json").write_text(json.dumps(record) + "\n", encoding="utf-8")
    return record


def trained_before(args: argparse.Namespace, name: str) -> dict:
    """``--eval-only``: a point's training as recorded (``runs/NAME.train.json``), else its steps alone."""
    path = args.work / "runs" / f"{name}.train.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    latest = args.work / "runs" / name / "checkpoints" / "latest.pt"
    if not latest.is_file():
        raise SystemExit(f"--eval-only: no checkpoint {latest}")
    return {"steps": rs.checkpoint_step(latest), "seconds": 0.0, "cpu_s": None, "command": None}


def lists_of(args: argparse.Namespace, fold: str) -> list[tuple[str, Path, Path]]:
    """``(kind, list, root)``: cross, the in-corpus held-out lists, and the real-more held-out list."""
    out = [("cross", rs.LISTS / f"trials_{fold}_all.txt", args.data)]
    out += [("in", rs.LISTS / f"trials_{c}_heldout.txt", args.data) for c in rs.CORPORA if c != fold]
    if (args.more / "MANIFEST.tsv").is_file() and rs.MORE_LIST.is_file():
        out.append(("more", rs.MORE_LIST, args.more))
    return [o for o in out if o[0] in args.lists]


def score(args: argparse.Namespace, fold: str, name: str) -> dict[str, float]:
    model = args.work / "runs" / name / "checkpoints" / "latest.pt"
    by_kind: dict[str, list[float]] = {}
    for kind, trials, root in lists_of(args, fold):
        m = rs.eval_model(args, model, root, trials, args.work / "logs" / f"eval-{name}-{trials.stem}.log", "--no-save")
        by_kind.setdefault(kind, []).append(m["eer"])
    return {k: sum(v) / len(v) for k, v in by_kind.items()}


def peer(args: argparse.Namespace, fold: str) -> dict[str, float] | None:
    """Resemblyzer's EERs on the fold's lists (cached scores under ``--resemblyzer-work``)."""
    if args.no_resemblyzer:
        return None
    ns = argparse.Namespace(work=args.resemblyzer_work or args.work, data=args.data, threads=1,
                            resemblyzer_python=args.resemblyzer_python)
    python = rs.resemblyzer_python(ns)
    by_kind: dict[str, list[float]] = {}
    for kind, trials, root in lists_of(args, fold):
        m = rs.resemblyzer_metrics(ns, python, trials, root)
        if m is None:
            return None
        by_kind.setdefault(kind, []).append(m["eer"])
    return {k: sum(v) / len(v) for k, v in by_kind.items()}


def trend(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares ``eer = a + b * log2(n)``: ``(a, b)``; None under two distinct sizes."""
    xs = [math.log2(n) for n, _ in points]
    ys = [e for _, e in points]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def reach(fit: tuple[float, float] | None, target: float | None) -> str:
    if fit is None or target is None:
        return "-"
    a, b = fit
    if b >= 0:
        return "never (the trend does not fall)"
    log_n = (target - a) / b
    return f"{2 ** log_n:,.0f} speakers" if log_n < 60 else f"2^{log_n:.0f} speakers"


def pct(value: float | None, width: int) -> str:
    return f"{value:{width - 1}.2f}%" if value is not None else f"{'-':>{width}s}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=rs.DEFAULT_DATA, help="real-dev root")
    p.add_argument("--more", type=Path, default=rs.DEFAULT_MORE, help="real-more root")
    p.add_argument("--root", action="append", default=None,
                   help="extra training roots (repeatable; default: real-extra's LibriSpeech and real-more's "
                        "speechocean762_train minus its held-out speakers)")
    p.add_argument("--work", type=Path, default=Path("/tmp/dvector-learning-curve"))
    p.add_argument("--folds", default="emodb", help="held-out corpora, comma list, or 'all' (default: emodb)")
    p.add_argument("--sizes", default="20,60,150,all", help="nested subset sizes ('all': every visible speaker)")
    p.add_argument("--seed", type=int, default=0, help="seed of the speaker order (the subsets)")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time per point (--max-minutes)")
    p.add_argument("--steps", type=int, default=0, help="a fixed number of steps per point instead of --minutes")
    p.add_argument("--parallel", type=int, default=0, help="points trained at once (0: all of a run at once)")
    p.add_argument("--lists", default="cross,in,more",
                   help="which lists to score: cross (the held-out corpus), in (real-dev held-out speakers), "
                        "more (held-out real-more speakers)")
    p.add_argument("--eval-only", action="store_true",
                   help="score the points' existing runs (WORK/runs/NAME) without building or training")
    p.add_argument("--eval-parallel", type=int, default=2, help="points evaluated at once")
    p.add_argument("-w", "--workers", type=int, default=1, help="loader processes per training")
    p.add_argument("--build-workers", type=int, default=1)
    p.add_argument("--build-arg", action="append", default=None,
                   help="build-shards arguments (default: --split-seconds 3)")
    p.add_argument("--train-arg", action="append", default=[], help="extra dvector train arguments, verbatim")
    p.add_argument("--realdev-point", action="store_true",
                   help="also train on the fold's real-dev training speakers alone (not in the trend)")
    p.add_argument("--resemblyzer-python", help="a python with resemblyzer (default: WORK/.venv-resemblyzer)")
    p.add_argument("--resemblyzer-work", type=Path, help="where Resemblyzer's cached scores are (default: --work)")
    p.add_argument("--no-resemblyzer", action="store_true")
    args = p.parse_args(argv)
    args.threads = 1
    args.lists = {k.strip() for k in args.lists.split(",") if k.strip()}
    if not args.lists <= {"cross", "in", "more"}:
        raise SystemExit(f"--lists: choose among cross, in, more (got {sorted(args.lists)})")
    if args.root is None:
        args.root = [str(rs.DEFAULT_EXTRA), str(rs.DEFAULT_MORE / rs.MORE_CORPUS)]
    if args.build_arg is None:
        args.build_arg = ["--split-seconds", "3"]
    folds = list(rs.CORPORA) if args.folds == "all" else [f.strip() for f in args.folds.split(",") if f.strip()]
    if any(f not in rs.CORPORA for f in folds):
        raise SystemExit(f"unknown folds in {folds}; choose from {', '.join(rs.CORPORA)} or 'all'")
    args.work.mkdir(parents=True, exist_ok=True)

    points = []  # (fold, name, size label, n speakers, speakers)
    for fold in folds:
        order = visible_speakers(args, fold)
        random.Random(f"{args.seed}/{fold}").shuffle(order)
        for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            n = len(order) if size == "all" else int(size)
            if n > len(order):
                raise SystemExit(f"size {n} > the {len(order)} visible speakers of fold {fold}")
            points.append((fold, f"{fold}-{n}", size, n, order[:n]))
        if args.realdev_point:
            dev = realdev_speakers(args, fold)
            points.append((fold, f"{fold}-realdev", "real-dev only", len(dev), dev))
    if args.eval_only:
        trained = {pt[1]: trained_before(args, pt[1]) for pt in points}
    else:
        shards = {name: build(args, speakers) for _, name, _, _, speakers in points}
        with ThreadPoolExecutor(max_workers=args.parallel or len(points)) as pool:
            trained = dict(zip([pt[1] for pt in points],
                               pool.map(lambda pt: train(args, pt[1], shards[pt[1]]), points)))
    results = {"arguments": {k: str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v
                             for k, v in vars(args).items()},
               "points": [], "resemblyzer": {}}
    with ThreadPoolExecutor(max_workers=args.eval_parallel) as pool:
        scored = list(pool.map(lambda pt: score(args, pt[0], pt[1]), points))
    for (fold, name, size, n, _), eers in zip(points, scored):
        results["points"].append({"fold": fold, "name": name, "size": size, "speakers": n, **trained[name],
                                  "eer": eers})
    for fold in folds:
        results["resemblyzer"][fold] = peer(args, fold)

    print(f"\n{'fold':24s}{'subset':16s}{'speakers':>9s}{'steps':>7s}{'CPU-s':>8s}{'wall-s':>8s}"
          f"{'cross EER':>11s}{'in EER':>9s}{'more EER':>10s}")
    for pt in results["points"]:
        e = pt["eer"]
        print(f"{pt['fold']:24s}{pt['size']:16s}{pt['speakers']:9d}{pt['steps'] or 0:7d}{pt['cpu_s'] or 0:8.0f}"
              f"{pt['seconds']:8.0f}" + "".join(pct(e.get(k), w) for k, w in (("cross", 11), ("in", 9), ("more", 10))))
    for fold, r in results["resemblyzer"].items():
        if r:
            print(f"{fold:24s}{'Resemblyzer':16s}{'':9s}{'':7s}{'':8s}{'':8s}"
                  + "".join(pct(r.get(k), w) for k, w in (("cross", 11), ("in", 9), ("more", 10))))
    fits = {}
    for kind in ("cross", "in", "more"):
        if kind not in args.lists:
            fits[kind] = {"intercept": None, "per_doubling": None, "resemblyzer_eer": None,
                          "reaches_resemblyzer_at": "-"}
            continue
        pts = [(pt["speakers"], pt["eer"][kind]) for pt in results["points"]
               if pt["size"] != "real-dev only" and kind in pt["eer"]]
        peers = [r[kind] for r in results["resemblyzer"].values() if r and kind in r]
        target = sum(peers) / len(peers) if len(peers) == len(folds) else None
        fit = trend(pts)
        fits[kind] = {"intercept": fit[0] if fit else None, "per_doubling": fit[1] if fit else None,
                      "resemblyzer_eer": target, "reaches_resemblyzer_at": reach(fit, target)}
        if fit:
            print(f"trend {kind:5s}: EER = {fit[0]:.2f} {fit[1]:+.2f} * log2(speakers) "
                  f"({fit[1]:+.2f} points per doubling); Resemblyzer's {kind} EER"
                  + (f" {target:.2f}%" if target is not None else " -") + f": reached at {reach(fit, target)}")
    results["trend"] = fits
    (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"results: {args.work / 'results.json'}")
    for kind in ("in", "more"):
        if fits[kind]["per_doubling"] is not None:
            print(f"learning_curve_eer_per_doubling_{kind}={fits[kind]['per_doubling']:.3f}")
    slope = fits["cross"]["per_doubling"]
    print(f"learning_curve_eer_per_doubling={slope:.3f}" if slope is not None
          else "learning_curve_eer_per_doubling=nan")


if __name__ == "__main__":
    main()
