"""Model families. Each module knows one family: where its vision tower is, which layer the
LLM reads, how to capture that layer's signals, and how the LLM receives the image tokens.

Add a family by writing a module with a ``VLMBackend`` subclass decorated with
``@register_backend`` and importing it below.
"""

from visionzip_eval.backends.base import (
    BACKENDS,
    TowerSignals,
    VLMBackend,
    backend_for,
    register_backend,
)
from visionzip_eval.backends import llava_hf  # noqa: F401  (registers itself)

__all__ = ["BACKENDS", "TowerSignals", "VLMBackend", "backend_for", "register_backend"]
