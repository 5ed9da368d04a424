"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467; official code dvlab-research/VisionZip).

The selection itself lives in ``visionzip_eval.selection`` as pure tensor functions (see
``../shared/VISIONZIP.md``); this module makes it a registered method and holds the paper's
one-liner ``visionzip(model, dominant=54, contextual=10)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from visionzip_eval.backends.base import TowerSignals, VLMBackend
from visionzip_eval.budget import Budget
from visionzip_eval.methods.base import TokenReducer
from visionzip_eval.methods.registry import register_method
from visionzip_eval.selection import (
    SELECTION_PRECISIONS,
    MergeRule,
    Selection,
    SelectionPrecision,
    visionzip_select,
    visionzip_select_reference,
)


@register_method(
    "visionzip",
    display="VisionZip",
    paper="arXiv 2412.04467 (CVPR 2025)",
    code="github.com/dvlab-research/VisionZip",
)
@dataclass
class VisionZip(TokenReducer):
    """Dominant tokens by CLS attention (CLS included) plus contextual tokens merged by key
    similarity, per image.

    ``merge="reference"`` reproduces the reference code (target + mean of members);
    ``"average"`` is the paper's prose (mean of target and members).
    ``selection_precision="float32"`` ranks and compares in float32 (the default);
    ``"reference"`` does the official code's arithmetic in the model's dtype (fp16 in the
    paper's runs): the same patches as the official code, its fp16 ties included.
    """

    dominant: int = 54
    contextual: int = 10
    merge: Literal["reference", "average"] = "reference"
    selection_precision: Literal["float32", "reference"] = "float32"

    needs_attention: ClassVar[bool] = True
    budget_fields: ClassVar[tuple[str, ...]] = ("dominant", "contextual")

    def __post_init__(self) -> None:
        Budget(self.dominant, self.contextual)  # validates the counts
        if self.merge not in ("reference", "average"):
            raise ValueError(f"unknown merge rule {self.merge!r}: use 'reference' or 'average'")
        if self.selection_precision not in SELECTION_PRECISIONS:
            raise ValueError(
                f"unknown selection_precision {self.selection_precision!r}: use 'float32' or 'reference'"
            )
        if self.selection_precision == "reference" and self.merge != "reference":
            raise ValueError(
                "selection_precision=reference is the official code, which merges as merge=reference: "
                "drop merge=average or use selection_precision=float32"
            )

    @classmethod
    def from_budget(
        cls,
        budget: Budget | int | str,
        merge: MergeRule = "reference",
        selection_precision: SelectionPrecision = "float32",
    ) -> VisionZip:
        parsed = Budget.parse(budget)
        if parsed.is_full:
            raise ValueError("budget 'full' means no reduction: use NoReduction() or get_method()")
        return cls(parsed.dominant, parsed.contextual, merge, selection_precision)

    @property
    def budget(self) -> Budget:
        return Budget(self.dominant, self.contextual)

    def check(self, backend: VLMBackend) -> None:
        self.budget.check_fits(backend.tower_tokens)
        if self.selection_precision == "reference" and not backend.cls_token:
            raise ValueError(
                f"selection_precision=reference is the official code, which ranks by the CLS token's "
                f"attention, and the {backend.name} tower has no CLS token: use selection_precision=float32"
            )

    def tokens_per_image(self, backend: VLMBackend) -> int:
        return self.dominant + self.contextual

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        if self.selection_precision == "reference":
            if signals.queries is None or signals.keys is None or not signals.cls_token:
                raise ValueError(
                    f"selection_precision=reference needs layer L's queries and keys from a tower with a "
                    f"CLS token, which {backend.name} does not capture: use selection_precision=float32"
                )
            return visionzip_select_reference(
                signals.hidden,
                signals.queries,
                signals.keys,
                signals.num_heads,
                signals.scale,
                self.dominant,
                self.contextual,
            )
        return visionzip_select(
            signals.hidden,
            signals.cls_attention,
            signals.metric,
            self.dominant,
            self.contextual,
            self.merge,
            cls_token=signals.cls_token,
        )


def visionzip(
    model: nn.Module,
    dominant: int = 54,
    contextual: int = 10,
    merge: MergeRule = "reference",
    selection_precision: SelectionPrecision = "float32",
) -> nn.Module:
    """The paper's one-liner: ``model = visionzip(model, dominant=54, contextual=10)``."""
    return VisionZip(dominant, contextual, merge, selection_precision).apply(model)
