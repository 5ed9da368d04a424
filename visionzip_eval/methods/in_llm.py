"""The base of in-LLM methods (FastV, PyramidDrop, SparseVLM): the vision side passes every
token on, and the method prunes visual tokens between decoder layers, by real removal
(``visionzip_eval.methods.llm_pruning``).

A method plans how many visual tokens survive from which layer on (``plan``) and chooses them
(``select``: a ``LayerView`` in, a ``Prune`` out). ``tokens`` is the budget in visual tokens per
image (per unit), read by ``count``:

- ``kept`` (default): the visual tokens left after the last pruning layer (FastV at 64 keeps 64
  from layer K on); reachable on any depth, so it is the default;
- ``average``: the mean number of visual tokens over all LLM layers, the convention of the
  VisionZip paper's Table 1 for in-LLM methods (taken from SparseVLM): FastV at 64 on a
  32-layer LLaVA-1.5 keeps 30 from layer 2 on, since layers 0-1 see all 576. Use it to compare
  with the published rows (``configs/llava15_7b_paper.yaml`` does); shallow LLMs cannot reach it.

A request with V visual tokens entering the LLM is planned for ``V * tokens / full`` (one
LLaVA-1.5 image: exactly ``tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch

from visionzip_eval.methods import llm_pruning
from visionzip_eval.backends.base import VLMBackend
from visionzip_eval.methods.llm_pruning import LayerView, Prune
from visionzip_eval.methods.base import TokenReducer, check_tokens, top_positions
from visionzip_eval.selection import Selection, work_dtype


@dataclass
class InLLMReducer(TokenReducer):
    """Base class: subclasses implement ``plan`` and ``select``."""

    kind: ClassVar[str] = "in-llm"
    keeps_all: ClassVar[bool] = True  # the LLM receives every visual token; pruning happens inside

    tokens: int = 64
    count: Literal["kept", "average"] = "kept"

    def __post_init__(self) -> None:
        check_tokens(self.tokens)
        self._full_tokens: int | None = None

    # -- what a method defines ----------------------------------------------------------------
    def plan(self, num_layers: int, visual: float, budget: float) -> dict[int, float]:
        """Pruning layer (0-based) -> visual tokens kept from it on, for ``visual`` tokens
        entering a ``num_layers``-layer LLM and ``budget`` (read by ``count``); raises
        ``ValueError`` where the budget is out of reach."""
        raise NotImplementedError

    def select(self, view: LayerView) -> Prune:
        raise NotImplementedError

    # -- planning ------------------------------------------------------------------------------
    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        full = self._full_tokens or 576
        return tuple(sorted(self.plan(num_layers, full, self.tokens)))

    def kept_at(self, view: LayerView) -> torch.Tensor:
        """(B,) visual tokens each row keeps from ``view.layer`` on (the plan, rounded)."""
        entering = view.entering.double()
        counts = []
        for row in range(entering.shape[0]):
            visual = float(entering[row])
            plan = self.plan(view.num_layers, visual, visual * self.tokens / self._full_tokens) if visual else {}
            counts.append(round(plan.get(view.layer, 0.0)))
        return torch.tensor(counts, device=entering.device)

    @staticmethod
    def layer_average(plan: dict[int, float], num_layers: int, visual: float) -> float:
        """Mean visual tokens over the layers: ``visual`` before the first pruning layer."""
        total, current, previous = 0.0, visual, 0
        for layer in sorted(plan):
            total += (layer - previous) * current
            current, previous = plan[layer], layer
        return (total + (num_layers - previous) * current) / num_layers

    # -- the vision side: every token --------------------------------------------------------
    def tokens_per_image(self, backend: VLMBackend) -> int:
        return backend.full_tokens

    def reduce(self, signals, backend: VLMBackend) -> Selection:
        return Selection(tokens=backend.full_features(signals))

    def check(self, backend: VLMBackend) -> None:
        if not backend.in_llm_pruning:
            raise ValueError(
                f"method {self.name!r} prunes inside the LLM, and {backend.name} has no standard "
                "decoder for it: choose a pre-LLM method (visionzip-eval methods --kind pre-llm)"
            )
        if self.tokens > backend.full_tokens:
            raise ValueError(f"{self.tokens} tokens exceed the {backend.full_tokens} visual tokens per image")
        layers = len(backend.decoder().layers)
        llm_pruning.check_prune_layers(self.name, self.plan(layers, backend.full_tokens, self.tokens), layers)

    def install(self, backend: VLMBackend, encode: Callable) -> Callable[[], None]:
        undo_vision = super().install(backend, encode)
        self._full_tokens = backend.full_tokens
        pruning = llm_pruning.DecoderPruning(backend, self)

        def undo() -> None:
            pruning.remove()
            undo_vision()

        return undo

    # -- helpers for methods -------------------------------------------------------------------
    @staticmethod
    def last_token_scores(view: LayerView, source: str, precision: str = "float32") -> torch.Tensor:
        """(B, P) the attention the last prompt token pays each current row, heads averaged
        (FastV's and PyramidDrop's score; ``source`` as in ``LayerView.attention``).
        ``precision="reference"``: the probabilities are cast to the model's dtype before the
        head mean, as both official codes do (FastV ML:349, PDrop M:1397-1399: fp16 runs)."""
        last = torch.full((view.hidden.shape[0], 1), view.hidden.shape[1] - 1, device=view.hidden.device)
        probs = view.attention(last, source=source)
        if precision == "reference":
            probs = probs.to(view.hidden.dtype)
        return probs.mean(dim=1)[:, 0]

    @staticmethod
    def keep_top(scores: torch.Tensor, visual: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(B, P) bool: every non-visual row, plus per row the ``counts[b]`` visual rows with the
        highest ``scores`` (ties: the earlier row)."""
        work = scores.to(work_dtype(scores))
        masked = torch.where(visual, work, torch.tensor(float("-inf"), dtype=work.dtype, device=scores.device))
        keep = ~visual
        for row in range(scores.shape[0]):
            count = int(counts[row])
            if count:
                keep[row, top_positions(masked[row : row + 1], count)[0]] = True
        return keep


POSITIONS = ("renumber", "original")  # PDrop's and SparseVLM's official rule, FastV's
REFERENCE_LAYERS = 32  # stage layers are given for a 32-layer LLM (LLaVA-1.5-7B) and scaled


def scaled_layers(spec: str, num_layers: int, method: str) -> list[int]:
    """``"2,8,16"`` (layers of a 32-layer LLM) scaled to ``num_layers``: distinct, 1..layers-1."""
    try:
        given = [int(part) for part in str(spec).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{method}: layers must be comma-separated integers, got {spec!r}") from None
    if not given or any(layer < 1 for layer in given):
        raise ValueError(f"{method}: layers must be integers >= 1, got {spec!r}")
    scaled = {min(max(round(layer * num_layers / REFERENCE_LAYERS), 1), num_layers - 1) for layer in given}
    return sorted(scaled)


def solve_increasing(reached: Callable[[float], float], target: float) -> float:
    """The lambda in [0, 1] where ``reached`` (growing with lambda) meets ``target``, by bisection."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if reached(middle) < target else (low, middle)
    return (low + high) / 2
