"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
Token Pruning in VLMs", ICCV 2025, arXiv 2412.01818 v2+; official code Theia-4869/VisPruner,
line numbers at commit aefa01a: ARCH = ``llava/model/llava_arch.py``, CLIP =
``llava/model/multimodal_encoder/clip_encoder.py``).

The official rule on LLaVA-1.5, per image, step by step:
- features and attention of the same layer, the one LLaVA reads: ``hidden_states[-2]`` and
  ``attentions[-2]`` (CLIP:37, CLIP:39), patches only (CLIP:40-41);
- importance: the CLS query's row over the patch columns, ``attn[:, :, 0, 1:]`` (CLIP:43),
  averaged over heads (ARCH:154);
- ``important = int(tokens * important_ratio)``, ``diverse = tokens - important`` (ARCH:150-151),
  ``important_ratio`` 0.5 by default (``llava/eval/model_vqa_loader.py:152``);
- the important tokens are the top of ``argsort(descending)``; the rest stay in that
  descending-attention order (ARCH:155-157);
- diverse tokens, by repeated bipartite duplicate removal on the unit-normalised patch
  features (``x / x.norm()``, ARCH:160) while more than ``diverse`` remain (ARCH:161-176):
  ``r = min(8, R - diverse)``; A = even, B = odd positions of the list; each A token's score is
  its highest cosine similarity to any B token; the ``r`` highest-scored A tokens go; the list
  becomes the kept A tokens in descending-score order, then B;
- kept tokens reach the LLM in raster order (boolean mask, ARCH:182-183 and ARCH:272).

Here: the same rule, batched, ranked in float32 (``selection_precision=float32``, default) or
with the official fp16 arithmetic (``reference``: the eager map's softmax, head mean and the
similarities in the tower's dtype); ties go to the earlier list position (the official ``argsort`` is
not stable), and an odd number of important tokens, which crashes ARCH:174, keeps
``len(A) - r`` A tokens as intended. Towers without a CLS token are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from visionzip_eval.backends.base import TowerSignals, VLMBackend
from visionzip_eval.methods.base import FixedCountReducer, check_patch_budget, check_choice, cls_head_mean, require_cls_token
from visionzip_eval.methods.registry import register_method
from visionzip_eval.selection import SELECTION_PRECISIONS, Selection, gather_rows, work_dtype

MERGE_STEP = 8  # tokens removed per pass (ARCH:163)


def vispruner_select(
    patches: torch.Tensor, importance: torch.Tensor, tokens: int, important_ratio: float, reference: bool = False
) -> torch.Tensor:
    """(B, tokens) patch positions VisPruner keeps, ascending. ``patches``: (B, P, D) features;
    ``importance``: (B, P) head-mean CLS attention. ``reference``: similarities in the
    features' own dtype (the official fp16 run), not float32."""
    important = int(tokens * important_ratio)
    diverse = tokens - important
    order = importance.to(work_dtype(importance)).argsort(dim=1, descending=True, stable=True)
    kept, residual = order[:, :important], order[:, important:]
    if diverse > 0:
        features = patches if reference else patches.to(work_dtype(patches))
        unit = features / features.norm(dim=-1, keepdim=True)
        while True:
            r = min(MERGE_STEP, residual.shape[1] - diverse)
            if r <= 0:
                break
            a, b = residual[:, 0::2], residual[:, 1::2]
            similarity = gather_rows(unit, a) @ gather_rows(unit, b).transpose(1, 2)
            redundancy = similarity.max(dim=-1).values
            keep_a = redundancy.argsort(dim=1, descending=True, stable=True)[:, r:]
            residual = torch.cat([a.gather(1, keep_a), b], dim=1)
        kept = torch.cat([kept, residual], dim=1)
    return kept.sort(dim=1).values


@register_method(
    "vispruner",
    display="VisPruner",
    paper="ICCV 2025 (arXiv 2412.01818 v2)",
    code="github.com/Theia-4869/VisPruner",
)
@dataclass
class VisPruner(FixedCountReducer):
    """Important patches by [CLS] attention, then diverse ones from the rest by repeatedly
    dropping near-duplicates (feature cosine similarity); no merge.

    ``important_ratio``: the share of the budget taken by attention (0.5, the official default)."""

    important_ratio: float = 0.5
    selection_precision: Literal["float32", "reference"] = "float32"

    needs_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"important_ratio must be in [0, 1], got {self.important_ratio}")
        check_choice(self.name, "selection_precision", self.selection_precision, SELECTION_PRECISIONS)

    def check(self, backend: VLMBackend) -> None:
        require_cls_token(self, backend)
        check_patch_budget(self.tokens, backend)

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        patches = backend.patch_features(signals)
        importance = cls_head_mean(self, signals, backend)
        reference = self.selection_precision == "reference"
        index = vispruner_select(patches, importance, self.tokens, self.important_ratio, reference)
        return Selection(tokens=gather_rows(patches, index), dominant_index=index + backend.patch_offset)
