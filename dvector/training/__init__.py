"""training: the run that turns shards into checkpoints. ``train()`` (``loop``), what it sets up
and restores from a checkpoint (``prepare``), the step loop, logging and checkpoint contents
(``steps``), torchrun/DDP (``distributed``), the checkpoint file format (``checkpoint``), the
held-out validation set and its EER (``validation``), and where a run's network comes from and whether
the shards' features fit it (``transfer``: ``--init`` from another run's encoder, ``-c``).

Owns: the training run. Reads shards only through ``stream``; its EER comes from
``dvector.metrics``. Never imports the use parts (``inference``, ``evaluation``, ``export``,
``diarization``) or ``cli``.
"""
