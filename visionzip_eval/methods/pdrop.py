"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", arXiv 2410.17247).

Official code Cooperx521/PyramidDrop 6444f304 (``llava/model/modeling_llama_pdrop.py`` = M),
transcribed in ``tests/official_pdrop.py``:
- at each stage boundary the sequence is ranked before the stage's first layer runs, with that
  layer's own attention recomputed from its normalised input (M:1321-1342, rotary applied);
- one query, the last prompt token; softmax over every key in float32, heads averaged, the
  image columns sliced without renormalising (M:1390-1401); top-k, original order (M:1405-1410);
- stage k keeps ``int(576 * lambda**k)`` counted from the tokens entering the LLM (M:1306-1307).
- positions are renumbered 0..L'-1 after every cut and decode positions shifted to match
  (M:1445-1446, M:1259-1268): ``positions=renumber`` (default); ``original`` keeps them, as FastV.
- ``selection_precision=reference`` casts the float32 softmax to the model dtype before the head
  mean (M:1397-1399, fp16 runs); ``float32`` (default) ranks the float32 mean.
Budget: lambda is solved so that the last stage keeps ``tokens`` (``count=kept``, default) or
the average over all layers is ``tokens`` (``count=average``: the paper tables' convention,
PDrop issues #10/#22 and the VisionZip paper's Table 1). The paper's default 8,16,24 cannot
average below 144 (issue #10), and no official setting for 192/128/64 is published (issue #27
asks, unanswered); ``layers=2,8,16`` is this project's choice, with lambda solved for the
average (64 -> lambda 0.19). Layers are given for a 32-layer LLM and scaled to the model's
depth. Deviation: counts are rounded, not truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from visionzip_eval.methods.llm_pruning import LayerView, Prune
from visionzip_eval.methods.base import check_choice
from visionzip_eval.methods.in_llm import (
    POSITIONS,
    REFERENCE_LAYERS,
    InLLMReducer,
    scaled_layers,
    solve_increasing,
)
from visionzip_eval.selection import SELECTION_PRECISIONS
from visionzip_eval.methods.registry import register_method

@register_method(
    "pdrop", kind="in-llm", display="PDrop", paper="arXiv 2410.17247", code="github.com/Cooperx521/PyramidDrop"
)
@dataclass
class PyramidDrop(InLLMReducer):
    """In stages, keep a share lambda of the visual tokens the last prompt token attends most."""

    layers: str = "2,8,16"
    positions: Literal["renumber", "original"] = "renumber"
    selection_precision: Literal["float32", "reference"] = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "positions", self.positions, POSITIONS)
        check_choice(self.name, "selection_precision", self.selection_precision, SELECTION_PRECISIONS)
        scaled_layers(self.layers, REFERENCE_LAYERS, self.name)  # validates

    def ratio(self, stages: list[int], num_layers: int, visual: float, budget: float) -> float:
        """lambda: the last stage keeps ``budget`` (count=kept), or the layer average is ``budget``."""
        if self.count == "kept":
            return (budget / visual) ** (1 / len(stages))

        def average(lam: float) -> float:
            plan = {layer: visual * lam ** (i + 1) for i, layer in enumerate(stages)}
            return self.layer_average(plan, num_layers, visual)

        if average(0.0) > budget + 1e-9:
            raise ValueError(
                f"pdrop: an average of {budget:g} visual tokens over {num_layers} LLM layers is out of reach "
                f"when layers 0..{stages[0] - 1} see all {visual:g} (at least {average(0.0):g}): "
                "choose earlier layers, or count=kept"
            )
        return solve_increasing(average, budget)  # the average grows with lambda

    def plan(self, num_layers: int, visual: float, budget: float) -> dict[int, float]:
        stages = scaled_layers(self.layers, num_layers, self.name)
        lam = self.ratio(stages, num_layers, visual, budget)
        return {layer: visual * lam ** (i + 1) for i, layer in enumerate(stages)}

    def select(self, view: LayerView) -> Prune:
        scores = self.last_token_scores(view, source="this", precision=self.selection_precision)
        return Prune(keep=self.keep_top(scores, view.visual, self.kept_at(view)))
