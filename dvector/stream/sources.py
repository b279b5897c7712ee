"""Which shards each consumer (rank, DataLoader worker) reads, and positions in its stream.

Every pass over the data has a global shard order derived from ``(seed, pass)``. Ranks, then
DataLoader workers, take disjoint slices of it (``order[rank::world][worker::workers]``); where
there are fewer shards than consumers, consumers read the same shards but keep disjoint speaker
blocks instead. Where one consumer's slice cannot form a batch (a small corpus over many
consumers), that consumer reads every shard instead and keeps every ``slots``-th batch
(:mod:`dvector.stream.batches`). A position in a consumer's stream is ``(pass, shard in its list,
samples consumed in that shard)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


# ---- who reads what ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Consumer:
    """Which slice of the data one (rank, worker) reads."""

    rank: int = 0
    world: int = 1
    worker: int = 0
    workers: int = 1

    def describe(self) -> str:
        """``"the data loader"`` or ``"data loader worker 2 of rank 1"``: for messages."""
        parts = ([f"worker {self.worker}"] if self.workers > 1 else []) + ([f"rank {self.rank}"] if self.world > 1 else [])
        return "the data loader" + (f" ({', '.join(parts)})" if parts else "")

    @property
    def slot(self) -> int:
        """This consumer's number among all consumers, ``0 .. slots - 1``."""
        return self.rank * self.workers + self.worker

    @property
    def slots(self) -> int:
        """How many consumers read the data: ranks x workers."""
        return self.world * self.workers

    def assignment(self, order: Sequence[int]) -> tuple[list[int], int, int]:
        """(shards to read, block modulus, block remainder) for this consumer."""
        order = list(order)
        if len(order) >= self.world:
            mine = order[self.rank::self.world]
            if len(mine) >= self.workers:
                return mine[self.worker::self.workers], 1, 0
            return mine, self.workers, self.worker
        return order, self.slots, self.slot


@dataclass
class StreamPosition:
    pass_: int = 0  # pass over the data
    shard: int = 0  # position in this consumer's shard list of the pass
    sample: int = 0  # raw samples already consumed in that shard


def shard_order(n_shards: int, seed: int, pass_: int) -> list[int]:
    return np.random.default_rng([seed, pass_, 0x5EED]).permutation(n_shards).tolist()
