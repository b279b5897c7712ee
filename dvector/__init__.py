"""dvector: speaker embeddings (d-vectors) trained with the GE2E loss."""

from .config import BuildConfig, FeatureConfig, ModelConfig, VadConfig
from .errors import DvectorError

__version__ = "0.1.0"

__all__ = ["BuildConfig", "DvectorError", "FeatureConfig", "ModelConfig", "VadConfig", "__version__"]
