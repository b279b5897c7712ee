"""GE2E loss forward+backward: dvector's GE2ELoss against the original project's approach.

The original built the similarity as an N*M*N*D tensor: every utterance against every centroid
(its own speaker's centroid leaving the utterance out), broadcast over D, then cosine along D.
``original_softmax_ge2e`` re-implements that from its description, for timing only; dvector's
loss uses one (N*M, D) x (D, N) matrix product plus an (N, M) correction of the own column.

    python benchmarks/bench_loss.py            # N=64, M=10, D=256, 2 threads
    python benchmarks/bench_loss.py -n 32 -r 50

The last printed line is ``ge2e_loss_speedup=<x>`` (original median / ours).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dvector.nn.loss import GE2ELoss


def original_softmax_ge2e(embeds: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """The original's vectorised softmax GE2E, summed: cosine over an (N, M, N, D) tensor."""
    N, M, D = embeds.shape
    totals = embeds.sum(dim=1, keepdim=True)  # (N, 1, D)
    centroids = totals / M  # (N, 1, D)
    exclusive = (totals - embeds) / (M - 1)  # (N, M, D)
    # Every utterance's row of centroids, its own speaker's one replaced by the exclusive centroid.
    own = torch.eye(N, dtype=torch.bool).view(N, 1, N, 1)  # (N, 1, N, 1)
    all_centroids = centroids.view(1, 1, N, D).expand(N, M, N, D)  # (N, M, N, D)
    candidates = torch.where(own, exclusive.unsqueeze(2), all_centroids)  # (N, M, N, D)
    utterances = embeds.unsqueeze(2).expand(N, M, N, D)  # (N, M, N, D)
    cos = F.cosine_similarity(utterances, candidates, dim=-1, eps=1e-8)  # (N, M, N)
    S = w * cos + b  # (N, M, N)
    log_p = torch.log_softmax(S, dim=-1)  # (N, M, N)
    target = torch.arange(N).view(N, 1, 1).expand(N, M, 1)  # (N, M, 1)
    return -log_p.gather(-1, target).sum()


def _median_ms(steps: list[Callable[[], None]], repeats: int, warmup: int) -> list[float]:
    """Median milliseconds of each step; the steps alternate so that load drift hits them alike."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, record in zip(steps, times):
            start = time.perf_counter()
            step()
            record.append((time.perf_counter() - start) * 1000.0)
    return [statistics.median(record) for record in times]


def time_loss(
    n_speakers: int = 64,
    n_utterances: int = 10,
    dim: int = 256,
    repeats: int = 30,
    warmup: int = 3,
    threads: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Median forward+backward milliseconds of both losses on one random (N, M, D) batch.

    Returns ``n_speakers``, ``n_utterances``, ``dim``, ``threads``, ``repeats``, ``ours_ms``,
    ``original_ms``, ``speedup`` (original / ours) and ``max_abs_diff`` (the two losses' values,
    a sanity check that both compute the same thing).
    """
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    embeds = F.normalize(torch.randn(n_speakers, n_utterances, dim, generator=gen), dim=-1)
    criterion = GE2ELoss("softmax", "sum")
    w = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-5.0, requires_grad=True)

    def ours() -> None:
        x = embeds.clone().requires_grad_(True)
        criterion.zero_grad(set_to_none=True)
        criterion(x).backward()

    def original() -> None:
        x = embeds.clone().requires_grad_(True)
        w.grad = b.grad = None
        original_softmax_ge2e(x, w, b).backward()

    with torch.no_grad():
        diff = abs(criterion(embeds).item() - original_softmax_ge2e(embeds, w, b).item())
    ours_ms, original_ms = _median_ms([ours, original], repeats, warmup)
    return {
        "n_speakers": n_speakers,
        "n_utterances": n_utterances,
        "dim": dim,
        "threads": threads,
        "repeats": repeats,
        "ours_ms": ours_ms,
        "original_ms": original_ms,
        "speedup": original_ms / ours_ms,
        "max_abs_diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--n-speakers", type=int, default=64)
    parser.add_argument("-m", "--n-utterances", type=int, default=10)
    parser.add_argument("-d", "--dim", type=int, default=256)
    parser.add_argument("-r", "--repeats", type=int, default=30)
    parser.add_argument("-t", "--threads", type=int, default=2)
    args = parser.parse_args()
    result = time_loss(args.n_speakers, args.n_utterances, args.dim, args.repeats, threads=args.threads)
    print(
        f"GE2E softmax loss, forward+backward, N={result['n_speakers']} M={result['n_utterances']} "
        f"D={result['dim']}, {result['threads']} threads, median of {result['repeats']}:"
    )
    print(f"  original (N*M*N*D cosine): {result['original_ms']:9.2f} ms")
    print(f"  dvector GE2ELoss:          {result['ours_ms']:9.2f} ms")
    print(f"  |loss difference|:         {result['max_abs_diff']:.2e}")
    print(f"ge2e_loss_speedup={result['speedup']:.1f}")


if __name__ == "__main__":
    main()
