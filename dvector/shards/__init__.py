"""shards: the on-disk format and how it is made. One shard written atomically and read back with
one decoder and one set of checks (``format``, ``reader``), where shards are and their index
(``index``, ``locate``), the deterministic build plan (``plan``), what one build job is and how a build reports
(``shard_job``, ``build_report``), the build itself, local or on Dask (``build``, ``dask_build``),
and verification (``check``).

Owns: the shard format, both ways. May import ``signal``, ``dvector.corpus`` and the shared
helpers; never ``stream``, ``nn``, ``training``, the use parts (``inference``, ``evaluation``,
``export``, ``diarization``) or ``cli``.
"""
