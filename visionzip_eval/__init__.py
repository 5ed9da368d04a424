"""visionzip-eval: VisionZip visual-token reduction, measured through lmms-eval."""

from visionzip_eval.apply import applied_reducer, remove_reduction, tokens_per_image, visionzip_processor
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

__version__ = "0.1.0"

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
