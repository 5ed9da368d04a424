"""visionzip-eval: VisionZip visual-token reduction, measured through lmms-eval."""

from visionzip_eval.budget import Budget
from visionzip_eval.compressor import (
    METHODS,
    NoReduction,
    PoolTokens,
    RandomTokens,
    TokenReducer,
    VisionZip,
    applied_reducer,
    make_reducer,
    remove_reduction,
    tokens_per_image,
    visionzip,
    visionzip_processor,
)

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "METHODS",
    "NoReduction",
    "PoolTokens",
    "RandomTokens",
    "TokenReducer",
    "VisionZip",
    "applied_reducer",
    "make_reducer",
    "remove_reduction",
    "tokens_per_image",
    "visionzip",
    "visionzip_processor",
]
