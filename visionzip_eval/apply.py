"""Attaching a reduction to one model instance, and taking it off again.

The one place that keeps track of what is applied to a model: an instance attribute holding
the reducer, its backend and the backend's undo function. No class is ever patched, so two
models in one process can carry different reductions, and ``remove_reduction`` restores a
model exactly. ``TokenReducer.apply`` (``visionzip_eval.methods.base``) installs through here.

The input side must match: ``visionzip_processor(processor, model)`` makes the processor
expand each image placeholder to as many tokens as the model now receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from visionzip_eval.backends.base import VLMBackend, backend_for

_STATE_ATTR = "_visionzip_state"
_OVERRIDES_ATTR = "_visionzip_overrides"


@dataclass
class Applied:
    reducer: object  # a TokenReducer
    backend: VLMBackend
    undo: Callable[[], None]

    @property
    def tokens_per_image(self) -> int:
        return self.reducer.tokens_per_image(self.backend)

    @property
    def keeps_all(self) -> bool:
        return bool(getattr(self.reducer, "keeps_all", False))


def attach(model: nn.Module, reducer, backend: VLMBackend, encode: Callable) -> nn.Module:
    """Route ``model``'s image features through ``encode`` (replacing any reduction applied)."""
    remove_reduction(model)
    undo = reducer.install(backend, encode)
    setattr(model, _STATE_ATTR, Applied(reducer, backend, undo))
    return model


def applied_reducer(model: nn.Module):
    """The reducer applied to ``model`` now, or None."""
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
    overrides = state.backend.processor_overrides(processor, state.tokens_per_image, full=state.keeps_all)
    for name, function in overrides.items():
        setattr(processor, name, function)
    processor.__dict__[_OVERRIDES_ATTR] = tuple(overrides)
    return processor
