"""Running models: inference back-ends (onnxruntime providers, torch) and the batcher.

:mod:`engine.runtime.backends` holds :class:`InferenceBackend` and its two implementations.
onnxruntime is imported only when an :class:`OnnxBackend` is built.
"""

from engine.runtime.backends import (
    PROVIDERS,
    InferenceBackend,
    OnnxBackend,
    TorchBackend,
    available_providers,
)

__all__ = ["PROVIDERS", "InferenceBackend", "OnnxBackend", "TorchBackend", "available_providers"]
