"""Model families. Each module knows one family: where its vision tower is, which layer the
LLM reads, how to capture that layer's signals, how the LLM receives the image tokens, which
checkpoints it loads (``model_types``, ``model_class``, ``load``) and its tiny offline models
(``builtin``, built in the same module; ``tiny`` holds what they share).

A new family is one module in this package with a ``VLMBackend`` subclass decorated with
``@register_backend`` (it is imported below automatically) plus one row in
``tests/family_table.py``, which the family contract tests iterate. Nothing here imports above
the backends (``visionzip_eval.loading`` turns ``pretrained=`` strings into models).
"""

import importlib
import pkgutil

from visionzip_eval.backends.base import (
    BACKENDS,
    TowerSignals,
    VLMBackend,
    backend_for,
    register_backend,
)

_INFRASTRUCTURE = {"base", "tiny"}
# by name: the registration order is the order backend_for and the family listings use
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BACKENDS", "TowerSignals", "VLMBackend", "backend_for", "register_backend"]
