"""Every good sample of some shard URLs, once, in order: what a validation set is read from.

The shards are read as the training stream reads them (:class:`dvector.stream.samples.SampleStream`,
the same checks, retries and timeouts): a bad sample (undecodable ``.npy``, an object array, bad
metadata) is skipped with a warning naming the shard and key, and a broken, missing or unreachable
shard from there on with a warning naming it; both are counted in a :class:`ReadReport`, each
damaged sample and shard once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from dvector.stream.samples import SampleStream
from dvector.stream.sources import Consumer

__all__ = ["ReadReport", "good_samples"]


@dataclass
class ReadReport:
    """What reading some shards skipped."""

    bad_samples: int = 0  # samples skipped as bad
    bad_shards: int = 0  # shards (or their rest) skipped as broken, missing or unreachable

    def to_dict(self) -> dict[str, int]:
        """The counts as plain values (for a checkpoint's counters or a summary)."""
        return {"bad_samples": self.bad_samples, "bad_shards": self.bad_shards}

    def describe(self) -> str:
        """``"2 bad samples and 1 broken shard skipped"``, or ``""`` when nothing was."""
        if not (self.bad_samples or self.bad_shards):
            return ""
        samples = f"{self.bad_samples} bad sample{'s' * (self.bad_samples != 1)}"
        shards = f"{self.bad_shards} broken, missing or unreachable shard{'s' * (self.bad_shards != 1)}"
        return f"{samples} and {shards} skipped"


def good_samples(urls: Sequence[str], report: ReadReport | None = None, *, n_mels: int | None = None,
                 max_speaker_index: int | None = None) -> Iterator[dict]:
    """The decoded samples (``{"__key__", "__url__", "mel", **metadata}``) of ``urls``, shard by
    shard, each once; damage is skipped with a warning naming it and counted in ``report``.

    Every sample has ``n_mels`` mel bands (None: those of the first good one) and a speaker_index
    up to ``max_speaker_index``; others are bad samples. A source that stops answering altogether
    still raises :class:`DvectorError`, as in training.
    """
    report = report if report is not None else ReadReport()
    stream = SampleStream(urls, Consumer(), seed=0, on_error="warn", n_mels=n_mels,
                          max_speaker_index=max_speaker_index)
    counted = (0, 0)
    for url in urls:
        try:
            for _, sample in stream.shard_samples(url, 0, 1, 0):
                if sample is not None:
                    yield sample
        finally:
            now = getattr(stream, "bad_samples", 0), getattr(stream, "bad_shards", 0)
            report.bad_samples += now[0] - counted[0]
            report.bad_shards += now[1] - counted[1]
            counted = now
