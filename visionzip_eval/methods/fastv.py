"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764).

Official code pkunlp-icler/FastV d1659729 (``src/transformers/.../llama/modeling_llama.py``,
the LLaVA-1.5 path of the paper), transcribed in ``tests/official_fastv.py``:
- at layer ``K`` (default 2) it reads the attention map layer K-1 produced (:736-738);
- heads averaged, only the last token's row (the last prompt token) scores (:740-742);
- the top image tokens by that score survive, every other token stays (:744-750);
- kept tokens keep their original position ids (:756); pruning happens at prefill.
The paper's Table 1 (and the VisionZip paper, after SparseVLM) count FastV's tokens as the
average over all decoder layers: at 64 on 32 layers, K=2 keeps round((32*64 - 2*576) / 30) = 30.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from visionzip_eval.methods.llm_pruning import LayerView, Prune
from visionzip_eval.methods.base import check_choice
from visionzip_eval.methods.in_llm import InLLMReducer
from visionzip_eval.selection import SELECTION_PRECISIONS
from visionzip_eval.methods.registry import register_method


@register_method(
    "fastv", kind="in-llm", display="FastV", paper="arXiv 2403.06764", code="github.com/pkunlp-icler/FastV"
)
@dataclass
class FastV(InLLMReducer):
    """Before LLM layer k, keep the visual tokens the last token attended most in layer k-1."""

    k: int = 2
    selection_precision: Literal["float32", "reference"] = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "selection_precision", self.selection_precision, SELECTION_PRECISIONS)

    def plan(self, num_layers: int, visual: float, budget: float) -> dict[int, float]:
        if self.k < 1:
            raise ValueError(f"fastv: k must be >= 1 (the scores come from layer k-1), got {self.k}")
        if self.count == "kept" or self.k >= num_layers:
            return {self.k: budget}
        kept = (num_layers * budget - self.k * visual) / (num_layers - self.k)
        if kept < 0:
            least = self.k * visual / num_layers
            raise ValueError(
                f"fastv: an average of {budget:g} visual tokens over {num_layers} LLM layers is out of reach "
                f"when layers 0..{self.k - 1} see all {visual:g} (at least {least:g}): lower k, or count=kept"
            )
        return {self.k: kept}

    def select(self, view: LayerView) -> Prune:
        scores = self.last_token_scores(view, source="previous", precision=self.selection_precision)
        return Prune(keep=self.keep_top(scores, view.visual, self.kept_at(view)))
