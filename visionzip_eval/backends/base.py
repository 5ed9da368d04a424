"""The contract between a token reducer and a model family, and the backend registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from visionzip_eval.selection import cls_attention_row, head_mean_keys


@dataclass
class TowerSignals:
    """What one forward of the vision tower up to layer L leaves behind.

    ``hidden``: (B, N, D) output of layer L. ``query_cls`` (B, D) and ``keys`` (B, N, D) are
    layer L's projected CLS query and keys, captured only when a reducer asks for them.
    """

    hidden: torch.Tensor
    num_heads: int
    scale: float
    query_cls: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def _need(self) -> None:
        if self.query_cls is None or self.keys is None:
            raise RuntimeError("attention signals were not captured (capture(..., attention=True))")

    @property
    def cls_attention(self) -> torch.Tensor:
        """(B, H, N) CLS-query attention probabilities of layer L, float32."""
        self._need()
        if "cls_attention" not in self._cache:
            self._cache["cls_attention"] = cls_attention_row(
                self.query_cls, self.keys, self.num_heads, self.scale
            )
        return self._cache["cls_attention"]

    @property
    def metric(self) -> torch.Tensor:
        """(B, N, D / H) layer L's keys averaged over heads."""
        self._need()
        return head_mean_keys(self.keys, self.num_heads)


class VLMBackend(ABC):
    """One model family. Instances wrap one model and hold no other state."""

    name: ClassVar[str]

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this backend serves ``model``."""

    @property
    @abstractmethod
    def tower_tokens(self) -> int:
        """Tokens per image at layer L, CLS included (577 for CLIP-L/14 at 336 px)."""

    @property
    @abstractmethod
    def full_tokens(self) -> int:
        """Tokens per image the LLM receives without reduction (576 for LLaVA-1.5)."""

    @property
    def image_token_id(self) -> int | None:
        return None

    @property
    @abstractmethod
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid at layer L."""

    @property
    def patch_offset(self) -> int:
        """Position of the first patch token at layer L (1 behind a CLS token)."""
        return 1

    def patch_features(self, signals: TowerSignals) -> torch.Tensor:
        """(B, rows * cols, D) the patch tokens of layer L, row-major, no CLS."""
        return signals.hidden[:, self.patch_offset :]

    @abstractmethod
    def vision_flops(self, tokens_out: int) -> int:
        """FLOPs to encode one image into ``tokens_out`` LLM tokens (tower + projector)."""

    @abstractmethod
    def capture(self, pixel_values: torch.Tensor, attention: bool) -> TowerSignals:
        """Run the tower up to layer L and return its signals."""

    @abstractmethod
    def full_features(self, signals: TowerSignals) -> torch.Tensor:
        """The rows the unmodified model would project: (B, full_tokens, D)."""

    @abstractmethod
    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The multimodal projector: (B, K, D_vision) -> (B, K, D_llm)."""

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """The modules a profiler hooks: ``vision_tower``, ``projector``, ``language_model``
        (the decoder stack, called once per forward) and ``lm_head``."""

    @abstractmethod
    def chat_prompt(self, processor, turns: list[tuple[str, str | None]], images: int) -> str:
        """The checkpoint's conversation format for ``turns`` of (user text, assistant reply or
        None for the turn to generate), with ``images`` image placeholders in the first turn."""

    @abstractmethod
    def encode_for_generate(self, pixel_values: torch.Tensor):
        """Image features in the form ``generate(mm_encoder_outputs={"image": ...})`` takes."""

    @abstractmethod
    def install(self, encode: Callable[[torch.Tensor], torch.Tensor], tokens_per_image: int) -> Callable[[], None]:
        """Route this model's image features through ``encode``; returns the undo function."""


BACKENDS: list[type[VLMBackend]] = []


def register_backend(cls: type[VLMBackend]) -> type[VLMBackend]:
    BACKENDS.append(cls)
    return cls


def backend_for(model: nn.Module) -> VLMBackend:
    for cls in BACKENDS:
        if cls.matches(model):
            return cls(model)
    supported = ", ".join(cls.name for cls in BACKENDS)
    raise ValueError(
        f"no VisionZip backend for {type(model).__name__}: supported families are {supported}"
    )
