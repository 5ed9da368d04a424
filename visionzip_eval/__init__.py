"""visionzip-eval: VisionZip visual-token reduction, measured through lmms-eval.

The top-level names are imported on first use (PEP 562), so ``import visionzip_eval`` and the
command line's ``--help`` do not pay for torch and transformers; ``from visionzip_eval import
visionzip`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "applied_reducer": "visionzip_eval.apply",
    "remove_reduction": "visionzip_eval.apply",
    "tokens_per_image": "visionzip_eval.apply",
    "visionzip_processor": "visionzip_eval.apply",
    "Budget": "visionzip_eval.budget",
    "MethodSpec": "visionzip_eval.methods",
    "NoReduction": "visionzip_eval.methods",
    "TokenReducer": "visionzip_eval.methods",
    "get_method": "visionzip_eval.methods",
    "list_methods": "visionzip_eval.methods",
    "register_method": "visionzip_eval.methods",
    "PoolTokens": "visionzip_eval.methods.pool",
    "RandomTokens": "visionzip_eval.methods.random",
    "VisionZip": "visionzip_eval.methods.visionzip",
    "visionzip": "visionzip_eval.methods.visionzip",
}

__all__ = [
    "Budget",
    "MethodSpec",
    "NoReduction",
    "PoolTokens",
    "RandomTokens",
    "TokenReducer",
    "VisionZip",
    "applied_reducer",
    "get_method",
    "list_methods",
    "register_method",
    "remove_reduction",
    "tokens_per_image",
    "visionzip",
    "visionzip_processor",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:  # AttributeError lets `from visionzip_eval import <submodule>` import it
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from visionzip_eval.apply import (
        applied_reducer,
        remove_reduction,
        tokens_per_image,
        visionzip_processor,
    )
    from visionzip_eval.budget import Budget
    from visionzip_eval.methods import (
        MethodSpec,
        NoReduction,
        TokenReducer,
        get_method,
        list_methods,
        register_method,
    )
    from visionzip_eval.methods.pool import PoolTokens
    from visionzip_eval.methods.random import RandomTokens
    from visionzip_eval.methods.visionzip import VisionZip, visionzip
