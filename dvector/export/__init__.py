"""export: shipping a model as one self-contained file, waveform in and embedding out, log-mel and
VAD inside. TorchScript (``torchscript``: also ``export_record``, the record both formats write)
and ONNX (``onnx_frontend``: the front end as graph ops; ``onnx_graph``: the export, a static graph of
standard ops; int8 by dynamic quantisation; onnx and onnxruntime imported only there).

May import ``inference.bundle`` (to find a checkpoint and read its settings), ``signal`` (the torch
front end), ``nn``, ``training.checkpoint`` and the top-level modules; never the rest of
``inference``, ``evaluation``, ``diarization``, ``training``, ``stream`` or ``cli``.
"""
