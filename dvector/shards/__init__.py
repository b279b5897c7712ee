"""shards: the on-disk format and how it is made. One shard written atomically and read back with
one decoder and one set of checks (``format``, ``reader``), where shards are and their index
(``index``, ``locate``), the deterministic build plan (``plan``), the build itself (``build``)
and verification (``check``).

Owns: the shard format, both ways. May import ``signal``, ``dvector.corpus`` and the shared
helpers; never ``stream``, ``nn``, ``training``, ``use`` or ``cli``.
"""
