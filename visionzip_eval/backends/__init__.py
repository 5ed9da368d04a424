"""Model families. Each module knows one family: where its vision tower is, which layer the
LLM reads, how to capture that layer's signals, how the LLM receives the image tokens, which
checkpoints it loads (``model_types``, ``load``) and its tiny offline models (``builtin``).

Add a family by writing a module with a ``VLMBackend`` subclass decorated with
``@register_backend`` and importing it below. Nothing here imports above the backends
(``visionzip_eval.loading`` turns ``pretrained=`` strings into models).
"""

from visionzip_eval.backends.base import (
    BACKENDS,
    TowerSignals,
    VLMBackend,
    backend_for,
    register_backend,
)
from visionzip_eval.backends import llava_hf  # noqa: F401  (registers itself)
from visionzip_eval.backends import llava_next  # noqa: F401  (registers itself)
from visionzip_eval.backends import llava_onevision  # noqa: F401  (registers itself)
from visionzip_eval.backends import llava_original  # noqa: F401  (registers itself; matches only with llava installed)
from visionzip_eval.backends import qwen2_5_vl  # noqa: F401  (registers itself)

__all__ = ["BACKENDS", "TowerSignals", "VLMBackend", "backend_for", "register_backend"]
