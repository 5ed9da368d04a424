"""The contract between a token reducer and a model family, and the backend registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn

from visionzip_eval.selection import Selection, cls_attention_row, head_mean_keys, received_attention


@dataclass
class TowerSignals:
    """What one forward of the vision tower up to layer L leaves behind.

    ``hidden``: (B, N, D) output of layer L. ``query_cls`` (B, D) and ``keys`` (B, N, D) are
    layer L's projected CLS query and keys, captured only when a reducer asks for them.
    Towers without a CLS token (``cls_token=False``, SigLIP) leave every query instead:
    ``queries`` (B, N, D).
    """

    hidden: torch.Tensor
    num_heads: int
    scale: float
    query_cls: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    cls_token: bool = True
    _cache: dict = field(default_factory=dict, repr=False)

    def _need(self) -> None:
        query = self.query_cls if self.cls_token else self.queries
        if query is None or self.keys is None:
            raise RuntimeError("attention signals were not captured (capture(..., attention=True))")

    @property
    def cls_attention(self) -> torch.Tensor:
        """(B, H, N) the per-head attention scores VisionZip ranks tokens by, float32: the CLS
        query's attention probabilities of layer L, or without a CLS token the mean attention
        each token receives from all queries of layer L."""
        self._need()
        if "cls_attention" not in self._cache:
            if self.cls_token:
                scores = cls_attention_row(self.query_cls, self.keys, self.num_heads, self.scale)
            else:
                scores = received_attention(self.queries, self.keys, self.num_heads, self.scale)
            self._cache["cls_attention"] = scores
        return self._cache["cls_attention"]

    @property
    def metric(self) -> torch.Tensor:
        """(B, N, D / H) layer L's keys averaged over heads."""
        self._need()
        return head_mean_keys(self.keys, self.num_heads)


def chat_messages(turns: list[tuple[str, str | None]], images: int, videos: int = 0) -> list[dict]:
    """transformers chat messages for ``turns`` of (user text, reply or None), with the image and
    video placeholders in the first user turn (what ``apply_chat_template`` takes)."""
    messages = []
    for index, (user, reply) in enumerate(turns):
        first = index == 0
        content = [{"type": "image"} for _ in range(images if first else 0)]
        content += [{"type": "video"} for _ in range(videos if first else 0)]
        content.append({"type": "text", "text": user})
        messages.append({"role": "user", "content": content})
        if reply is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    return messages


class VLMBackend(ABC):
    """One model family. Instances wrap one model and hold no other state.

    A *unit* is one tower forward: an image for LLaVA-1.5, a crop (base image included) for
    AnyRes models, a frame of a video. Reducers work per unit, so ``tokens_per_image`` of a
    reducer is per unit, and a request's visual tokens are its units times that count.
    """

    name: ClassVar[str]
    cls_token: ClassVar[bool] = True  # the tower's token 0 is a CLS token (CLIP); SigLIP has none
    # the LLM is a standard transformers decoder (``layers`` of ``self_attn`` with q/k
    # projections, 1-D rotary positions), so in-LLM methods can prune inside it
    in_llm_pruning: ClassVar[bool] = True
    # an image is several units (AnyRes crops) packed into one sequence for the LLM
    packs_units: ClassVar[bool] = False
    # -- loading (visionzip_eval.loading dispatches on these) ---------------------------------
    model_types: ClassVar[tuple[str, ...]] = ()  # config.json model_type values this family loads
    claim_order: ClassVar[int] = 0  # lower claims first (for configs another family would also claim)
    # the transformers class whose ``from_pretrained`` loads this family's checkpoints (``load``)
    model_class: ClassVar[type | None] = None
    # builtin:* name -> the family's tiny offline builder: (seed=0, attn_implementation=...) ->
    # (model, processor), CPU, float32, eval mode
    builtin: ClassVar[dict[str, Callable]] = {}

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def claims(cls, config: dict) -> bool:
        """Whether this family loads a checkpoint with this raw config.json."""
        return config.get("model_type") in cls.model_types

    @classmethod
    def load(cls, pretrained: str, dtype, device, attn_implementation: str | None):
        """(model, processor) of a checkpoint this family claims (hub id or local folder), in
        ``dtype`` on ``device``, eval mode: ``model_class.from_pretrained`` and its processor."""
        if cls.model_class is None:
            raise NotImplementedError(f"{cls.name} cannot load checkpoints")
        from transformers import AutoProcessor

        model = cls.model_class.from_pretrained(pretrained, dtype=dtype, attn_implementation=attn_implementation)
        return model.to(device).eval(), AutoProcessor.from_pretrained(pretrained)

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
    def video_token_id(self) -> int | None:
        """The placeholder of a native video input; None: videos go in as frames (images)."""
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

    def tower_layers(self) -> tuple[list[nn.Module], int]:
        """The tower's encoder layers (each with ``self_attn.q_proj/k_proj``, ``num_heads``,
        ``scale``) and the index of layer L among them, for views over every layer
        (``visionzip_eval.demos.redundancy``)."""
        raise ValueError(f"{self.name} does not expose its tower's layers")

    def next_layer_projections(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The projected queries and keys (B, N, D) that the tower layer after layer L computes
        from layer L's output ``hidden`` (LLaVA-PruMerge's signal); None where layer L is the
        tower's last or the family does not expose its layers."""
        return None

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
    def chat_prompt(
        self, processor, turns: list[tuple[str, str | None]], images: int, videos: int = 0
    ) -> str:
        """The checkpoint's conversation format for ``turns`` of (user text, assistant reply or
        None for the turn to generate), with ``images`` image and ``videos`` video placeholders
        in the first turn."""

    @abstractmethod
    def encode_for_generate(self, inputs: Mapping[str, torch.Tensor]) -> dict:
        """The processor's vision outputs (``pixel_values``, ...) encoded as the
        ``mm_encoder_outputs`` dict ``generate`` takes: ``{"image": ..., "video": ...}``."""

    @abstractmethod
    def install(
        self, encode: Callable[[torch.Tensor], Selection], tokens_per_image: int, full: bool = False
    ) -> Callable[[], None]:
        """Route this model's image features through ``encode`` (a batch of units -> a Selection
        whose ``tokens`` are projected: (units, tokens_per_image, llm_hidden)); returns the undo
        function. ``full``: the reducer keeps every token (the model's own layout applies)."""

    # -- inside the LLM (in-LLM methods: visionzip_eval.methods.llm_pruning) ---------------------------
    def decoder(self) -> nn.Module:
        """The decoder stack: ``layers``, each with ``input_layernorm`` and ``self_attn``
        (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``)."""
        return self.modules()["language_model"]

    def track_visual_rows(self, callback: Callable[[torch.Tensor | None], None]) -> Callable[[], None]:
        """Before each forward of the model, call ``callback`` with (B, L) bool: which rows of
        the decoder's input are visual tokens (None: no ``input_ids``); returns the undo.
        Default: the rows of the image / video placeholder tokens of ``input_ids``."""
        placeholders = [i for i in (self.image_token_id, self.video_token_id) if i is not None]

        def hook(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                callback(None)
                return
            callback(torch.isin(input_ids, torch.tensor(placeholders, device=input_ids.device)))

        return self.model.register_forward_pre_hook(hook, with_kwargs=True).remove

    # -- image shape (image_aspect: how LLaVA-1.5 squares a non-square image) --------------------
    @property
    def image_aspects(self) -> tuple[str, ...]:
        """The ``image_aspect`` values this model takes (``pad``, ``crop``); none (default):
        the family shapes its own images."""
        return ()

    def native_image_aspect(self, processor) -> str | None:
        """What ``processor`` does by itself (``pad`` / ``crop``); None: neither applies."""
        return None

    def shape_images(self, processor, images: list, image_aspect: str | None) -> list:
        """One request's ``images`` as the processor should receive them."""
        return list(images)

    def image_processor_kwargs(self, processor, image_aspect: str | None) -> dict:
        """Keyword arguments for the processor call under ``image_aspect``."""
        return {}

    # -- input side (defaults: one unit per image, no native video) ---------------------------
    def processor_inputs(self, images: list[list], videos: list[list[list]]) -> dict:
        """The processor's visual arguments for a batch: per request its images, and its videos
        as lists of frames."""
        if any(videos):
            raise ValueError(f"{self.name} takes videos as frames (images), not as videos")
        flat = [image for request in images for image in request]
        return {"images": flat} if flat else {}

    def processor_overrides(self, processor, tokens_per_image: int, full: bool) -> dict[str, Callable]:
        """Instance attributes that make ``processor`` expand each placeholder to the count the
        model receives with ``tokens_per_image`` tokens per unit."""

        def replace_image_token(image_inputs, image_idx, **kwargs) -> str:
            return processor.image_token * tokens_per_image

        return {"replace_image_token": replace_image_token}

    def tower_units(self, inputs: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]]:
        """Units (tower forwards) per image and per video of processed ``inputs``, in order."""
        pixel_values = inputs.get("pixel_values")
        return [1] * (0 if pixel_values is None else len(pixel_values)), []

    # -- generation (defaults: a transformers processor builds the inputs) ---------------------
    def prepare_inputs(self, processor, texts: list[str], images: list[list]) -> dict | None:
        """For models that do not take a transformers processor's outputs: the inputs of a batch
        (``texts``: the prompts from ``chat_prompt``; ``images``: per request its images), left
        padded, with at least ``input_ids`` and ``attention_mask`` (what ``count_tokens`` reads);
        ``generate`` consumes them. ``None`` (default): the engine uses the processor."""
        return None

    def generate(self, inputs: Mapping[str, torch.Tensor], **kwargs) -> torch.Tensor:
        """Generate for a batch; returns the sequences with the prompt first (as transformers'
        ``generate`` does): row r's new tokens start at ``inputs["input_ids"].shape[1]``."""
        return self.model.generate(**inputs, **kwargs)

    def count_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens_per_image: int
    ) -> tuple[int, int]:
        """(visual tokens, prompt tokens) the LLM receives for one row of the inputs (visual
        included in the prompt). Default: the prompt carries one placeholder per visual token."""
        placeholders = [i for i in (self.image_token_id, self.video_token_id) if i is not None]
        visual = sum(int((input_ids == token_id).sum()) for token_id in placeholders)
        return visual, int(attention_mask.sum())


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
