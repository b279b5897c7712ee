"""One consumer's endless stream of decoded samples from shard URLs, with positions to resume from.

Which shards a consumer reads, in which order, is :mod:`dvector.stream.sources`'s; this module reads them.

Each shard is read by :func:`dvector.shards.reader.read_samples` (the one decoder, its checks);
this module decides what to do with damage: skip with a warning naming the shard (or raise), count
what it skipped, open a remote shard again where its stream broke, and stop when the data is gone.

How long a dead server takes to stop training, with the defaults (stall timeout S = 60 s,
``DVECTOR_STALL_TIMEOUT``): a read that gets no byte for S seconds fails (the download or
``pipe:`` command is killed). The index.json beside remote shards is read first, once: a server
that accepts and never answers stops the job there, after S (60 s). A server that stops answering
mid-stream: the shard being read stalls (S), is opened again where it broke (``REMOTE_RETRIES``,
but each further try that stalls counts too), and ``MAX_STALLS_IN_A_ROW`` (2) stalls without a
sample between them stop the stream with a :class:`DvectorError`: 2 x S = 120 s, under 3 minutes,
however many shards there are. Shards that fail fast (refused connection, 404, damage) are skipped
and counted; a whole pass without a usable sample (two in a row, as a resumed pass may be partial)
stops the stream too.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Callable, Iterable, Iterator, Sequence

from dvector.errors import DvectorError
from dvector.shards.format import is_remote
from dvector.shards.reader import SampleChecks, read_samples
from dvector.shards.streams import STALL_ENV, StallError
from dvector.stream.sources import Consumer, StreamPosition, shard_order

REMOTE_RETRIES = 3  # times a remote shard whose stream broke is opened again where it broke
MAX_STALLS_IN_A_ROW = 2  # reads that stalled with no sample between them: the data source is gone


class SampleStream:
    """Endless decoded samples of one consumer, from a position; skips broken shards with a warning.

    Only ``KEY.mel.npy`` and ``KEY.json`` members are read; other members are skipped unread.
    A bad sample (undecodable ``.npy``, an object array that would need pickle, bad metadata) is
    skipped with a warning naming the shard and key; a broken shard (truncated, damaged tar header,
    a failing URL or ``pipe:`` command, or more than ``MAX_BAD_SAMPLES`` (:mod:`dvector.shards.reader`) bad samples) is skipped
    from there on, with a warning naming it. ``on_error="raise"`` raises :class:`DvectorError`
    instead. Samples of speakers in ``exclude`` (speaker_index) are passed over without decoding.

    Every sample must have ``n_mels`` mel bands (None: as many as the stream's first good sample)
    and a speaker_index in ``0..max_speaker_index`` (None: any sane one); others are bad samples.
    ``bad_samples`` and ``bad_shards`` count the distinct damaged samples and shards found so far: one
    read again (the next pass) is skipped again, but neither warned about nor counted again; ``known``
    (ids from :attr:`damage` of an earlier stream, e.g. a checkpoint's) were counted already. Where
    consumers read the same shards, one of them counts (and warns about) each piece of damage:
    ``counted_by=(slot, slots)`` (a consumer reading every shard in the shared mode of
    :mod:`dvector.stream.batches`) counts the shards whose number is ``slot`` modulo ``slots``, and a
    broken shard read by consumers keeping each other's speaker blocks is counted by remainder 0. A read that
    stalls (no bytes for the stall timeout) skips the shard too; ``MAX_STALLS_IN_A_ROW`` stalls
    with no sample between them raise :class:`DvectorError` (the server or command is gone).
    """

    def __init__(self, urls: Sequence[str], consumer: Consumer, seed: int, on_error: str = "warn",
                 exclude: Iterable[int] = (), *, n_mels: int | None = None, max_speaker_index: int | None = None,
                 known: Iterable[str] = (), counted_by: tuple[int, int] | None = None):
        if on_error not in ("warn", "raise"):
            raise DvectorError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        self.urls, self.consumer, self.seed, self.on_error = list(urls), consumer, seed, on_error
        self.exclude = frozenset(int(s) for s in exclude)
        self.checks = SampleChecks(n_mels, max_speaker_index)
        self.bad_samples = 0  # distinct samples skipped as bad (undecodable, non-finite, out of range...)
        self.bad_shards = 0  # distinct shards whose rest was skipped (broken, unreachable, stalled)
        self.stalls = 0  # reads that stalled since the last sample
        self.damage: set[str] = set(known)  # what was counted: shard URLs, and "URL KEY" of bad samples
        self.counted_by = counted_by
        self._numbers = {u: i for i, u in enumerate(self.urls)}
        self._remainder = 0  # of the shard being read: consumers sharing it keep each other's speaker blocks

    def _first_sighting(self, url: str, key: str | None) -> bool:
        """Whether this damage (a broken shard, or sample ``key`` of it) is new and this stream's to count."""
        if self.counted_by is not None:
            slot, slots = self.counted_by
            number = self._numbers.get(url)
            if number is not None and number % slots != slot:
                return False
        if key is None and self._remainder != 0:
            return False
        ident = url if key is None else f"{url} {key}"
        if ident in self.damage:
            return False
        self.damage.add(ident)
        return True

    def _fail(self, url: str, exc: BaseException) -> None:
        first = self._first_sighting(url, None)
        self.bad_shards += first
        message = f"shard {url}: {type(exc).__name__}: {exc}"
        if self.on_error == "raise":
            raise DvectorError(message) from exc
        if first:
            warnings.warn(f"skipping the rest of {message}", RuntimeWarning, stacklevel=2)

    def _bad_sample(self, url: str, key: str, exc: BaseException) -> None:
        first = self._first_sighting(url, key)
        self.bad_samples += first
        message = f"shard {url}, sample {key!r}: {type(exc).__name__}: {exc}"
        if self.on_error == "raise":
            raise DvectorError(message) from exc
        if first:
            warnings.warn(f"skipping {message}", RuntimeWarning, stacklevel=2)

    def _stalled(self, url: str, exc: StallError) -> None:
        """One more read that stalled with no sample since the last: too many, and the source is gone."""
        self.stalls += 1
        if self.stalls >= MAX_STALLS_IN_A_ROW:
            raise DvectorError(f"shard {url}: {exc}; {self.stalls} reads in a row stalled without giving a "
                               f"sample: the server or command is not answering (raise {STALL_ENV} if it is "
                               "only slow)") from exc

    def shard_samples(self, url: str, start: int, modulus: int, remainder: int,
                       skip_key: Callable[[str], bool] | None = None) -> Iterator[tuple[int, dict | None]]:
        """(raw position after this sample, decoded sample) of one shard from raw position ``start``.

        A sample whose key ``skip_key`` accepts comes as ``None``, its mel neither read nor decoded.
        A remote shard whose stream breaks after giving samples is opened again and read on from
        there (up to ``REMOTE_RETRIES`` times); otherwise the rest of a broken shard is skipped with
        a warning (or :class:`DvectorError` with ``on_error="raise"``).
        """
        retries = 0
        self._remainder = remainder if modulus > 1 else 0
        while True:
            progressed = False
            try:
                for position, sample in read_samples(url, start, modulus, remainder, skip_key, self.exclude,
                                                     self._bad_sample, checks=self.checks):
                    start, progressed, self.stalls = position, True, 0
                    yield position, sample
                return
            except DvectorError:
                raise
            except Exception as exc:  # truncated tar, damaged header, failing, stalled URL or command
                if isinstance(exc, StallError):
                    self._stalled(url, exc)
                if is_remote(url) and progressed and retries < REMOTE_RETRIES:
                    retries += 1
                    warnings.warn(f"shard {url}: {type(exc).__name__}: {exc}; opening it again at sample {start}",
                                  RuntimeWarning, stacklevel=2)
                    continue
                self._fail(url, exc)
                return

    def samples(self, start: StreamPosition,
                skip_key: Callable[[str], bool] | None = None) -> Iterator[tuple[StreamPosition, dict | None]]:
        """(position after the sample, sample) pairs from ``start`` on, forever; ``None`` for a sample
        whose key ``skip_key`` accepts (not decoded)."""
        pos = StreamPosition(**asdict(start))
        empty_passes = 0
        while True:
            mine, modulus, remainder = self.consumer.assignment(shard_order(len(self.urls), self.seed, pos.pass_))
            got_any = False
            while pos.shard < len(mine):
                url = self.urls[mine[pos.shard]]
                for raw_pos, sample in self.shard_samples(url, pos.sample, modulus, remainder, skip_key):
                    got_any = True
                    pos.sample = raw_pos
                    yield StreamPosition(pos.pass_, pos.shard, pos.sample), sample
                pos.shard, pos.sample = pos.shard + 1, 0
            empty_passes = 0 if got_any else empty_passes + 1
            if empty_passes >= 2:
                raise DvectorError(f"{self.consumer.describe()} read no usable sample in a whole pass over "
                                   f"{len(self.urls)} shard(s) ({self.urls[0]}{', ...' if len(self.urls) > 1 else ''}): "
                                   "are they shards (made by build-shards), and not all broken or unreachable?")
            pos = StreamPosition(pos.pass_ + 1, 0, 0)
