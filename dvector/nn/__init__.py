"""nn: the networks and their losses. The d-vector LSTM (``model``) and the GE2E loss (``loss``).

Owns: torch modules that map log-mels to embeddings and embeddings to a loss. Imports only
``dvector.config`` and ``dvector.errors``; never ``signal``, ``shards``, ``stream``, ``training``,
``use`` or ``cli``.
"""
