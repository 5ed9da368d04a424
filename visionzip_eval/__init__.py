"""visionzip-eval: VisionZip visual-token reduction, measured through lmms-eval."""

from visionzip_eval.budget import Budget
from visionzip_eval.compressor import (
    NoReduction,
    TokenReducer,
    VisionZip,
    applied_reducer,
    reducer_for,
    remove_reduction,
    tokens_per_image,
    visionzip,
    visionzip_processor,
)

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "NoReduction",
    "TokenReducer",
    "VisionZip",
    "applied_reducer",
    "reducer_for",
    "remove_reduction",
    "tokens_per_image",
    "visionzip",
    "visionzip_processor",
]
