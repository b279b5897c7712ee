"""pretrained: encoders trained elsewhere, brought in as run folders that every command takes like a
run trained here (``embed``, ``eval``, ``export``, ``diarize``, ``train --init``...). ``resemblyzer``
copies Resemblyzer's GE2E d-vector from its installed package, with the front end and windows it
was trained and used with recorded as the run's settings.

May import ``nn`` (the network and its weight mapping), ``training.checkpoint`` (the checkpoint file
format) and the top-level modules; never ``signal``, ``shards``, ``stream``, the training loop, the
use parts (``inference``, ``evaluation``, ``export``, ``diarization``) or ``cli``.
"""
