"""Token-reduction methods: one module each, registered by decorator (``registry``), built by
name (``get_method``), listed by ``list_methods`` / ``visionzip-eval methods``.

A new method is one module in this package (it is imported below automatically) plus one
row in ``tests/method_table.py``, which every contract test iterates.
"""

import importlib
import pkgutil

from visionzip_eval.methods.base import FixedCountReducer, NoReduction, ScoringReducer, TokenReducer
from visionzip_eval.methods.registry import (
    NONE,
    MethodInfo,
    MethodSpec,
    display_name,
    get_method,
    list_methods,
    method_info,
    register_method,
)

_INFRASTRUCTURE = {"base", "registry", "in_llm", "llm_pruning"}
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "NONE", "FixedCountReducer", "MethodInfo", "MethodSpec", "NoReduction", "ScoringReducer", "TokenReducer",
    "display_name", "get_method", "list_methods", "method_info", "register_method",
]
