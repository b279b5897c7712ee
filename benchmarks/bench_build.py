"""build-shards throughput: seconds per hour of audio of each stage on one core, then end to end.

    python benchmarks/bench_build.py                       # 2 h of 16 kHz FLAC + 24 min of 48 kHz FLAC
    python benchmarks/bench_build.py --hours 0.2 --hours48 0.05    # a quick run
    python benchmarks/bench_build.py --corpus-dir /data/bench      # keep the corpus, reuse it next time
    python benchmarks/bench_build.py --roots LibriSpeech/dev-clean VCTK/wav48   # real corpora

1. A synthetic corpus (dvector.demo.synth voices, 3-10 s utterances with leading/trailing silence,
   background noise and, in some utterances, a long internal pause) is written in parallel: a
   16 kHz FLAC root and a 48 kHz root. With ``--roots`` each given root is a part instead; the
   first stands in for "the 16 kHz FLAC part".
2. On ONE core (this process, BLAS limited to one thread, after a warm-up so numba compilation is
   not counted) every stage of dvector's pipeline is timed over a sample of each part (at least
   ``--sample-minutes`` of audio): decode (soundfile, mono), resample (soxr, files not at 16 kHz),
   VAD (trim_silence), features (log_mel + float16) and writing (write_shard of the results);
   each stage counts its fastest of ``--stage-repeats`` passes over the sample. Seconds per
   hour of audio are printed per part and for the whole corpus.
3. ``dvector.shards.build.build_shards`` runs with all workers into a fresh folder, timed by the wall
   clock from the call to its return (scan, plan, processing, shards, index), on the first part
   alone and on everything (median of ``--repeats`` runs); ×realtime = hours of input audio /
   wall hours. For information the CLI is also timed in a fresh process (interpreter start,
   imports and cold numba kernels included). The load average is printed: the numbers mean
   little when other processes are using the cores.

Targets (issue 2): end-to-end ×realtime >= 0.8 × workers × 3600 / (sum of per-stage s per hour),
and >= 3000× on the 16 kHz FLAC part. The last line is ``build_xrt=<x>`` (the whole corpus).

``--kaldi``: instead, the same files built from their roots and from a Kaldi data directory that lists
them (``wav.scp`` of absolute paths, ``utt2spk``), alternately, ``--repeats`` times each; the median
×realtime of both, and last ``kaldi_build_speed_ratio=<Kaldi ÷ root>`` (target >= 0.95: the scan is
the only difference).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from threadpoolctl import threadpool_limits

from dvector.demo import synth
from dvector.corpus import CorpusInputs, scan_roots
from dvector.signal.audio import decode, resample, to_mono
from dvector.shards.build import build_shards, keep_freed_memory
from dvector.config import BuildConfig
from dvector.signal.features import log_mel
from dvector.shards.format import write_shard
from dvector.signal.vad import trim_silence

MANIFEST = "bench_corpus.json"
STAGES = ("decode", "resample", "vad", "features", "writing")
GENERATOR_VERSION = 1  # bump when the corpus recipe changes, so an old corpus is not reused


# ---- corpus ------------------------------------------------------------------------------------

def bench_utterance(voice: synth.Voice, duration_s: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Speech with 0.3-1.0 s of silence at each end, and in a third of them a 0.6-1.5 s pause inside."""
    lead, trail = (int(rng.uniform(0.3, 1.0) * rate) for _ in range(2))
    speech_s = max(0.5, duration_s - (lead + trail) / rate)
    if rng.random() < 1 / 3:
        pause = np.zeros(int(rng.uniform(0.6, 1.5) * rate), np.float32)
        speech_s = max(0.5, speech_s - pause.size / rate)
        split = rng.uniform(0.3, 0.7)
        body = np.concatenate([synth.speech(voice, speech_s * split, rate, rng), pause,
                               synth.speech(voice, speech_s * (1 - split), rate, rng)])
    else:
        body = synth.speech(voice, speech_s, rate, rng)
    wav = np.concatenate([np.zeros(lead, np.float32), body, np.zeros(trail, np.float32)])
    wav *= np.float32(rng.uniform(0.3, 1.0))  # recording levels differ
    wav += (10 ** (rng.uniform(-60, -40) / 20) * rng.standard_normal(wav.size)).astype(np.float32)
    return np.clip(wav, -1, 1)


def _write_speaker(job: tuple[str, int, int, float, int, str, str]) -> float:
    """Write one speaker's folder; returns the seconds of audio written. Runs in a worker."""
    root, part_id, speaker, seconds, rate, ext, subtype = job
    rng = np.random.default_rng([GENERATOR_VERSION, part_id, speaker])
    voice = synth.random_voice(rng)
    folder = Path(root) / f"spk{speaker:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    total, u = 0.0, 0
    while total < seconds:
        wav = bench_utterance(voice, float(rng.uniform(3.0, 10.0)), rate, rng)
        sf.write(str(folder / f"utt{u:04d}.{ext}"), wav, rate, subtype=subtype)
        total += wav.size / rate
        u += 1
    return total


def corpus_parts(args: argparse.Namespace) -> list[dict]:
    parts = [dict(name="flac16k", label="16 kHz FLAC", hours=args.hours, rate=16000, ext="flac",
                  subtype="PCM_16", speakers=args.speakers)]
    if args.hours48 > 0:
        ext48 = args.format48
        parts.append(dict(name=f"{ext48}48k", label=f"48 kHz {ext48.upper()}", hours=args.hours48, rate=48000,
                          ext=ext48, subtype="PCM_16", speakers=args.speakers48))
    return parts


def ensure_corpus(corpus_dir: Path, parts: list[dict], processes: int) -> list[str]:
    """Generate the parts under ``corpus_dir`` (or reuse them if made with the same settings)."""
    manifest = corpus_dir / MANIFEST
    want = {"generator": GENERATOR_VERSION, "parts": parts}
    roots = [str(corpus_dir / p["name"]) for p in parts]
    if manifest.exists() and json.loads(manifest.read_text()) == want and all(os.path.isdir(r) for r in roots):
        print(f"corpus: reusing {corpus_dir}", flush=True)
        return roots
    if manifest.exists():
        manifest.unlink()
    corpus_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for part_id, p in enumerate(parts):
        root = corpus_dir / p["name"]
        shutil.rmtree(root, ignore_errors=True)
        per_speaker = p["hours"] * 3600 / p["speakers"]
        jobs += [(str(root), part_id, s, per_speaker, p["rate"], p["ext"], p["subtype"]) for s in range(p["speakers"])]
    total_h = sum(p["hours"] for p in parts)
    print(f"corpus: writing {total_h:.2f} h of audio ({len(jobs)} speakers) to {corpus_dir} "
          f"with {processes} processes", flush=True)
    t0 = time.perf_counter()
    done_s, next_report = 0.0, 0.1
    with mp.get_context("fork").Pool(processes) as pool:
        for i, secs in enumerate(pool.imap_unordered(_write_speaker, jobs, chunksize=1)):
            done_s += secs
            if (i + 1) / len(jobs) >= next_report or i + 1 == len(jobs):
                print(f"  {i + 1}/{len(jobs)} speakers, {done_s / 3600:.2f} h, {time.perf_counter() - t0:.0f} s",
                      flush=True)
                next_report += 0.1
    manifest.write_text(json.dumps(want, indent=1) + "\n")
    return roots


# ---- one-core stage timing ---------------------------------------------------------------------

def sample_files(root: str, cfg: BuildConfig, minutes: float, seed: int) -> tuple[list[Path], float]:
    """A random sample of the root's files holding at least ``minutes`` of audio (by header)."""
    paths = [u.path for u in scan_roots([root], cfg.extensions).utterances]
    order = np.random.default_rng(seed).permutation(len(paths))
    chosen, seconds = [], 0.0
    for i in order:
        if seconds >= minutes * 60:
            break
        try:
            info = sf.info(str(paths[i]))
        except Exception:
            continue
        chosen.append(paths[i])
        seconds += info.frames / info.samplerate
    return sorted(chosen), seconds


def time_stages(paths: list[Path], cfg: BuildConfig, out_dir: Path, repeats: int = 1) -> dict:
    """Per-stage seconds over ``paths`` in this process, mirroring dvector.signal.process.process_file.

    ``repeats`` passes over all the files (each file once per pass, as a build sees it); each stage
    counts its total of the fastest pass, so that other load on the machine inflates it less.
    """
    fcfg, vcfg, clock = cfg.features, cfg.vad, time.perf_counter
    passes = []
    for _ in range(repeats):
        sec = dict.fromkeys(STAGES, 0.0)
        audio_s = resampled_s = 0.0
        samples = []
        for n, path in enumerate(paths):
            t0 = clock()
            data, rate = decode(path)
            if data.shape[0] == 0 or not np.all(np.isfinite(data)):
                continue
            wav = to_mono(data)
            t1 = clock()
            wav = resample(wav, rate, fcfg.sample_rate)
            t2 = clock()
            trimmed, kept = trim_silence(wav, fcfg.sample_rate, vcfg)
            t3 = clock()
            mel = log_mel(trimmed, fcfg).astype(np.float16)
            t4 = clock()
            for stage, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                sec[stage] += dt
            duration = data.shape[0] / rate
            audio_s += duration
            if rate != fcfg.sample_rate:
                resampled_s += duration
            samples.append((f"u{n:06d}", mel, {"speaker": path.parent.name, "speaker_index": 0, "source": path.name,
                                                "duration_s": round(duration, 4), "vad": round(kept, 4),
                                                "input_rate": rate, "n_frames": int(mel.shape[0])}))
        t0 = clock()
        write_shard(out_dir / "shard-000000.tar", samples)
        sec["writing"] = clock() - t0
        del samples
        passes.append(sec)
    best = {stage: min(p[stage] for p in passes) for stage in STAGES}
    return {"seconds": best, "audio_s": audio_s, "resampled_s": resampled_s, "files": n + 1}


def warm_up(paths: list[Path], cfg: BuildConfig, out_dir: Path) -> None:
    """Compile/load the numba kernels and touch every code path once, off the clock."""
    time_stages(paths[:3], cfg, out_dir)
    resample(np.random.default_rng(0).standard_normal(48000).astype(np.float32), 48000, cfg.features.sample_rate)


def per_hour(result: dict) -> dict[str, float]:
    hours = result["audio_s"] / 3600
    return {s: result["seconds"][s] / hours for s in STAGES}


# ---- end to end --------------------------------------------------------------------------------

def run_build(roots: list[str] | CorpusInputs, cfg: BuildConfig, workers: int, tmp: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="build-", dir=tmp))
    self0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    report = build_shards(roots, out, cfg, workers=workers)
    wall = time.perf_counter() - t0
    self1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(out, ignore_errors=True)
    cpu = lambda a, b: (b.ru_utime - a.ru_utime) + (b.ru_stime - a.ru_stime)  # noqa: E731
    return {"wall": wall, "audio_s": report.audio_s, "xrt": report.audio_s / wall, "files": report.utterances_ok,
            "failures": len(report.failures), "shards": report.shards_written, "stage_s": dict(report.stage_s),
            "parent_cpu": cpu(self0, self1), "worker_cpu": cpu(kids0, kids1)}


def kaldi_dir_of(roots: list[str], cfg: BuildConfig, folder: Path) -> Path:
    """A Kaldi data directory listing every file of ``roots`` (speakers ``ROOT_SPEAKER``, absolute paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    scan = scan_roots(roots, cfg.extensions)
    lines = [(f"{u.speaker.replace('/', '_')}-{n:07d}", u) for n, u in enumerate(scan.utterances)]
    (folder / "wav.scp").write_text("".join(f"{uid} {u.path}\n" for uid, u in lines))
    (folder / "utt2spk").write_text("".join(f"{uid} {u.speaker.replace('/', '_')}\n" for uid, u in lines))
    return folder


def compare_kaldi(roots: list[str], cfg: BuildConfig, workers: int, repeats: int, tmp: Path) -> float:
    """Root builds and Kaldi builds of the same files, alternately; prints both; returns Kaldi ÷ root speed."""
    data = kaldi_dir_of(roots, cfg, tmp / "kaldi" / "bench")
    warm_page_cache(roots)
    runs: dict[str, list[dict]] = {"roots": [], "kaldi": []}
    for _ in range(repeats):
        runs["roots"].append(run_build(roots, cfg, workers, tmp))
        runs["kaldi"].append(run_build(CorpusInputs(kaldi=(str(data),)), cfg, workers, tmp))
    medians = {}
    for name, reps in runs.items():
        medians[name] = statistics.median(r["xrt"] for r in reps)
        print(f"{name:<6} {reps[0]['audio_s'] / 3600:.2f} h, {reps[0]['files']} files: "
              + ", ".join(f"{r['wall']:.2f} s" for r in reps) + f" -> {medians[name]:.0f}x realtime (median)")
    return medians["kaldi"] / medians["roots"]


def run_cli(roots: list[str], workers: int, tmp: Path) -> float:
    """Wall seconds of ``dvector build-shards`` in a fresh process (interpreter start, imports, cold kernels)."""
    out = Path(tempfile.mkdtemp(prefix="cli-", dir=tmp))
    cmd = [sys.executable, "-m", "dvector", "build-shards", "-o", str(out), "-j", str(workers), *roots]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return wall


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]), fields[3] + fields[4]  # total, idle + iowait


def load_note(seconds: float = 1.0) -> str:
    """How busy the CPUs are with other work, measured while this process waits."""
    first = _cpu_times()
    if first is None:
        one = os.getloadavg()[0]
        return f"load average {one:.2f}" + ("  << other processes are using the CPU: timings are not reliable" if one > 0.5 else "")
    time.sleep(seconds)
    second = _cpu_times()
    total, idle = second[0] - first[0], second[1] - first[1]
    busy = (total - idle) / total if total else 0.0
    cores = os.cpu_count() or 1
    note = f"other processes busy: {busy * cores:.2f} of {cores} cores"
    return note + ("  << timings are not reliable" if busy * cores > 0.2 else "")


def warm_page_cache(roots: list[str]) -> None:
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    while f.read(1 << 20):
                        pass


# ---- main --------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roots", nargs="+", help="existing corpus roots instead of a generated corpus")
    ap.add_argument("--corpus-dir", type=Path, help="generate the corpus here and keep it (reused if settings match)")
    ap.add_argument("--hours", type=float, default=2.0, help="hours of 16 kHz FLAC (default 2)")
    ap.add_argument("--hours48", type=float, default=0.4, help="hours of 48 kHz audio (default 0.4; 0: none)")
    ap.add_argument("--format48", choices=("flac", "wav"), default="flac", help="format of the 48 kHz part")
    ap.add_argument("--speakers", type=int, default=120, help="speakers in the 16 kHz part")
    ap.add_argument("--speakers48", type=int, default=24, help="speakers in the 48 kHz part")
    ap.add_argument("--sample-minutes", type=float, default=20.0, help="audio per part timed stage by stage")
    ap.add_argument("--stage-repeats", type=int, default=3, help="passes over the sample; each stage counts its fastest pass")
    ap.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1, help="build workers (default: all cores)")
    ap.add_argument("-r", "--repeats", type=int, default=3, help="end-to-end runs per corpus; the median is reported")
    ap.add_argument("--no-cli", action="store_true", help="skip timing the CLI in a fresh process (informational)")
    ap.add_argument("--gen-processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kaldi", action="store_true", help="compare a Kaldi-directory build of the same files with "
                    "the root build (last line kaldi_build_speed_ratio=)")
    args = ap.parse_args()

    cfg = BuildConfig()
    tmp_holder = tempfile.TemporaryDirectory(prefix="bench_build-")
    tmp = Path(tmp_holder.name)
    try:
        if args.roots:
            roots = [str(r) for r in args.roots]
            labels = [Path(r).name for r in roots]
        else:
            parts = corpus_parts(args)
            t0 = time.perf_counter()
            roots = ensure_corpus(args.corpus_dir or tmp / "corpus", parts, args.gen_processes)
            labels = [p["label"] for p in parts]
            print(f"corpus: ready in {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"machine: {os.cpu_count()} cores, workers={args.workers}, python {sys.version.split()[0]}; "
              f"{load_note()}", flush=True)
        if args.kaldi:
            ratio = compare_kaldi(roots, cfg, args.workers, args.repeats, tmp)
            print(load_note())
            print(f"kaldi_build_speed_ratio={ratio:.3f}")
            return

        # -- stages on one core, with the memory setting the build's workers and the CLI use
        keep_freed_memory()
        results = []
        with threadpool_limits(1):
            for i, (root, label) in enumerate(zip(roots, labels)):
                paths, _ = sample_files(root, cfg, args.sample_minutes, args.seed)
                total_s = sum(sf.info(str(u.path)).duration for u in scan_roots([root], cfg.extensions).utterances)
                stage_dir = Path(tempfile.mkdtemp(prefix="stages-", dir=tmp))
                warm_page_cache([root])
                warm_up(paths, cfg, stage_dir)
                res = time_stages(paths, cfg, stage_dir, args.stage_repeats)
                shutil.rmtree(stage_dir, ignore_errors=True)
                res.update(label=label, root=root, total_s=total_s)
                results.append(res)

        print()
        print(f"per-stage seconds per hour of audio, one core (BLAS 1 thread), sample of each part, fastest of {args.stage_repeats}:")
        head = f"{'part':<16}{'sampled':>10}{'corpus':>9}" + "".join(f"{s:>10}" for s in STAGES) + f"{'sum':>9}{'1-core x':>10}"
        print(head)
        print("-" * len(head))
        overall = dict.fromkeys(STAGES, 0.0)
        corpus_h = sum(r["total_s"] for r in results) / 3600
        resample_need_h = 0.0
        for r in results:
            ph = per_hour(r)
            for s in STAGES:  # weighted by each part's share of the whole corpus
                overall[s] += ph[s] * (r["total_s"] / 3600) / corpus_h
            if r["resampled_s"] > 0:
                resample_need_h += r["total_s"] / 3600 * r["resampled_s"] / r["audio_s"]
            r["per_hour"] = ph
            total = sum(ph.values())
            print(f"{r['label']:<16}{r['audio_s'] / 60:>8.1f}m{r['total_s'] / 3600:>8.2f}h"
                  + "".join(f"{ph[s]:>10.2f}" for s in STAGES) + f"{total:>9.2f}{3600 / total:>9.0f}x")
        total_all = sum(overall.values())
        if len(results) > 1:
            print(f"{'overall':<16}{sum(r['audio_s'] for r in results) / 60:>8.1f}m{corpus_h:>8.2f}h"
                  + "".join(f"{overall[s]:>10.2f}" for s in STAGES) + f"{total_all:>9.2f}{3600 / total_all:>9.0f}x")
        rs = sum(r["seconds"]["resample"] for r in results)
        rs_h = sum(r["resampled_s"] for r in results) / 3600
        if rs_h > 0:
            print(f"resample: {rs / rs_h:.2f} s per hour of audio that needed it (not at {cfg.features.sample_rate} Hz), "
                  f"{overall['resample']:.2f} s per hour overall ({resample_need_h:.2f} of {corpus_h:.2f} h need it)")
        else:
            print("resample: no file needed it")

        # -- end to end
        warm_page_cache(roots)
        print()
        print(f"end to end: dvector.shards.build.build_shards, {args.workers} workers, fresh output folder, "
              f"wall clock incl. scan and index, median of {args.repeats}; {load_note()}")
        runs = [("first part" if args.roots else labels[0], roots[:1], sum(results[0]["per_hour"].values()))]
        if len(roots) > 1:
            runs.append(("everything", roots, total_all))
        xrts = {}
        for name, rts, stage_sum in runs:
            reps = [run_build(rts, cfg, args.workers, tmp) for _ in range(args.repeats)]
            xrt = statistics.median(r["xrt"] for r in reps)
            xrts[name] = xrt
            rep = sorted(reps, key=lambda r: r["xrt"])[(len(reps) - 1) // 2]  # the median run (lower middle)
            target = 0.8 * args.workers * 3600 / stage_sum
            print(f"{name:<14} {rep['audio_s'] / 3600:.2f} h, {rep['files']} files, {rep['shards']} shards, "
                  f"{rep['failures']} failures: " + ", ".join(f"{r['wall']:.2f} s" for r in reps)
                  + f" -> {xrt:.0f}x realtime")
            cpu_h = rep["audio_s"] / 3600
            print(f"{'':<14} cpu per hour of audio: workers {rep['worker_cpu'] / cpu_h:.2f} s, "
                  f"parent {rep['parent_cpu'] / cpu_h:.2f} s; stages as timed inside the build (s/h): "
                  + ", ".join(f"{s} {v / cpu_h:.2f}" for s, v in rep["stage_s"].items()))
            print(f"{'':<14} target 0.8 x {args.workers} x 3600 / {stage_sum:.2f} = {target:.0f}x: "
                  f"{'met' if xrt >= target else 'NOT met'}")
            if name != "everything":
                print(f"{'':<14} target 3000x on the 16 kHz FLAC part: {'met' if xrt >= 3000 else 'NOT met'}")
        if not args.no_cli:
            walls = [run_cli(roots, args.workers, tmp) for _ in range(args.repeats)]
            audio_h = sum(r["total_s"] for r in results) / 3600
            print(f"{'CLI':<14} `python -m dvector build-shards` on everything in a fresh process (interpreter, imports, "
                  f"cold numba kernels): " + ", ".join(f"{w:.2f} s" for w in walls)
                  + f" -> {audio_h * 3600 / statistics.median(walls):.0f}x realtime (informational)")
        print(load_note())
        print(f"build_xrt={xrts.get('everything', xrts[runs[0][0]]):.1f}")
    finally:
        tmp_holder.cleanup()


if __name__ == "__main__":
    main()
