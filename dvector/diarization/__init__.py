"""diarization: who spoke when. RTTM reading and writing (``rttm``), clustering of window
embeddings (``clustering``: spectral with eigengap, AHC; no I/O), the pipeline from a recording to
its RTTM (``diarize``: VAD, window d-vectors, clustering, Viterbi resegmentation) and the DER
(``der``, through ``pyannote.metrics``, an optional extra imported lazily).

May import ``inference`` (the embedder), ``evaluation.results`` (the stored same/different
threshold), ``signal`` and the top-level modules; never ``export``, ``training``, ``stream`` or
``cli``.
"""
