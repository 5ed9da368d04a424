"""Baseline: average pooling of the patch grid (what LLaVA-OneVision does to video frames)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visionzip_eval.backends.base import TowerSignals, VLMBackend
from visionzip_eval.methods.base import FixedCountReducer
from visionzip_eval.methods.registry import register_method
from visionzip_eval.selection import Selection, grid_for


@register_method("pool", display="Pooling")
@dataclass
class PoolTokens(FixedCountReducer):
    """Average pooling of the patch grid to ``tokens`` cells, row-major.

    The cell grid is the most nearly square factorisation that fits: 64 -> 8x8, 128 -> 8x16,
    192 -> 12x16."""

    def check(self, backend: VLMBackend) -> None:
        grid_for(self.tokens, *backend.patch_grid)

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        rows, cols = backend.patch_grid
        patches = backend.patch_features(signals)
        batch, _, dim = patches.shape
        grid = patches.transpose(1, 2).reshape(batch, dim, rows, cols)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid.float(), grid_for(self.tokens, rows, cols))
        return Selection(tokens=pooled.flatten(2).transpose(1, 2).to(patches.dtype))
