"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025; official code vbdi/divprune, line numbers at commit 799e2d9 of
``LLaVA/llava/model/llava_arch.py``).

The official rule on LLaVA-1.5, per image, before the LLM:
- the features are the post-projector image tokens read back from the input embeddings
  (``llava_arch.py:374``; CLS is never among them, ``clip_encoder.py:80-81``);
- distance ``1 - cosine`` of the row-normalised features (``:147-150``, ``:155``);
- a max-min diversity greedy: the first token is the one farthest from its nearest other token
  (second-smallest value of each column, ``topk(D, 2, dim=0, largest=False).values[1]``,
  ``:160``, ``:165``, ``:169``); each next one maximises its distance to the chosen set
  (column-wise min over the chosen rows, ``:162``, ``:167``, ``torch.argmax``: first index on
  ties, ``:169``); chosen tokens are not masked out (a duplicate can be picked again);
- ``int(round(ratio * 576))`` tokens (``:153``): budgets 64/128/192 are ratios 64/576, ...;
- kept tokens reach the LLM in positional order (``keep_indexs.sort()``, ``:377-381``).

Here: the same rule, batched over images and on every family (it needs no attention and no
CLS token); the projector runs on all patches for the distances (as the official code does)
and again on the kept ones (it acts per token, so the rows are the same).

``scope`` (what one selection runs over):
- ``per_unit`` (default): each tower unit (an image; an AnyRes crop, base image included; a
  frame) keeps ``tokens``. On one-unit-per-image families this is the official rule.
- ``packed``: the official LLaVA-1.6 rule, one selection over an image's whole packed sequence:
  ``image_features`` after ``pack``/unpad (base unit, unpadded crop grid, one ``image_newline``
  per grid row, ``:192-226``), its length read at ``:369-372`` and ``int(round(ratio * len))``
  rows kept (``:153``, ``:375``), newline rows eligible. On one-unit families it is ``per_unit``
  (the sequence is the unit); on AnyRes families (``backend.packs_units``) it is refused: the
  kept count would vary with each image's size, and the processor, the placeholder checks and
  the per-unit ``tokens_per_image`` accounting all assume a fixed count per unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from visionzip_eval.backends.base import TowerSignals, VLMBackend
from visionzip_eval.methods.base import FixedCountReducer, check_choice
from visionzip_eval.methods.registry import register_method
from visionzip_eval.selection import Selection, gather_rows, work_dtype


def divprune_select(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, tokens) positions chosen by the max-min diversity greedy, ascending (with repeats
    where the official loop picks a token twice). ``features``: (B, P, D)."""
    unit = F.normalize(features.to(work_dtype(features)), dim=-1)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # (B, P, P)
    nearest_other = distance.topk(2, dim=1, largest=False).values[:, 1]  # per column
    chosen = [nearest_other.argmax(dim=1)]
    to_chosen = distance.gather(1, chosen[0].view(-1, 1, 1).expand(-1, 1, distance.shape[2])).squeeze(1)
    for _ in range(1, tokens):
        pick = to_chosen.argmax(dim=1)
        chosen.append(pick)
        row = distance.gather(1, pick.view(-1, 1, 1).expand(-1, 1, distance.shape[2])).squeeze(1)
        to_chosen = torch.minimum(to_chosen, row)
    return torch.stack(chosen, dim=1).sort(dim=1).values


@register_method(
    "divprune",
    display="DivPrune",
    paper="CVPR 2025 (arXiv 2503.02175)",
    code="github.com/vbdi/divprune",
)
@dataclass
class DivPrune(FixedCountReducer):
    """The max-min diverse subset of the projected visual tokens (cosine distance); no merge."""

    scope: Literal["per_unit", "packed"] = "per_unit"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "scope", self.scope, ("per_unit", "packed"))

    def check(self, backend: VLMBackend) -> None:
        super().check(backend)
        if self.scope == "packed" and backend.packs_units:
            raise ValueError(
                f"divprune: scope=packed (one selection over an image's whole packed AnyRes sequence, "
                f"the official LLaVA-1.6 rule) is not implemented for {backend.name}: use scope=per_unit "
                "(the same selection per crop, base image included)"
            )

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        patches = backend.patch_features(signals)
        index = divprune_select(backend.project(patches), self.tokens)
        return Selection(tokens=gather_rows(patches, index), dominant_index=index + backend.patch_offset)
