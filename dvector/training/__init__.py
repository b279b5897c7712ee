"""training: the run that turns shards into checkpoints. ``train()`` (``loop``), what it sets up
and restores from a checkpoint (``prepare``), the step loop, logging and checkpoint contents
(``steps``), torchrun/DDP (``distributed``), the checkpoint file format (``checkpoint``) and the
held-out validation set and its EER (``validation``).

Owns: the training run. Reads shards only through ``stream``; its EER comes from
``dvector.metrics``. Never imports ``use`` or ``cli``.
"""
