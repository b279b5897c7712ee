"""Streaming GE2E loader throughput: shards on disk -> DataLoader with 2 workers -> batches.

Builds (once, cached in ``--data-dir``) a corpus much larger than a worker's pool: by default
1000 speakers x 40 utterances of 200-800 frames x 40 mels, float16, in speaker blocks of 20
utterances shuffled across 8 shards (the layout ``build-shards`` writes; the mels are synthetic,
written straight with :func:`dvector.shards.format.write_shard`, no audio). Then drives the real loader
(``ge2e_loader``, ``workers=2`` as training does) at N=64, M=10, L=160 and prints, over a steady
window after a warm-up:

- ``batches/s``: GE2E batches (float32 tensors in the main process) per second;
- ``fresh utterances/s``: utterances read from shards (and decoded) per second;
- ``batches per read utterance``: ``uses / utterances`` of the loader's stats, i.e. how many
  batches each utterance read from a shard served on average (each use is one row of one batch;
  an utterance never serves one batch twice). ``max_uses`` (2) caps it per utterance; the target
  is <= 2 on average, so that the loader really streams fresh data rather than recycling a pool.
  Counted exactly over the rounds (pools) that ended during the run: a pool's utterances are
  counted when it is read, its uses as its batches come, so a time window would cut rounds;
- ``speaker-pair mix``: how much more often the most frequent speaker pair met than chance gives.
  Speakers can only meet if they share a pool, so the chance model is per round (one pool):
  observed and chance-expected pair counts (:func:`dvector.stream.sampling.pair_cooccurrence`) of each
  round's batches are summed per pair over all rounds, and the ratio is the max over pairs
  expected to meet >= 5 times. Printed beside it is the same statistic for a null: the same
  rounds' speaker appearances dealt into batches uniformly at random. Near-equal numbers mean
  the loader mixes speakers as well as chance; fixed groups would give about S/(N-1);
- peak RSS (VmHWM of /proc/PID/status) of each DataLoader worker process (found as children of
  this process in /proc), and of the main process, with the current split into anonymous memory
  (the pool of samples read from shards), file pages (mapped libraries) and shared memory (batch
  buffers on their way to the main process);
  forked workers share pages with the main process, so Pss (proportional share,
  /proc/PID/smaps_rollup) is printed as well;
- CPU seconds each process used in the window (/proc/PID/stat), per batch: on a machine shared
  with other work, batches/s measures the share the loader got, CPU per batch what it costs.

    python benchmarks/bench_loader.py                   # N=64, M=10, L=160, workers=2
    python benchmarks/bench_loader.py --seconds 30 --data-dir /tmp/loader-bench
    python benchmarks/bench_loader.py --augment default   # with the training default's augmentation

The last printed line is ``loader_batches_per_s=<number>``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from dvector.stream.loader import ge2e_loader
from dvector.stream.sampling import SamplingStats, pair_cooccurrence
from dvector.files import write_json_atomic
from dvector.shards.format import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, shard_name, write_shard

N_MELS = 40


def build_corpus(out: Path, speakers: int, utterances: int, frames: tuple[int, int], block: int,
                 n_shards: int, seed: int = 0) -> dict:
    """Synthetic float16 mels in shuffled speaker blocks; cached: rebuilt only if the settings change."""
    settings = {"speakers": speakers, "utterances": utterances, "frames": list(frames), "block": block,
                "n_shards": n_shards, "seed": seed, "n_mels": N_MELS}
    stamp = out / "bench-settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings and (out / INDEX_NAME).exists():
        return json.loads((out / INDEX_NAME).read_text())
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    blocks = [(s, u0) for s in range(speakers) for u0 in range(0, utterances, block)]
    order = rng.permutation(len(blocks))
    per_shard = -(-len(blocks) // n_shards)
    centres = rng.standard_normal((speakers, N_MELS)).astype(np.float32) * 2.0

    def samples(chunk):
        for s, u0 in chunk:
            for u in range(u0, min(u0 + block, utterances)):
                g = np.random.default_rng([seed, s, u])
                T = int(g.integers(frames[0], frames[1] + 1))
                mel = (centres[s] + g.standard_normal((T, N_MELS), dtype=np.float32)).astype(np.float16)
                meta = {"speaker": f"bench/spk{s:05d}", "speaker_index": s, "source": f"spk{s:05d}/u{u:03d}.wav",
                        "n_frames": T, "duration_s": T / 100.0, "vad": 1.0}
                yield f"spk{s:05d}_u{u:03d}", mel, meta

    infos = []
    for k in range(n_shards):
        chunk = [blocks[i] for i in order[k * per_shard:(k + 1) * per_shard]]
        infos.append(write_shard(out / shard_name(k), samples(chunk)).to_dict())
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
             "config": {"features": {"n_mels": N_MELS, "sample_rate": 16000, "hop_ms": 10.0}},
             "totals": {"shards": n_shards, "utterances": sum(i["samples"] for i in infos),
                        "frames": sum(i["frames"] for i in infos), "speakers": speakers, "failures": 0},
             "speakers": [{"id": f"bench/spk{s:05d}", "index": s, "utterances": utterances} for s in range(speakers)],
             "shards": infos, "failures": []}
    write_json_atomic(out / INDEX_NAME, index)
    write_json_atomic(stamp, settings)
    print(f"built {index['totals']['utterances']} utterances in {n_shards} shards "
          f"({sum(i['bytes'] for i in infos) / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s")
    return index


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def proc_kb(pid: int, field: str, file: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def mix_ratios(rounds: dict[tuple[int, int], list[np.ndarray]], n_speakers: int, N: int,
               min_expected: float = 5.0, seed: int = 0) -> tuple[float, float]:
    """(loader, null) max observed/expected pair ratio, chance model per round, summed over rounds."""
    rng = np.random.default_rng(seed)

    def ratio(per_round: list[list[np.ndarray]]) -> float:
        O = np.zeros((n_speakers, n_speakers))
        E = np.zeros((n_speakers, n_speakers))
        for batches in per_round:
            spk, o, e = pair_cooccurrence(batches)
            ix = np.ix_(spk, spk)
            O[ix] += o
            E[ix] += e
        iu = np.triu_indices(n_speakers, 1)
        keep = E[iu] >= min_expected
        return float((O[iu][keep] / E[iu][keep]).max()) if keep.any() else float("nan")

    real = [b for b in rounds.values() if len(b) > 1]
    null = []
    for batches in real:
        appearances = rng.permutation(np.concatenate([np.unique(b) for b in batches]))
        null.append([appearances[i:i + N] for i in range(0, len(appearances), N)])
    return ratio(real), ratio(null)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "dvector-bench-loader")
    p.add_argument("--speakers", type=int, default=1000)
    p.add_argument("--utterances", type=int, default=40, help="per speaker")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--block", type=int, default=20, help="utterances per speaker block")
    p.add_argument("-n", "--n-speakers", type=int, default=64)
    p.add_argument("-m", "--n-utterances", type=int, default=10)
    p.add_argument("-l", "--seg-len", type=int, default=160)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pool-size", type=int, default=0, help="utterances per pool (0: the loader's default)")
    p.add_argument("--augment", default="none", help="online augmentation, as dvector train --augment takes it "
                   "(none, default, all, or a comma list)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    p.add_argument("--seconds", type=float, default=20.0, help="measured steady window")
    args = p.parse_args()

    index = build_corpus(args.data_dir, args.speakers, args.utterances, (200, 800), args.block, args.shards)
    N, M = args.n_speakers, args.n_utterances
    loader = ge2e_loader(args.data_dir, N, M, args.seg_len, workers=args.workers, seed=0, pool_size=args.pool_size,
                         augment=args.augment)
    pool = loader.settings.pool
    print(f"corpus: {index['totals']['utterances']} utterances, {args.speakers} speakers, {args.shards} shards; "
          f"pool {pool} utterances per worker; N={N} M={M} L={args.seg_len} workers={args.workers}; "
          f"augment {args.augment}")

    workers = max(1, args.workers)
    rounds: dict[tuple[int, int], list[np.ndarray]] = defaultdict(list)
    stats0 = None
    last_total = SamplingStats()
    round_utterances: dict[tuple[int, int], int] = {}
    round_uses: dict[tuple[int, int], int] = {}
    batches = 0
    wait_s = 0.0  # time the consumer spent waiting for the next batch inside the window
    t_start = time.perf_counter()
    t0 = None
    it = iter(loader)
    while True:
        before = time.perf_counter()
        mels, speakers = next(it)
        now = time.perf_counter()
        assert mels.shape == (N * M, args.seg_len, N_MELS), mels.shape
        w = (loader.next_worker - 1) % workers
        key = (w, loader.states[w].round)
        rounds[key].append(speakers[::M].numpy())
        total = SamplingStats(**loader.stats.to_dict())
        delta = SamplingStats(**{k: v - getattr(last_total, k) for k, v in total.to_dict().items()})
        last_total = total
        if key not in round_utterances:
            round_utterances[key] = delta.utterances  # a round's pool is counted with its first batch
        round_uses[key] = round_uses.get(key, 0) + delta.uses
        if t0 is None:
            if now - t_start >= args.warmup:
                t0, stats0 = now, SamplingStats(**loader.stats.to_dict())
                cpu0 = {pid: cpu_s(pid) for pid in [os.getpid(), *children(os.getpid())]}
            continue
        batches += 1
        wait_s += now - before
        if now - t0 >= args.seconds:
            break
    elapsed = time.perf_counter() - t0
    stats = SamplingStats(**{k: v - getattr(stats0, k) for k, v in loader.stats.to_dict().items()})
    kids = children(os.getpid())
    hwm = {pid: proc_kb(pid, "VmHWM") for pid in kids}
    pss = {pid: proc_kb(pid, "Pss", "smaps_rollup") for pid in kids}
    parts = {pid: {f: proc_kb(pid, f) // 1024 for f in ("RssAnon", "RssFile", "RssShmem")} for pid in kids}
    main_hwm = proc_kb(os.getpid(), "VmHWM")
    cpu = {pid: cpu_s(pid) - before for pid, before in cpu0.items()}
    del it

    rate = batches / elapsed
    fresh = stats.utterances / elapsed
    ended = [k for k in round_uses if any(w == k[0] and r > k[1] for w, r in round_uses)]
    served = sum(round_uses[k] for k in ended) / max(1, sum(round_utterances[k] for k in ended))
    mix, mix_null = mix_ratios(rounds, args.speakers, N)
    print(f"window: {batches} batches in {elapsed:.1f} s after {args.warmup:.0f} s warm-up "
          f"(consumer waited {100 * wait_s / elapsed:.0f}% of it)")
    print(f"batches/s: {rate:.1f}")
    print(f"fresh utterances read/s: {fresh:.0f}  ({stats.utterances} read, {stats.rounds} rounds ended)")
    print(f"batches per read utterance (uses/utterances over {len(ended)} ended rounds): {served:.2f}  "
          f"[window: unused {stats.unused}, dropped_short {stats.dropped_short}, "
          f"repeated_short {stats.repeated_short}, leftover uses {stats.leftover_uses}]")
    print(f"speaker-pair mix (max observed/chance over pairs, per-round chance): {mix:.2f}  "
          f"(uniformly random batches of the same rounds: {mix_null:.2f}; {len(rounds)} rounds)")
    for pid in kids:
        now_mb = ", ".join(f"{k[3:]} {v}" for k, v in parts[pid].items())
        print(f"worker pid {pid}: peak RSS {hwm[pid] / 1024:.0f} MB (now MB: {now_mb}), Pss {pss[pid] / 1024:.0f} MB, "
              f"CPU {100 * cpu.get(pid, float('nan')) / elapsed:.0f}%")
    print(f"main process: peak RSS {main_hwm / 1024:.0f} MB, CPU {100 * cpu[os.getpid()] / elapsed:.0f}%")
    cpu_ms = 1000 * sum(cpu.values()) / max(1, batches)
    print(f"loader CPU per batch (workers + main): {cpu_ms:.1f} ms; with {os.cpu_count()} cores to itself "
          f"the loader could give about {1000 * min(os.cpu_count() or 1, args.workers + 1) / cpu_ms:.0f} batches/s "
          f"(the rate above is what it gave with whatever else this machine was running)")
    print(f"peak_worker_rss_mb={max(hwm.values(), default=-1) / 1024:.0f}")
    print(f"loader_batches_per_s={rate:.1f}")


if __name__ == "__main__":
    main()
