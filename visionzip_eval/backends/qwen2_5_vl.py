"""transformers ``Qwen2_5_VLForConditionalGeneration`` (Qwen/Qwen2.5-VL-*-Instruct), images.

Facts this module relies on (transformers 5):
- Dynamic resolution: the image processor resizes each image to multiples of 28 px and returns
  ``pixel_values`` (all images' 14 px patches packed, (sum t*h*w, 3*2*14*14)) and
  ``image_grid_thw`` (images, 3) in patches (t = 1 for an image). The processor expands each
  ``<|image_pad|>`` to ``t*h*w / merge_size**2`` placeholders (``replace_image_token``) and builds
  ``mm_token_type_ids`` from the expanded ids.
- The tower (``Qwen2_5_VisionTransformerPretrainedModel``) reorders the patches into 112 px
  windows (``get_vision_window_index``; a 2x2 merge unit stays 4 consecutive rows), runs blocks
  with window attention except ``fullatt_block_indexes`` (full attention within each image,
  7/15/23/31 of 32 in the checkpoints: the last block is a full-attention one), then the
  ``PatchMerger`` (``ln_q``, view 4 patches as one row, 2-layer MLP) and undoes the window order:
  one LLM token per 2x2 patches, raster order. There is no CLS token.
- M-RoPE: ``get_rope_index`` gives each image token the (t, h, w) of its merged cell offset by the
  text position before the image, then advances the text position by ``max(h, w) / 2``;
  ``generate`` computes these position ids *before* it encodes the images.

VisionZip on Qwen2.5-VL:
- **Signal** (no CLS): each merged token is scored by the attention its 4 patches receive in the
  last full-attention block (``max(fullatt_block_indexes)``): per head, the softmax of that block's
  RoPE-rotated queries and keys within the image, averaged over all queries, then averaged over
  the 4 patches of the merged token; heads summed. Computed from the block's captured ``qkv``
  output and rotary embeddings in query chunks (``selection.received_attention``): the tower
  keeps SDPA / FlashAttention. Contextual merging uses the block's keys before RoPE, averaged
  over heads and over the 4 patches.
- **Tokens**: the merged rows the merger's MLP would read (``ln_q`` output, 4 patches concatenated),
  selected with ``selection.visionzip_select(cls_token=False)``, then the merger's MLP (the
  projector). **Visual tokens per image = min(dominant + contextual, t*h*w/4)**: an image with
  no more merged tokens than the budget stays unreduced. Images are reduced one at a time
  (their grids differ; the tower's attention is per image anyway).
- **Positions**: each kept token keeps the M-RoPE position of the merged cell it came from
  (dominant: its own cell; contextual: its target's cell), and text after the image keeps the
  positions it has without reduction (the image still advances them by ``max(h, w) / 2``).
  ``get_rope_index`` is replaced on this model instance: when ``generate`` asks for positions
  before encoding, the images are encoded right then and the result is reused by
  ``get_image_features``.
- Not supported under reduction (refused with a clear error): native videos
  (``<|video_pad|>``, ``pixel_values_videos``); the lmms-eval adapter passes a video's sampled
  frames as images instead (``video_token_id`` is None here), each frame reduced like an image.
  Beam search with reused image tokens is untested. ``budget=full`` runs the same
  capture path with the model's own counts and positions.
- ``vision_flops`` is for a nominal 448 x 448 image (32 x 32 patches, 256 merged tokens).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    apply_rotary_pos_emb_vision,
)
from transformers.vision_utils import get_vision_window_index

from visionzip_eval.backends.base import TowerSignals, VLMBackend, chat_messages, register_backend
from visionzip_eval.selection import Selection, grid_for, received_attention
from visionzip_eval.backends.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, instantiate, tiny_tokenizer

NOMINAL_GRID = (1, 32, 32)  # 448 x 448 px, for vision_flops


class _StopTower(Exception):
    """Raised at the merger: the MLP is the projector, applied after the selection."""


@dataclass
class MergedTokenSignals(TowerSignals):
    """Signals over merged (2x2) tokens: ``received`` (B, H, M) is the precomputed score."""

    received: torch.Tensor | None = None

    @property
    def cls_attention(self) -> torch.Tensor:
        if self.received is None:
            raise RuntimeError("attention signals were not captured (capture(..., attention=True))")
        return self.received

    @property
    def metric(self) -> torch.Tensor:
        if self.keys is None:
            raise RuntimeError("attention signals were not captured (capture(..., attention=True))")
        return self.keys


def _core(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, Qwen2_5_VLModel) else model


# -- the tiny offline model (builtin:tiny-qwen2.5-vl) ----------------------------------------------

QWEN_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|endoftext|>",
)
# The chat template of Qwen/Qwen2.5-VL-*-Instruct, reduced to what the harness sends (text, images,
# videos; default system prompt).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_qwen2_5_vl_processor(max_pixels: int = 224 * 224):
    """Qwen2.5-VL's processor (dynamic resolution, 14 px patches, 2x2 merge) built in code; the
    pixel range is shrunk (default at most 224 x 224 = 64 merged tokens) so CPU tests stay fast."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = tiny_tokenizer(QWEN_SPECIAL_TOKENS)
    size = {"shortest_edge": 56 * 56, "longest_edge": max_pixels}
    common = dict(
        size=size, patch_size=14, temporal_patch_size=2, merge_size=2,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    )
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**common),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )


def build_tiny_qwen2_5_vl(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vision_hidden: int = 64,
    vision_depth: int = 4,
    vision_heads: int = 4,
    fullatt_block_indexes: tuple[int, ...] = (1, 3),
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    max_pixels: int = 224 * 224,
):
    """A random-weight Qwen2.5-VL (Qwen/Qwen2.5-VL-*-Instruct look-alike: 14 px patches, 2x2
    PatchMerger, 112 px attention windows with full attention in ``fullatt_block_indexes``, M-RoPE
    LLM) and its processor, deterministic by seed."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor = tiny_qwen2_5_vl_processor(max_pixels)
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    head_dim = text_hidden // text_heads
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_heads=vision_heads,
            out_hidden_size=text_hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=list(fullatt_block_indexes),
            hidden_act="silu",
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=text_hidden * 3,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            num_key_value_heads=text_kv_heads,
            max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [head_dim // 8, head_dim // 8 * 3 // 2, head_dim // 8 * 3 // 2]},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            tie_word_embeddings=False,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = instantiate(Qwen2_5_VLForConditionalGeneration, config, tokenizer, seed, attn_implementation)
    with torch.no_grad():  # sharper than the 0.02 init: attention scores that are not uniform
        for block in model.model.visual.blocks:
            block.attn.qkv.weight.mul_(8.0)
    return model, processor


@register_backend
class Qwen2_5_VLBackend(VLMBackend):
    name = "qwen2.5-vl (Qwen2_5_VLForConditionalGeneration, window-attention ViT + 2x2 merger, images)"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)
    model_class: ClassVar[type] = Qwen2_5_VLForConditionalGeneration
    builtin: ClassVar[dict[str, Callable]] = {"builtin:tiny-qwen2.5-vl": build_tiny_qwen2_5_vl}

    cls_token: ClassVar[bool] = False
    in_llm_pruning: ClassVar[bool] = False  # 3-D multimodal rotary positions (mrope)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel))

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.core = _core(model)
        self.config = self.core.config
        self.visual = self.core.visual
        vision = self.config.vision_config
        self.merge = vision.spatial_merge_size
        full = list(vision.fullatt_block_indexes or [])
        self.signal_block = max(full) if full else len(self.visual.blocks) - 1
        self._grid = (NOMINAL_GRID[1] // self.merge, NOMINAL_GRID[2] // self.merge)

    # -- geometry -------------------------------------------------------------------------
    @property
    def tower_tokens(self) -> int:
        """Merged tokens of the largest image the processor can produce (budgets above it never
        reduce anything and are refused)."""
        processor_max = getattr(self, "_max_tokens", None)
        return processor_max or 16384

    @property
    def full_tokens(self) -> int:
        """Merged tokens of the nominal 448 px image (real images: t*h*w/4 of their own grid)."""
        return NOMINAL_GRID[0] * NOMINAL_GRID[1] * NOMINAL_GRID[2] // self.merge**2

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def video_token_id(self) -> None:
        """None: the harness passes a video's sampled frames as images (each reduced to the
        per-image budget); the native ``<|video_pad|>`` path is refused under a reduction."""
        return None

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of merged tokens of the image being encoded."""
        return self._grid

    @property
    def patch_offset(self) -> int:
        return 0

    def tokens_for_grid(self, grid_thw, tokens_per_image: int | None) -> int:
        """Visual tokens one image of ``grid_thw`` receives: min(budget, t*h*w/4)."""
        t, h, w = (int(v) for v in grid_thw)
        merged = t * h * w // (self.merge**2)
        return merged if tokens_per_image is None else min(tokens_per_image, merged)

    def vision_flops(self, tokens_out: int) -> int:
        vision = self.config.vision_config
        t, h, w = NOMINAL_GRID
        n = t * h * w
        d, m = vision.hidden_size, vision.intermediate_size
        window = (vision.window_size // vision.patch_size) ** 2
        embed = n * vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * d
        full_layers = len(vision.fullatt_block_indexes or [])
        window_layers = vision.depth - full_layers
        dense = 4 * n * d * d + 3 * n * d * m  # qkv + proj, SwiGLU MLP
        layers = vision.depth * dense + full_layers * 2 * n * n * d + window_layers * 2 * n * min(window, n) * d
        wide = d * self.merge**2
        projector = tokens_out * (wide * wide + wide * vision.out_hidden_size)
        return 2 * (embed + layers + projector)

    def modules(self) -> dict[str, nn.Module]:
        return {
            "vision_tower": self.visual,
            "projector": self.visual.merger.mlp,
            "language_model": self.core.language_model,
            "lm_head": getattr(self.model, "lm_head", None) or self.core.language_model.norm,
        }

    # -- prompts and inputs -----------------------------------------------------------------
    def chat_prompt(self, processor, turns: list[tuple[str, str | None]], images: int, videos: int = 0) -> str:
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(chat_messages(turns, images, videos), add_generation_prompt=True)
        text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        for index, (user, reply) in enumerate(turns):
            first = index == 0
            vision = "<|vision_start|><|image_pad|><|vision_end|>" * (images if first else 0)
            vision += "<|vision_start|><|video_pad|><|vision_end|>" * (videos if first else 0)
            text += f"<|im_start|>user\n{vision}{user}<|im_end|>\n"
            if reply is not None:
                text += f"<|im_start|>assistant\n{reply}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"

    def processor_overrides(self, processor, tokens_per_image: int, full: bool) -> dict[str, Callable]:
        if full:
            return {}
        backend = self

        def replace_image_token(image_inputs, image_idx, **kwargs) -> str:
            grid = image_inputs["image_grid_thw"][image_idx]
            return processor.image_token * backend.tokens_for_grid(grid, tokens_per_image)

        def replace_video_token(video_inputs, video_idx, **kwargs) -> str:
            raise ValueError(_VIDEO_REFUSED)

        return {"replace_image_token": replace_image_token, "replace_video_token": replace_video_token}

    def processor_inputs(self, images: list[list], videos: list[list[list]]) -> dict:
        kwargs = {}
        flat = [image for request in images for image in request]
        if flat:
            kwargs["images"] = flat
        flat_videos = [video for request in videos for video in request]
        if flat_videos:
            kwargs["videos"] = flat_videos
        return kwargs

    def tower_units(self, inputs: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]]:
        grids = inputs.get("image_grid_thw")
        videos = inputs.get("video_grid_thw")
        return [1] * (0 if grids is None else len(grids)), [] if videos is None else [int(g[0]) for g in videos]

    def encode_for_generate(self, inputs: Mapping[str, torch.Tensor]) -> dict:
        encoded = {}
        if inputs.get("pixel_values") is not None:
            encoded["image"] = self.core.get_image_features(
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
            )
        if inputs.get("pixel_values_videos") is not None:
            encoded["video"] = self.core.get_video_features(
                pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"]
            )
        return encoded

    # -- tower ------------------------------------------------------------------------------
    def capture(self, pixel_values: torch.Tensor, attention: bool, grid_thw: torch.Tensor | None = None) -> TowerSignals:
        """One image: ``pixel_values`` (t*h*w, C) and its ``grid_thw`` (3,) (default: the grid set
        by the image loop of ``install``). Returns hidden (1, M, 4*D_vision) in raster order and,
        with ``attention``, the received-attention score (1, H, M) and keys (1, M, head_dim)."""
        if grid_thw is None:
            grid_thw = getattr(self, "_current_grid", None)
        if grid_thw is None:
            raise ValueError("Qwen2.5-VL packs images of any size: pass each image's grid_thw to capture()")
        grid = torch.as_tensor(grid_thw).reshape(1, 3).to(pixel_values.device)
        visual = self.visual
        block = visual.blocks[self.signal_block]
        attn = block.attn
        store: dict = {}

        def on_attn(module, args, kwargs):
            store["rope"] = kwargs["position_embeddings"]
            store["cu"] = kwargs["cu_seqlens"]

        def on_qkv(module, args, output):
            store["qkv"] = output

        def on_merger(module, args):
            store["x"] = args[0]
            raise _StopTower

        handles = [visual.merger.register_forward_pre_hook(on_merger)]
        if attention:
            handles += [
                attn.register_forward_pre_hook(on_attn, with_kwargs=True),
                attn.qkv.register_forward_hook(on_qkv),
            ]
        try:
            visual(pixel_values.type(visual.dtype), grid_thw=grid)
        except _StopTower:
            pass
        finally:
            for handle in handles:
                handle.remove()

        window_index, _ = get_vision_window_index(
            grid, spatial_merge_size=self.merge, window_size=visual.window_size, patch_size=visual.patch_size
        )
        order = torch.argsort(window_index.to(pixel_values.device))  # window order -> raster order
        unit = self.merge**2
        x = visual.merger.ln_q(store["x"])
        hidden = x.reshape(-1, unit * x.shape[-1])[order].unsqueeze(0)
        heads = attn.num_heads
        if not attention:
            return MergedTokenSignals(hidden=hidden, num_heads=heads, scale=attn.scaling, cls_token=False)

        patches = store["qkv"].shape[0]
        q, k, _ = store["qkv"].reshape(patches, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # (P, H, d)
        cos, sin = store["rope"]
        q_rot, k_rot = apply_rotary_pos_emb_vision(q, k, cos, sin)
        cu = store["cu"].tolist()
        scores = []
        for start, end in itertools.pairwise(cu):  # full attention: one segment per frame
            queries = q_rot[start:end].reshape(1, end - start, -1)
            keys = k_rot[start:end].reshape(1, end - start, -1)
            scores.append(received_attention(queries, keys, heads, attn.scaling)[0])  # (H, n)
        per_patch = torch.cat(scores, dim=1)  # (H, P), window order
        received = per_patch.reshape(heads, -1, unit).mean(dim=2)[:, order].unsqueeze(0)  # (1, H, M)
        metric = k.float().mean(dim=1).reshape(-1, unit, k.shape[-1]).mean(dim=1)[order].unsqueeze(0)
        return MergedTokenSignals(
            hidden=hidden, num_heads=heads, scale=attn.scaling, keys=metric, received=received, cls_token=False
        )

    def full_features(self, signals: TowerSignals) -> torch.Tensor:
        return signals.hidden

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.visual.merger.mlp(tokens)

    def row_positions(self, selection: Selection, rows: int) -> torch.Tensor:
        """(rows,) the raster index of the merged cell whose M-RoPE position each output row takes."""
        merged = self._grid[0] * self._grid[1]
        device = selection.tokens.device
        if selection.dominant_index is None:
            if rows == merged:
                return torch.arange(merged, device=device)
            # pooled cells: the merged cell at each pooling cell's centre
            gh, gw = grid_for(rows, *self._grid)
            r = ((torch.arange(gh, device=device) + 0.5) * self._grid[0] / gh).long()
            c = ((torch.arange(gw, device=device) + 0.5) * self._grid[1] / gw).long()
            return (r[:, None] * self._grid[1] + c[None, :]).flatten()
        parts = [selection.dominant_index[0]]
        if selection.contextual_index is not None:
            parts.append(selection.contextual_index[0])
        return torch.cat(parts).to(device)[:rows]

    # -- installing -------------------------------------------------------------------------
    def install(
        self, encode: Callable[[torch.Tensor], Selection], tokens_per_image: int, full: bool = False
    ) -> Callable[[], None]:
        return _ReducedImages(self, encode, tokens_per_image, full).attach()


class _ReducedImages:
    """VisionZip installed on one Qwen2.5-VL: the inner model's ``get_image_features`` encodes
    each image through the reducer, ``get_rope_index`` gives the kept tokens their M-RoPE
    positions, videos are refused, and a pre-hook checks the prompt's placeholder counts.
    ``generate`` asks for positions before it encodes, so the positions' encoding is kept
    (``pending``) and handed to the next ``get_image_features`` of the same pixels."""

    def __init__(self, backend: "Qwen2_5_VLBackend", encode: Callable[[torch.Tensor], Selection],
                 tokens_per_image: int, full: bool):
        self.backend, self.encode, self.tokens_per_image, self.full = backend, encode, tokens_per_image, full
        self.model, self.core, self.config = backend.model, backend.core, backend.config
        self.original_rope_index = self.core.get_rope_index
        self.original_prepare = getattr(self.model, "_prepare_position_ids_for_generation", None)
        self.pending = None  # (pixel_values, their encoding) from get_rope_index, for get_image_features
        self.last: list[tuple[torch.Tensor, torch.Tensor]] = []  # (features, positions) per image
        self.grids = None  # the image_grid_thw of the last encode

    def attach(self) -> Callable[[], None]:
        core, model = self.core, self.model
        if self.original_prepare is not None and model is not core:
            model._prepare_position_ids_for_generation = self.prepare_position_ids
        core.get_image_features = self.get_image_features  # instance attributes: this model only
        if not self.full:
            core.get_video_features = self.get_video_features
            core.get_rope_index = self.get_rope_index
        hook = core.register_forward_pre_hook(self.check_placeholders, with_kwargs=True)

        def undo() -> None:
            for name in ("get_image_features", "get_video_features", "get_rope_index"):
                core.__dict__.pop(name, None)
            model.__dict__.pop("_prepare_position_ids_for_generation", None)
            hook.remove()
            core.rope_deltas = None

        return undo

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> BaseModelOutputWithPooling:
        try:
            return self._encode_each(pixel_values, image_grid_thw)
        finally:
            self.backend._current_grid = None  # capture() outside this loop must be given a grid

    def _encode_each(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> BaseModelOutputWithPooling:
        backend = self.backend
        features, last = [], []
        start = 0
        for grid in image_grid_thw:
            count = int(grid.prod())
            pixels = pixel_values[start : start + count]
            start += count
            backend._current_grid = grid
            t, h, w = (int(v) for v in grid)
            if t != 1:
                raise ValueError(f"image grid {tuple(grid.tolist())}: VisionZip on Qwen2.5-VL takes images (t = 1)")
            backend._grid = (h // backend.merge, w // backend.merge)
            merged = h * w // backend.merge**2
            if self.full or merged <= self.tokens_per_image:
                # unreduced: the image has no more merged tokens than the budget
                signals = backend.capture(pixels, attention=False)
                rows = backend.project(signals.hidden)[0]
                positions = torch.arange(merged, device=rows.device)
            else:
                selection = self.encode(pixels)
                rows = selection.tokens[0]
                positions = backend.row_positions(selection, rows.shape[0])
            features.append(rows)
            last.append((rows, positions))
        self.last = last
        self.grids = image_grid_thw
        return BaseModelOutputWithPooling(pooler_output=tuple(features))

    # Same signature as Qwen2_5_VLModel.get_image_features: generate() inspects it.
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **kwargs):
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] is pixel_values:
            return pending[1]
        return self.encode_images(pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw=None, **kwargs):
        raise ValueError(_VIDEO_REFUSED)

    def positions_for(self, kwargs, image_grid_thw) -> list[torch.Tensor]:
        """The M-RoPE cells of each image's kept tokens."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is not None:  # generate: positions before encoding; encode now, reuse later
            self.pending = (pixel_values, self.encode_images(pixel_values, image_grid_thw))
            return [p for _, p in self.last]
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        last = self.last
        if encoded is not None:
            by_id = {id(rows): positions for rows, positions in last}
            found = [by_id.get(id(rows)) for rows in encoded.pooler_output]
            if all(p is not None for p in found):
                return found
            if [len(r) for r in encoded.pooler_output] == [len(r) for r, _ in last]:
                return [p for _, p in last]
            raise ValueError(
                "reused image tokens whose M-RoPE positions are unknown: encode them with this "
                "model (engine.encode / get_image_features) right before generating"
            )
        return [p for _, p in last]

    def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None, **kwargs):
        if video_grid_thw is not None:
            raise ValueError(_VIDEO_REFUSED)
        if image_grid_thw is None:
            return self.original_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                            second_per_grid_ts, attention_mask, **kwargs)
        kept = iter(self.positions_for(kwargs, image_grid_thw))
        return reduced_rope_index(self.core, input_ids, mm_token_type_ids, iter(image_grid_thw), kept, attention_mask)

    def check_placeholders(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        grid = kwargs.get("image_grid_thw")
        if input_ids is None or grid is None or kwargs.get("pixel_values") is None:
            return
        budget = None if self.full else self.tokens_per_image
        expected = sum(self.backend.tokens_for_grid(g, budget) for g in grid)
        found = int((input_ids == self.config.image_token_id).sum())
        if found != expected:
            raise ValueError(
                f"the prompt holds {found} image placeholder tokens, but the model now passes {expected} "
                f"for these {len(grid)} image(s) (min({self.tokens_per_image}, t*h*w/4) each): build the inputs "
                "with visionzip_processor(processor, model)"
            )

    def prepare_position_ids(self, inputs_tensor, model_kwargs):
        # Image tokens reused from an earlier encode (mm_encoder_outputs, prompt built by the
        # tokenizer alone): give generate what M-RoPE needs, the token types and the grids.
        encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        grids = self.grids
        if (
            encoded is not None
            and model_kwargs.get("image_grid_thw") is None
            and grids is not None
            and len(grids) == len(encoded.pooler_output)
        ):
            model_kwargs["image_grid_thw"] = grids
            if model_kwargs.get("mm_token_type_ids") is None:
                model_kwargs["mm_token_type_ids"] = (input_ids == self.config.image_token_id).long()
        return self.original_prepare(inputs_tensor, model_kwargs)


_VIDEO_REFUSED = (
    "VisionZip on Qwen2.5-VL reduces images only: videos (<|video_pad|>) are not supported under "
    "reduction (use budget=full, or pass the frames as images)"
)


def reduced_rope_index(core, input_ids, mm_token_type_ids, grids, kept, attention_mask=None):
    """``Qwen2_5_VLModel.get_rope_index`` for reduced images: each image group takes the M-RoPE
    positions of its kept cells (``kept``: per image, raster indices of merged cells) out of the
    image's full grid; text positions advance exactly as without reduction."""
    merge = core.config.vision_config.spatial_merge_size
    position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    deltas = []
    for row, ids in enumerate(input_ids):
        types = mm_token_type_ids[row]
        if attention_mask is not None:
            mask = attention_mask[row].bool()
            ids, types = ids[mask], types[mask]
        current, pieces = 0, []
        for kind, group in itertools.groupby(types.tolist()):
            length = len(list(group))
            if kind == 0:
                pieces.append(torch.arange(length, device=ids.device).view(1, -1).expand(3, -1) + current)
                current += length
                continue
            if kind != 1:
                raise ValueError(_VIDEO_REFUSED)
            grid = next(grids)
            cells = next(kept).to(ids.device)
            if cells.numel() != length:
                raise ValueError(
                    f"an image group of {length} placeholders for {cells.numel()} kept tokens: build the inputs "
                    "with visionzip_processor(processor, model)"
                )
            full = core.get_vision_position_ids(current, grid, 1, merge, 1, device=ids.device)
            pieces.append(full[:, cells])
            current += max(int(grid[1]), int(grid[2])) // merge
        positions = torch.cat(pieces, dim=1)
        if attention_mask is not None:
            position_ids[:, row, attention_mask[row].bool()] = positions.to(position_ids.dtype)
        else:
            position_ids[:, row] = positions.to(position_ids.dtype)
        deltas.append(int(positions.max()) + 1 - len(ids))
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)
