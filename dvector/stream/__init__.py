"""stream: shard URLs to endless speaker-balanced GE2E batches. Which consumer (rank, DataLoader
worker) reads which shards (``sources``), one consumer's stream of decoded samples with positions
to resume from (``samples``), drawing N speakers x M utterances from a bounded pool
(``sampling``), batches of one consumer (``batches``) and the torch DataLoader around them, which
also owns the format of its saved position (``loader``).

Owns: reading shards for training. May import ``shards`` and the shared helpers; never ``nn``,
``training``, the use parts (``inference``, ``evaluation``, ``export``, ``diarization``) or ``cli``.
Training reads shards only through this package.
"""

from dvector.shards.index import index_checks
from dvector.shards.locate import ShardSource, resolve_shards
from dvector.shards.reader import iter_shard

__all__ = ["ShardSource", "index_checks", "iter_shard", "resolve_shards"]
