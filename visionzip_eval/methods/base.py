"""What every reduction method is: a ``TokenReducer`` turning the vision tower's layer-L signals
into the rows the LLM receives, applied to one model instance by removable hooks.

A method is a small dataclass: its fields are the token count it is built for (``tokens``, or
VisionZip's ``dominant`` + ``contextual``) and its own typed options. Subclass
``ScoringReducer`` for a method that only ranks patches: ``score`` returns one number per patch
and the base keeps the best ``tokens`` in positional order (as kvpress' ``ScorerPress``)::

    @register_method("mymethod", display="MyMethod", paper="arXiv ...", code="github.com/...")
    @dataclass
    class MyMethod(ScoringReducer):
        \"\"\"One line that ``visionzip-eval methods`` prints.\"\"\"
        needs_attention: ClassVar[bool] = True
        def score(self, signals, backend):
            return signals.cls_attention.sum(1)[:, backend.patch_offset:]

Applying never patches a class (``visionzip_eval.apply`` keeps the state)::

    with reducer(model):               # scoped
        model.generate(**inputs)
    reducer.apply(model)               # persistent; remove_reduction(model) undoes it
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Iterator

import torch
from torch import nn

from visionzip_eval import apply as _apply
from visionzip_eval.backends.base import TowerSignals, VLMBackend, backend_for
from visionzip_eval.budget import Budget
from visionzip_eval.selection import Selection, gather_rows, reference_cls_head_mean, work_dtype


class TokenReducer:
    """Base class: subclasses implement ``reduce`` and ``tokens_per_image``."""

    name: ClassVar[str] = ""  # set by @register_method
    kind: ClassVar[str] = "pre-llm"
    needs_attention: ClassVar[bool] = False  # capture layer L's queries and keys
    keeps_all: ClassVar[bool] = False  # the model's own layout applies (budget full)
    # dataclass fields that come from the budget, not from the user's options
    budget_fields: ClassVar[tuple[str, ...]] = ("tokens",)

    @classmethod
    def from_budget(cls, budget: Budget, **options) -> TokenReducer:
        """This method at ``budget`` (a reduced one) with ``options``."""
        return cls(tokens=budget.total, **options)

    def tokens_per_image(self, backend: VLMBackend) -> int:
        raise NotImplementedError

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        raise NotImplementedError

    def check(self, backend: VLMBackend) -> None:
        """Raise ``ValueError`` if this reducer cannot serve the backend's tower."""

    # -- running --------------------------------------------------------------------------
    def select(self, model: nn.Module, pixel_values: torch.Tensor) -> Selection:
        """Pre-projector selection for a batch of images, with indices (for inspection)."""
        backend = backend_for(model)
        self.check(backend)
        return self._select(backend, pixel_values)

    def _select(self, backend: VLMBackend, pixel_values: torch.Tensor) -> Selection:
        signals = backend.capture(pixel_values, attention=self.needs_attention)
        return self.reduce(signals, backend)

    def _encode_selection(self, backend: VLMBackend, pixel_values: torch.Tensor) -> Selection:
        """The selection with its tokens projected (what ``backend.install`` routes through)."""
        selection = self._select(backend, pixel_values)
        return replace(selection, tokens=backend.project(selection.tokens))

    def encode_images(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tokens the LLM receives per unit: (units, tokens_per_image, llm_hidden_size).

        ``pixel_values``: (units, 3, H, W), one tower input each (an image for LLaVA-1.5, a
        crop or a video frame for AnyRes and video models)."""
        backend = backend_for(model)
        self.check(backend)
        return self._encode_selection(backend, pixel_values).tokens

    # -- applying -------------------------------------------------------------------------
    def install(self, backend: VLMBackend, encode) -> Callable[[], None]:
        """Route the backend's image features through ``encode``; returns the undo."""
        return backend.install(encode, self.tokens_per_image(backend), full=self.keeps_all)

    def apply(self, model: nn.Module) -> nn.Module:
        """Apply persistently to this model instance (replacing any reducer already applied)."""
        backend = backend_for(model)
        self.check(backend)
        return _apply.attach(model, self, backend, lambda pixel_values: self._encode_selection(backend, pixel_values))

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[nn.Module]:
        previous = _apply.applied_reducer(model)
        self.apply(model)
        try:
            yield model
        finally:
            _apply.remove_reduction(model)
            if previous is not None:
                previous.apply(model)


@dataclass
class NoReduction(TokenReducer):
    """``budget=full``: the same capture path, every token passed on (the vanilla baseline)."""

    keeps_all: ClassVar[bool] = True
    budget_fields: ClassVar[tuple[str, ...]] = ()

    def tokens_per_image(self, backend: VLMBackend) -> int:
        return backend.full_tokens

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        return Selection(tokens=backend.full_features(signals))


def check_tokens(tokens: int) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be an integer >= 1, got {tokens!r}")


def check_choice(method: str, option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{method}: {option} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_patch_budget(tokens: int, backend: VLMBackend) -> None:
    rows, cols = backend.patch_grid
    if tokens > rows * cols:
        raise ValueError(f"{tokens} tokens exceed the tower's {rows * cols} patches")


@dataclass
class FixedCountReducer(TokenReducer):
    """A method that passes exactly ``tokens`` rows per unit (at most the tower's patches)."""

    tokens: int = 64

    def __post_init__(self) -> None:
        check_tokens(self.tokens)

    def check(self, backend: VLMBackend) -> None:
        check_patch_budget(self.tokens, backend)

    def tokens_per_image(self, backend: VLMBackend) -> int:
        return self.tokens


@dataclass
class ScoringReducer(FixedCountReducer):
    """A method that ranks the patch tokens: ``score`` gives (B, patches) and the ``tokens``
    best-scored patches of layer L go to the LLM in positional (raster) order. Ties go to the
    earlier patch (``torch.topk`` on CPU and CUDA alike is not guaranteed stable, so ties
    are broken explicitly)."""

    def score(self, signals: TowerSignals, backend: VLMBackend) -> torch.Tensor:
        raise NotImplementedError

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        patches = backend.patch_features(signals)
        index = top_positions(self.score(signals, backend), self.tokens)
        return Selection(tokens=gather_rows(patches, index), dominant_index=index + backend.patch_offset)


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) positions of the ``k`` highest scores per row, ascending; among equal scores the
    earlier position wins (a stable sort, so the result does not depend on the device). Scores
    rank in float32 (half-precision ones upcast exactly), float64 ones in float64."""
    order = scores.to(work_dtype(scores)).argsort(dim=1, descending=True, stable=True)
    return order[:, :k].sort(dim=1).values


def cls_head_mean(reducer: TokenReducer, signals: TowerSignals, backend: VLMBackend) -> torch.Tensor:
    """(B, patches) the CLS query's attention over the patches, heads averaged (FasterVLM's and
    VisPruner's importance): float32 (float64 for float64 towers), or with
    ``selection_precision="reference"`` the official eager map's arithmetic in the tower's dtype."""
    if getattr(reducer, "selection_precision", "float32") == "reference":
        if signals.queries is None or signals.keys is None:
            raise ValueError(
                f"{reducer.name}: selection_precision=reference needs layer L's queries and keys, which "
                f"{backend.name} does not capture: use selection_precision=float32"
            )
        return reference_cls_head_mean(signals.queries, signals.keys, signals.num_heads, signals.scale)
    return signals.cls_attention[:, :, backend.patch_offset :].mean(dim=1)


def require_cls_token(reducer: TokenReducer, backend: VLMBackend) -> None:
    """Refuse towers without a CLS token for methods defined by its attention."""
    if not backend.cls_token:
        raise ValueError(
            f"method {reducer.name!r} ranks patches by the [CLS] token's attention, and the "
            f"{backend.name} tower has no CLS token: choose another method (visionzip-eval methods lists them)"
        )
