"""signal: one recording to features. Decoding, downmixing and resampling (``audio``), the numba
VAD (``vad``), level and log-mel (``features``), file to float16 log-mel (``process``), their torch
twins for exported models (``torch_frontend``) and the windows (dvector's overlapping ones, or
Resemblyzer's partials) that turn a mel into an utterance embedding (``windows``).

Owns: everything that happens to one waveform. Imports only ``dvector.config``, ``dvector.errors``
and ``dvector.files``; never ``shards``, ``stream``, ``nn``, ``training``, the use parts
(``inference``, ``evaluation``, ``export``, ``diarization``) or ``cli``.
"""
