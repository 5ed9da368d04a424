"""Token reducers applied to one model instance through removable hooks.

A reducer is a small dataclass that turns the vision tower's layer-L signals into the rows
the LLM receives. Applying it never patches a class: it sets an instance attribute and
registers hooks on that one model, and removing it restores the model exactly::

    vz = VisionZip(dominant=54, contextual=10)
    with vz(model):                    # scoped
        model.generate(**inputs)
    model = visionzip(model, 54, 10)   # persistent, the paper's one-liner
    remove_reduction(model)            # and back

The input side must match: ``visionzip_processor(processor, model)`` makes the processor
expand each image placeholder to as many tokens as the model now receives.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import ClassVar, Iterator

import torch
from torch import nn

from visionzip_eval.backends import TowerSignals, VLMBackend, backend_for
from visionzip_eval.budget import Budget
from visionzip_eval.selection import MergeRule, Selection, visionzip_select

_STATE_ATTR = "_visionzip_state"


@dataclass
class _Applied:
    reducer: "TokenReducer"
    backend: VLMBackend
    undo: object

    @property
    def tokens_per_image(self) -> int:
        return self.reducer.tokens_per_image(self.backend)


class TokenReducer:
    """Base class: subclasses implement ``reduce`` and ``tokens_per_image``."""

    needs_attention: ClassVar[bool] = False

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

    def _encode(self, backend: VLMBackend, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._encode_selection(backend, pixel_values).tokens

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
        return self._encode(backend, pixel_values)

    # -- applying -------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Apply persistently to this model instance (replacing any reducer already applied)."""
        backend = backend_for(model)
        self.check(backend)
        remove_reduction(model)
        undo = backend.install(
            lambda pixel_values: self._encode_selection(backend, pixel_values),
            self.tokens_per_image(backend),
            full=isinstance(self, NoReduction),
        )
        setattr(model, _STATE_ATTR, _Applied(self, backend, undo))
        return model

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[nn.Module]:
        previous = applied_reducer(model)
        self.apply(model)
        try:
            yield model
        finally:
            remove_reduction(model)
            if previous is not None:
                previous.apply(model)


@dataclass
class NoReduction(TokenReducer):
    """``budget=full``: the same capture path, every token passed on (the vanilla baseline)."""

    def tokens_per_image(self, backend: VLMBackend) -> int:
        return backend.full_tokens

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        return Selection(tokens=backend.full_features(signals))


@dataclass
class VisionZip(TokenReducer):
    """VisionZip (arXiv 2412.04467): ``dominant`` tokens by CLS attention (CLS included) plus
    ``contextual`` tokens merged by key similarity, per image.

    ``merge="reference"`` reproduces the reference code (target + mean of members);
    ``"average"`` is the paper's prose (mean of target and members).
    """

    dominant: int = 54
    contextual: int = 10
    merge: MergeRule = "reference"

    needs_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        Budget(self.dominant, self.contextual)  # validates the counts
        if self.merge not in ("reference", "average"):
            raise ValueError(f"unknown merge rule {self.merge!r}: use 'reference' or 'average'")

    @classmethod
    def from_budget(cls, budget: Budget | int | str, merge: MergeRule = "reference") -> VisionZip:
        parsed = Budget.parse(budget)
        if parsed.is_full:
            raise ValueError("budget 'full' means no reduction: use NoReduction() or make_reducer()")
        return cls(parsed.dominant, parsed.contextual, merge)

    @property
    def budget(self) -> Budget:
        return Budget(self.dominant, self.contextual)

    def check(self, backend: VLMBackend) -> None:
        self.budget.check_fits(backend.tower_tokens)

    def tokens_per_image(self, backend: VLMBackend) -> int:
        return self.dominant + self.contextual

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        return visionzip_select(
            signals.hidden,
            signals.cls_attention,
            signals.metric,
            self.dominant,
            self.contextual,
            self.merge,
            cls_token=signals.cls_token,
        )


def _grid_for(tokens: int, rows: int, cols: int) -> tuple[int, int]:
    """The most nearly square (h, w) with h * w == tokens that fits a rows x cols grid."""
    best = None
    for h in range(1, int(tokens**0.5) + 1):
        if tokens % h == 0:
            for gh, gw in ((h, tokens // h), (tokens // h, h)):
                if gh <= rows and gw <= cols and (best is None or abs(gh - gw) < abs(best[0] - best[1])):
                    best = (gh, gw)
    if best is None:
        raise ValueError(f"{tokens} tokens cannot be pooled from a {rows}x{cols} patch grid")
    return best


@dataclass
class RandomTokens(TokenReducer):
    """Baseline: ``tokens`` patch tokens per image drawn uniformly at random (seeded), kept in
    positional order. Each call draws anew from one generator, so a run is reproducible."""

    tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")
        self._generator = torch.Generator().manual_seed(self.seed)

    def check(self, backend: VLMBackend) -> None:
        rows, cols = backend.patch_grid
        if self.tokens > rows * cols:
            raise ValueError(f"{self.tokens} tokens exceed the tower's {rows * cols} patches")

    def tokens_per_image(self, backend: VLMBackend) -> int:
        return self.tokens

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        patches = backend.patch_features(signals)
        batch, count, dim = patches.shape
        draw = torch.rand(batch, count, generator=self._generator).argsort(dim=1)[:, : self.tokens]
        index = draw.sort(dim=1).values.to(patches.device)
        tokens = patches.gather(1, index.unsqueeze(-1).expand(-1, -1, dim))
        return Selection(tokens=tokens, dominant_index=index + backend.patch_offset)


@dataclass
class PoolTokens(TokenReducer):
    """Baseline: average pooling of the patch grid to ``tokens`` cells (the most nearly
    square factorisation: 64 -> 8x8, 128 -> 8x16, 192 -> 12x16), row-major."""

    tokens: int = 64

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")

    def check(self, backend: VLMBackend) -> None:
        _grid_for(self.tokens, *backend.patch_grid)

    def tokens_per_image(self, backend: VLMBackend) -> int:
        return self.tokens

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        rows, cols = backend.patch_grid
        patches = backend.patch_features(signals)
        batch, _, dim = patches.shape
        grid = patches.transpose(1, 2).reshape(batch, dim, rows, cols)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid.float(), _grid_for(self.tokens, rows, cols))
        return Selection(tokens=pooled.flatten(2).transpose(1, 2).to(patches.dtype))


METHODS = ("visionzip", "random", "pool")


def make_reducer(
    budget: Budget | int | str | None = "full",
    method: str = "visionzip",
    seed: int = 0,
    merge: MergeRule = "reference",
) -> TokenReducer:
    """The reducer for a method at a budget; ``full`` is NoReduction whatever the method.

    ``random`` and ``pool`` pass exactly as many tokens as VisionZip at the same budget.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    parsed = Budget.parse(budget)
    if parsed.is_full:
        return NoReduction()
    if method == "visionzip":
        return VisionZip(parsed.dominant, parsed.contextual, merge)
    if method == "random":
        return RandomTokens(parsed.total, seed)
    return PoolTokens(parsed.total)


def applied_reducer(model: nn.Module) -> TokenReducer | None:
    state = getattr(model, _STATE_ATTR, None)
    return state.reducer if state is not None else None


def tokens_per_image(model: nn.Module) -> int:
    """Visual tokens per image the model's LLM receives now (reduced or not); per unit (crop,
    frame) for AnyRes and video models."""
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        return state.tokens_per_image
    return backend_for(model).full_tokens


def remove_reduction(model: nn.Module) -> nn.Module:
    """Undo ``apply``/``visionzip`` on this model; a no-op if nothing is applied."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is not None:
        state.undo()
    return model


def visionzip(
    model: nn.Module, dominant: int = 54, contextual: int = 10, merge: MergeRule = "reference"
) -> nn.Module:
    """The paper's one-liner: ``model = visionzip(model, dominant=54, contextual=10)``."""
    return VisionZip(dominant, contextual, merge).apply(model)


_OVERRIDES_ATTR = "_visionzip_overrides"


def visionzip_processor(processor, model: nn.Module):
    """Make ``processor`` expand each image (and video) placeholder to the count ``model`` now
    receives: ``tokens_per_image`` per image for LLaVA-1.5, per crop (base image included) for
    LLaVA-NeXT / OneVision images, per frame for OneVision videos (see each backend).

    Sets instance attributes on this processor only; call again after changing the
    model's reducer (it then follows the new count, or the default count if none).
    """
    if not hasattr(processor, "image_token"):
        raise ValueError(f"{type(processor).__name__} has no image_token: not a LLaVA-style processor")
    for name in processor.__dict__.pop(_OVERRIDES_ATTR, ("replace_image_token",)):
        processor.__dict__.pop(name, None)
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return processor
    overrides = state.backend.processor_overrides(
        processor, state.tokens_per_image, full=isinstance(state.reducer, NoReduction)
    )
    for name, function in overrides.items():
        setattr(processor, name, function)
    processor.__dict__[_OVERRIDES_ATTR] = tuple(overrides)
    return processor
