"""Baseline: patches drawn uniformly at random (seeded), the floor any selection must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visionzip_eval.backends.base import TowerSignals, VLMBackend
from visionzip_eval.methods.base import ScoringReducer
from visionzip_eval.methods.registry import register_method


@register_method("random", display="Random")
@dataclass
class RandomTokens(ScoringReducer):
    """Patches drawn uniformly at random (seeded), kept in positional order.

    Each call draws anew from one generator seeded by ``seed``, so a run is reproducible
    (``seed`` defaults to the run's seed in sweeps and the adapter)."""

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._generator = torch.Generator().manual_seed(self.seed)

    def score(self, signals: TowerSignals, backend: VLMBackend) -> torch.Tensor:
        batch, count = backend.patch_features(signals).shape[:2]
        return -torch.rand(batch, count, generator=self._generator).to(signals.hidden.device)
