"""dvector: speaker embeddings (d-vectors) trained with the GE2E loss."""

from dvector.config import VERSION, BuildConfig, FeatureConfig, ModelConfig, VadConfig
from dvector.errors import DvectorError

__version__ = VERSION

__all__ = ["BuildConfig", "DvectorError", "Embedder", "FeatureConfig", "ModelConfig", "VadConfig", "__version__", "load"]


def __getattr__(name: str):  # noqa: ANN202 - lazy, so that `import dvector` (and the CLI) need not import torch
    if name in ("load", "Embedder"):
        from dvector.inference import embedder

        return getattr(embedder, name)
    raise AttributeError(f"module 'dvector' has no attribute {name!r}")
