"""use: what people do with a trained model. Finding a checkpoint or export and reading its
settings (``bundle``), the ``Embedder`` (``embedder``), embedding many inputs into ``.npz``
(``embed_inputs``), trials and evaluation (``evaluate``), where results go, the stored
threshold and same/different decisions (``results``), the TorchScript export (``export``) and
pictures (``plot``).

Owns: inference. May import ``signal``, ``shards`` (to embed stored mels), ``nn``,
``training.checkpoint`` (the checkpoint file format) and the shared helpers; never the training
loop, ``stream`` or ``cli``.
"""
