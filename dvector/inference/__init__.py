"""inference: putting a trained model to work. Finding a checkpoint or export and reading its
settings (``bundle``), running windows of log-mels through the network (``runner``), the ``Embedder``
that ``dvector.load`` returns (``embedder``), embedding many inputs into ``.npz`` on local or Dask
workers (``embed_inputs``) and window embeddings of a live stream (``streaming``).

May import ``signal``, ``shards`` (to embed stored mels, and ``shards.cluster`` for Dask workers),
``nn``, ``training.checkpoint`` (the checkpoint file format) and the top-level modules; never the
training loop, ``stream``, ``evaluation``, ``export``, ``diarization`` or ``cli``.
"""
