"""nn: the networks and their losses. Encoders (``encoders.build_encoder``: the d-vector LSTM of ``model``,
ECAPA-TDNN of ``ecapa``, the thin ResNet-34 of ``resnet``) and criteria (``criteria.make_criterion``: GE2E of
``loss``, angular prototypical of ``proto``, AAM-softmax of ``margin``), and Resemblyzer's pretrained encoder
mapped onto the d-vector (``resemblyzer.load_resemblyzer``).

Owns: torch modules that map log-mels to embeddings and embeddings to a loss. Imports only
``dvector.config`` and ``dvector.errors``; never ``signal``, ``shards``, ``stream``, ``training``,
the use parts (``inference``, ``evaluation``, ``export``, ``diarization``) or ``cli``.
"""
