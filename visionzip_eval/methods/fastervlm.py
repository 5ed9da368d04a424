"""FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token
Pruning: Make VLM Inference Faster", arXiv 2412.01818 v1; official code Theia-4869/FasterVLM,
line numbers at commit c994e9e, identical to the arXiv v1 state fe7ff7f for ``llava/model``).

The official rule on LLaVA-1.5, step by step:
- features and attention of the same tower layer, the one LLaVA reads (``select_layer=-2``):
  ``hidden_states[-2]`` and ``attentions[-2]`` (``llava/model/multimodal_encoder/clip_encoder.py:37-38``);
- the CLS query's row over the patch columns only, ``attn[:, :, 0, 1:]`` (``clip_encoder.py:39-41``),
  averaged over heads (``llava/model/llava_arch.py:145``);
- ``torch.topk(scores, k=visual_token_num)`` (``llava_arch.py:156``), no merging, no recycling;
- the kept patches reach the LLM in raster order (boolean mask ``llava_arch.py:160-161``,
  gathered ``:250-255``); the CLS token never does.

Here: the same rule on the CLS row recomputed from layer L's query and keys (no eager tower),
ranked in float32 (``selection_precision=float32``, default) or with the official fp16
arithmetic (``reference``: the eager map's softmax and head mean in the tower's dtype);
ties go to the earlier patch (the official ``topk`` leaves tie order to the device). Towers
without a CLS token (SigLIP, Qwen2.5-VL) are refused: the method is defined by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from visionzip_eval.backends.base import TowerSignals, VLMBackend
from visionzip_eval.methods.base import ScoringReducer, check_patch_budget, check_choice, cls_head_mean, require_cls_token
from visionzip_eval.methods.registry import register_method
from visionzip_eval.selection import SELECTION_PRECISIONS


@register_method(
    "fastervlm",
    display="FasterVLM",
    paper="arXiv 2412.01818 v1",
    code="github.com/Theia-4869/FasterVLM",
)
@dataclass
class FasterVLM(ScoringReducer):
    """The patches with the highest [CLS] attention (head mean) of the feature layer; no merge."""

    needs_attention: ClassVar[bool] = True
    selection_precision: Literal["float32", "reference"] = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "selection_precision", self.selection_precision, SELECTION_PRECISIONS)

    def check(self, backend: VLMBackend) -> None:
        require_cls_token(self, backend)
        check_patch_budget(self.tokens, backend)

    def score(self, signals: TowerSignals, backend: VLMBackend) -> torch.Tensor:
        return cls_head_mean(self, signals, backend)
