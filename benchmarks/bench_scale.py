"""How cost grows with corpus size: scanning, planning, resuming, the index, `check` and loader start.

    python benchmarks/bench_scale.py                  # trees of 10k and 100k files, indexes of 1k and 10k shards
    python benchmarks/bench_scale.py --million        # also the 1M-file tree (its first run writes 1M empty files)
    python benchmarks/bench_scale.py --data-dir /scratch/scale   # where the trees are kept (default /tmp/...)

1. Trees of N empty audio files (``ROOT/spkNNNNNN/uNNN.wav``, 100 files per speaker: N/100
   speakers) are written once under ``--data-dir`` and reused. Nothing is decoded: scanning and
   planning read names and sizes only. For each N, a fresh Python process (so that its peak RSS,
   ``ru_maxrss``, is that step's) times ``scan_roots`` and ``make_plan`` (default settings) and
   reports its peak memory above the process's own after imports.
2. Resume: in a fresh process, a build folder whose every shard is already complete (plan.json,
   an empty tar and a record per shard, made once; ``--shard-size 1000``: N/1000 shards) is
   handed to ``build_shards``: the time of a rerun that finds nothing to do (scan, plan, the
   plan check, stale temporary files, completeness of every shard, the index).
3. An index of S speakers and S shards (4 utterances per speaker, 20 x 40 float16 frames each,
   in blocks of 2: 4 samples per shard), written with the real shard writer: the time to collect
   and write ``index.json``, for a GE2E loader (``ge2e_loader``, 8 x 2, L=20, no worker
   processes) to give its first batch, and for ``check`` (one process) over every shard.

Each figure is printed with its growth ratio per 10x more files (or shards): ~10 is linear, ~100
quadratic. Wall and CPU seconds are both given: on a machine shared with other work the wall
clock of one size and the next may see different loads; CPU seconds are steadier. Targets (issue 12): linear or better, planning 1M files in under 2 GB. The last line
is ``scale_plan_1m_mb=<peak MB>`` with ``--million``, else ``scale_plan_100k_mb=<peak MB>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

FILES_PER_SPEAKER = 100
RESUME_SHARD_SIZE = 1000


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- data, made once -------------------------------------------------------------------------------

def make_tree(data: Path, n_files: int) -> Path:
    """``n_files`` empty .wav files in speaker folders of 100, under ``data/tree-N/root``; reused."""
    root = data / f"tree-{n_files}" / "root"
    done = root.parent / "complete"
    if done.exists():
        return root
    t0 = time.perf_counter()
    for s in range(n_files // FILES_PER_SPEAKER):
        folder = root / f"spk{s:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for u in range(FILES_PER_SPEAKER):
            os.close(os.open(folder / f"u{u:03d}.wav", os.O_CREAT | os.O_WRONLY, 0o644))
    done.write_text("ok\n")
    print(f"  (wrote {n_files} empty files in {time.perf_counter() - t0:.0f} s under {root})", flush=True)
    return root


def make_index_folder(data: Path, n: int) -> Path:
    """A shard folder of ``n`` speakers and ``n`` shards, with its build records; index.json is left
    to the measurement. Reused."""
    import numpy as np

    from dvector.config import BuildConfig
    from dvector.files import write_json_atomic
    from dvector.shards.build_folder import sidecar_path, state_dir
    from dvector.shards.format import FORMAT_NAME, FORMAT_VERSION, shard_name, write_shard

    out = data / f"index-{n}"
    done = out / ".build" / "complete"
    if done.exists():
        return out
    t0 = time.perf_counter()
    state_dir(out).mkdir(parents=True, exist_ok=True)
    cfg = BuildConfig()
    speakers = [f"bench/spk{s:06d}" for s in range(n)]
    rng = np.random.default_rng(0)
    blocks = [(s, b) for s in range(n) for b in range(2)]  # 2 blocks of 2 utterances per speaker
    order = rng.permutation(len(blocks))
    for shard in range(n):
        samples = []
        for s, b in (blocks[i] for i in order[2 * shard:2 * shard + 2]):
            for u in range(2):
                mel = rng.standard_normal((20, cfg.features.n_mels)).astype(np.float16)
                meta = {"speaker": speakers[s], "speaker_index": s, "root": "bench", "source": f"spk{s:06d}/u{2 * b + u}.wav",
                        "n_frames": 20, "duration_s": 0.2, "vad": 1.0, "input_rate": 16000}
                samples.append((f"s{s:06d}u{4 * s + 2 * b + u:09d}", mel, meta))
        info = write_shard(out / shard_name(shard), samples)
        counts: dict[str, list[int]] = {}
        for _, mel, meta in samples:
            entry = counts.setdefault(str(meta["speaker_index"]), [0, 0])
            entry[0] += 1
            entry[1] += int(mel.shape[0])
        write_json_atomic(sidecar_path(out, shard), {"shard": info.to_dict(), "failures": [], "speakers": counts})
    write_json_atomic(state_dir(out) / "plan.json", {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "config": cfg.to_dict(), "config_hash": cfg.hash(),
        "input_digest": "bench", "roots": {"bench": "bench"}, "speakers": speakers,
        "shards": [shard_name(i) for i in range(n)]})
    done.write_text("ok\n")
    print(f"  (wrote {n} shards in {time.perf_counter() - t0:.0f} s under {out})", flush=True)
    return out


# ---- measurements, each in a fresh process ------------------------------------------------------------

def child_scan(root: Path) -> dict:
    from dvector.config import BuildConfig
    from dvector.corpus import scan_roots
    from dvector.shards.plan import make_plan

    base = peak_mb()
    cfg = BuildConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    scan = scan_roots([str(root)], cfg.extensions)
    t1, c1 = time.perf_counter(), time.process_time()
    scan_mb = peak_mb() - base
    plan = make_plan(scan, cfg)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"files": len(scan.utterances), "speakers": len(scan.speakers), "shards": len(plan.shards),
            "scan_s": t1 - t0, "plan_s": t2 - t1, "scan_cpu": c1 - c0, "plan_cpu": c2 - c1,
            "scan_mb": scan_mb, "plan_mb": peak_mb() - base, "base_mb": base}


def child_resume(root: Path, out: Path) -> dict:
    from dvector.config import BuildConfig
    from dvector.corpus import scan_roots
    from dvector.shards.build import build_shards
    from dvector.shards.build_folder import is_complete, plan_record, prepare_folder, sidecar_path
    from dvector.shards.format import ShardInfo, shard_name
    from dvector.files import write_json_atomic
    from dvector.shards.plan import make_plan

    cfg = BuildConfig(shard_size=RESUME_SHARD_SIZE)
    done = out / ".build" / "complete"
    if not done.exists():  # every shard "complete": an empty tar and a record
        scan = scan_roots([str(root)], cfg.extensions)
        plan = make_plan(scan, cfg)
        out.mkdir(parents=True, exist_ok=True)
        prepare_folder(out, plan_record(plan, cfg, scan.root_names), overwrite=True)
        for k, shard in enumerate(plan.shards):
            (out / shard_name(k)).touch()
            counts: dict[str, list[int]] = {}
            for p in shard:
                counts.setdefault(str(p.speaker_index), [0, 0])[0] += 1
            write_json_atomic(sidecar_path(out, k), {"shard": ShardInfo(shard_name(k), samples=len(shard)).to_dict(),
                                                     "failures": [], "speakers": counts})
        done.write_text("ok\n")
    (out / "index.json").unlink(missing_ok=True)
    base = peak_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    report = build_shards([str(root)], out, cfg, workers=1)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert report.shards_written == 0 and report.index_written and all(is_complete(out, k) for k in range(report.shards_total))
    return {"shards": report.shards_total, "resume_s": wall, "resume_cpu": cpu, "resume_mb": peak_mb() - base}


def child_index(folder: Path) -> dict:
    from dvector.shards.build_folder import remove_stale_temps
    from dvector.shards.check import check_shards
    from dvector.shards.index import write_index
    from dvector.stream.loader import ge2e_loader

    (folder / "index.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    index = write_index(folder)
    t1 = time.perf_counter()
    n = len(index["shards"])
    remove_stale_temps(folder, range(n))
    t2 = time.perf_counter()
    loader = ge2e_loader(str(folder), n_speakers=8, n_utterances=2, seg_len=20, workers=0, seed=0)
    mels, speakers = next(iter(loader))
    t3 = time.perf_counter()
    assert tuple(mels.shape[:2]) == (16, 20), mels.shape
    report = check_shards(folder, workers=1)
    t4 = time.perf_counter()
    assert report.ok, report.problems[:3]
    return {"shards": n, "speakers": len(index["speakers"]), "index_s": t1 - t0, "stale_s": t2 - t1,
            "loader_s": t3 - t2, "check_s": t4 - t3}


def in_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- report --------------------------------------------------------------------------------------------

def growth(rows: list[tuple[int, dict]], key: str) -> str:
    """``a -> b (x r)`` per step of 10x."""
    parts = [f"{rows[0][1][key]:.3g}"]
    for (n0, r0), (n1, r1) in zip(rows, rows[1:]):
        ratio = r1[key] / r0[key] if r0[key] > 0 else float("inf")
        parts.append(f"{r1[key]:.3g} (x{ratio:.1f} for x{n1 // n0} more)")
    return " -> ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/dvector-bench-scale"))
    parser.add_argument("--million", action="store_true", help="also the 1M-file tree and a resume of its plan")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"scan": lambda: child_scan(Path(rest[0])), "resume": lambda: child_resume(Path(rest[0]), Path(rest[1])),
                  "index": lambda: child_index(Path(rest[0]))}[kind]()
        print(json.dumps(result))
        return
    data = args.data_dir
    data.mkdir(parents=True, exist_ok=True)
    sizes = [10_000, 100_000] + ([1_000_000] if args.million else [])
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; data in {data}", flush=True)
    scans = []
    for n in sizes:
        root = make_tree(data, n)
        r = in_child("scan", str(root))
        scans.append((n, r))
        print(f"{n:>9} files ({r['speakers']} speakers, {r['shards']} shards): scan {r['scan_s']:.2f} s "
              f"({r['scan_cpu']:.2f} s CPU), plan {r['plan_s']:.2f} s ({r['plan_cpu']:.2f} s CPU); peak memory above {r['base_mb']:.0f} MB at start: scan {r['scan_mb']:.0f} MB, "
              f"scan+plan {r['plan_mb']:.0f} MB", flush=True)
    resumes = []
    for n in sizes[1:]:
        r = in_child("resume", str(make_tree(data, n)), str(data / f"resume-{n}"))
        resumes.append((n, r))
        print(f"{n:>9} files, {r['shards']} shards all complete: resume (scan, plan, checks, index) {r['resume_s']:.2f} s "
              f"({r['resume_cpu']:.2f} s CPU), "
              f"peak +{r['resume_mb']:.0f} MB", flush=True)
    indexes = []
    for s in (1_000, 10_000):
        r = in_child("index", str(make_index_folder(data, s)))
        indexes.append((s, r))
        print(f"{s:>9} speakers and shards: index {r['index_s']:.2f} s, stale-temp sweep {r['stale_s']:.2f} s, "
              f"loader's first batch {r['loader_s']:.2f} s, check {r['check_s']:.2f} s", flush=True)
    print("growth per 10x:")
    for key in ("scan_s", "scan_cpu", "plan_s", "plan_cpu", "plan_mb"):
        print(f"  {key:<10} {growth(scans, key)}")
    if len(resumes) > 1:
        for key in ("resume_s", "resume_cpu"):
            print(f"  {key:<10} {growth(resumes, key)}")
    for key in ("index_s", "stale_s", "loader_s", "check_s"):
        print(f"  {key:<10} {growth(indexes, key)}")
    last_n, last = scans[-1]
    print(f"scale_plan_{last_n // 1000}k_mb={last['plan_mb']:.0f}" if last_n < 1_000_000
          else f"scale_plan_1m_mb={last['plan_mb']:.0f}")


if __name__ == "__main__":
    main()
