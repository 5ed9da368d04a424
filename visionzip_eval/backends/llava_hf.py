"""transformers ``LlavaForConditionalGeneration`` with a CLIP tower (llava-hf/llava-1.5-*-hf).

Facts this module relies on (transformers 5):
- ``LlavaModel.get_image_features(pixel_values, vision_feature_layer, ...)`` runs the tower,
  takes ``hidden_states[vision_feature_layer]`` (drops CLS under the ``default`` strategy) and
  projects it; ``generate`` calls it once before prefill through ``model.base_model``.
- ``hidden_states[i]`` (i >= 1) is the output of ``encoder.layers[i - 1]``, so LLaVA's -2 is
  the output of the penultimate layer, and the last layer's output is never used.
- ``LlavaModel.forward`` scatters the features into the positions of ``image_token_id``,
  and their counts must match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Mapping

import torch
from PIL import Image
from torch import nn
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_eval.backends.base import TowerSignals, VLMBackend, chat_messages, register_backend
from visionzip_eval.profiling import vit_flops
from visionzip_eval.selection import Selection
from visionzip_eval.backends.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, instantiate, tiny_tokenizer


# LLaVA-1.5's image_aspect values (visionzip_eval.media.IMAGE_ASPECTS, where they are parsed)
IMAGE_ASPECTS = ("pad", "crop")


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """``image`` centred on a square canvas of colour ``fill``, side = its longer side (a square
    image comes back as it is). The odd pixel of padding goes below / right: the placement of
    the original LLaVA's ``expand2square``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, ...]:
    """LLaVA-1.5's pad colour: the processor's ``image_mean`` as 8-bit values, truncated
    (``int(m * 255)``) as the original LLaVA computes it."""
    mean = getattr(image_processor, "image_mean", None)
    if mean is None:
        raise ValueError(f"{type(image_processor).__name__} has no image_mean to pad with: use image_aspect=crop")
    if isinstance(mean, (int, float)):
        mean = [mean] * 3
    return tuple(int(m * 255) for m in mean)


class _StopTower(Exception):
    """Raised by the layer-L hook: nothing after layer L is used, so the tower stops there."""


def _core(model: nn.Module) -> nn.Module:
    """The multimodal core (``LlavaModel``, ``LlavaNextModel``, ...) of a ``*ForConditionalGeneration``
    or the core itself: the module holding ``vision_tower`` whose ``get_image_features`` generate calls."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "vision_tower") else model


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def feature_layer_index(feature_layer: int, num_layers: int) -> int:
    """Index into the tower's ``encoder.layers`` of the layer whose output is
    ``hidden_states[feature_layer]`` (``hidden_states`` has ``num_layers + 1`` entries; entry
    i >= 1 is the output of ``layers[i - 1]``), so LLaVA's -2 is the penultimate layer."""
    if not isinstance(feature_layer, int):
        raise ValueError(f"vision feature layer {feature_layer!r}: VisionZip needs a single feature layer")
    position = feature_layer % (num_layers + 1)
    if position == 0:
        raise ValueError("the vision feature layer selects the embeddings, not a transformer layer")
    return position - 1


def capture_layer(
    tower: nn.Module, layer: nn.Module, pixel_values: torch.Tensor, attention: bool, cls_token: bool = True
) -> TowerSignals:
    """Run a CLIP / SigLIP ``tower`` (a transformers vision model) until ``layer`` (one of its
    ``encoder.layers``) has run, and return that layer's signals: its output, and with
    ``attention`` its projected queries (and the CLS query, with a CLS token) and keys, captured
    by forward hooks on ``q_proj`` / ``k_proj`` (the tower keeps SDPA / FlashAttention). The
    hooks are removed before returning; the layers after ``layer`` never run."""
    attn = layer.self_attn
    store: dict[str, torch.Tensor] = {}

    def on_query(module, args, output):
        # every query is kept: VisionZip's selection_precision=reference recomputes the layer's
        # whole attention map as the official code does (a view of what q_proj computed anyway)
        store["queries"] = output
        if cls_token:
            store["query_cls"] = output[:, 0]

    def on_keys(module, args, output):
        store["keys"] = output

    def on_layer(module, args, output):
        store["hidden"] = _first_tensor(output)
        raise _StopTower

    handles = [layer.register_forward_hook(on_layer)]
    if attention:
        handles += [
            attn.q_proj.register_forward_hook(on_query),
            attn.k_proj.register_forward_hook(on_keys),
        ]
    try:
        tower(pixel_values)
    except _StopTower:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return TowerSignals(
        hidden=store["hidden"],
        num_heads=attn.num_heads,
        scale=attn.scale,
        query_cls=store.get("query_cls"),
        keys=store.get("keys"),
        queries=store.get("queries"),
        cls_token=cls_token,
    )


def next_layer_projections(layers, index: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``q_proj`` / ``k_proj`` outputs (bias included, unscaled) of CLIP encoder layer ``index + 1``
    on the output of layer ``index``: what that layer's attention would compute from it."""
    if index + 1 >= len(layers):
        return None
    layer = layers[index + 1]
    normed = layer.layer_norm1(hidden)
    return layer.self_attn.q_proj(normed), layer.self_attn.k_proj(normed)


# -- the tiny offline model (builtin:tiny-llava) ---------------------------------------------------

# The chat template of llava-hf/llava-1.5-*-hf: "USER: <image>\n{text} ASSISTANT:".
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)



def tiny_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or tiny_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15_CHAT_TEMPLATE,
    )



def tiny_llava_config(
    vocab_size: int,
    image_token_id: int,
    vision_hidden: int = 64,
    vision_layers: int = 4,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int | None = None,  # None: 3 x text_hidden
) -> LlavaConfig:
    vision = CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or text_hidden * 3,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )



def build_tiny_llava(
    seed: int = 0, attn_implementation: str = "sdpa", **sizes: int
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-weight LLaVA-1.5 look-alike (CPU, float32, eval mode) and its processor."""
    processor = tiny_processor()
    tokenizer = processor.tokenizer
    config = tiny_llava_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        **sizes,
    )
    return instantiate(LlavaForConditionalGeneration, config, tokenizer, seed, attn_implementation), processor


# llava-hf/llava-1.5-7b-hf's config.json: CLIP ViT-L/14 at 336 px (24 layers, 1024 wide, 16

# heads, 4096 MLP), the 2-layer GELU projector, and Vicuna-7B (Llama: 4096 wide, 32 layers,
# 32 heads, 11008 MLP) with a 32064-token vocabulary.
LLAVA15_7B = dict(vision_hidden=1024, vision_layers=24, vision_heads=16, text_hidden=4096, text_layers=32,
                  text_heads=32, text_kv_heads=32, text_intermediate=11008)
LLAVA15_7B_VOCAB = 32064


def llava15_7b_config(layers: int = 32) -> LlavaConfig:
    """LLaVA-1.5-7B's exact architecture; ``layers`` < 32 keeps that many decoder layers (each
    of exactly the 7B's size) for a machine that cannot hold all 32."""
    if not (isinstance(layers, int) and 1 <= layers <= LLAVA15_7B["text_layers"]):
        raise ValueError(f"layers must be 1 to {LLAVA15_7B['text_layers']}, got {layers!r}")
    tokenizer = tiny_processor().tokenizer
    return tiny_llava_config(vocab_size=LLAVA15_7B_VOCAB, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                             **{**LLAVA15_7B, "text_layers": layers})



def build_llava15_7b_shape(layers: int = 32, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                           seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LLaVA-1.5-7B's architecture with random weights (``bench realsize``): the tiny tokenizer
    (the 32064-row embedding is the 7B's size whatever the tokenizer) and the CLIP processor."""
    processor = tiny_processor()
    model = instantiate(LlavaForConditionalGeneration, llava15_7b_config(layers), processor.tokenizer, seed,
                         "sdpa", dtype, device)
    return model, processor


def save_tiny_llava(directory: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Write a tiny model, tokenizer and processor that ``from_pretrained(directory)`` loads offline."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a folder: pass a folder (it is created if missing)")
    model, processor = build_tiny_llava(seed=seed, **sizes)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@register_backend
class LlavaHFBackend(VLMBackend):
    name = "llava-hf (LlavaForConditionalGeneration, CLIP tower)"
    cls_token: ClassVar[bool] = True  # the tower's token 0 is a CLS token
    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    model_class: ClassVar[type] = LlavaForConditionalGeneration
    builtin: ClassVar[dict[str, Callable]] = {"builtin:tiny-llava": build_tiny_llava}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not isinstance(model, (LlavaForConditionalGeneration, LlavaModel)):
            return False
        return isinstance(_core(model).vision_tower, CLIPVisionModel)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.core = _core(model)
        self.config = self.core.config
        tower = self.core.vision_tower
        self.layers = getattr(tower, "vision_model", tower).encoder.layers
        feature_layer = self.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise ValueError(
                f"vision_feature_layer={feature_layer!r}: VisionZip needs a single feature layer"
            )
        # hidden_states has len(layers) + 1 entries; entry i >= 1 is the output of layers[i - 1].
        position = feature_layer % (len(self.layers) + 1)
        if position == 0:
            raise ValueError("vision_feature_layer selects the embeddings, not a transformer layer")
        self.layer_index = position - 1
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        self._grid = (side, side)
        self._patches = side * side

    @property
    def tower_tokens(self) -> int:
        return self._patches + 1

    @property
    def full_tokens(self) -> int:
        default = self.config.vision_feature_select_strategy == "default"
        return self._patches if default else self._patches + 1

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self._grid

    # -- image_aspect: how LLaVA-1.5 makes a non-square image square -------------------------
    @property
    def image_aspects(self) -> tuple[str, ...]:
        """The ``image_aspect`` values this model takes: ``pad`` and ``crop`` for LLaVA-1.5
        (model type ``llava``); none for the families built on this one (AnyRes shapes its own)."""
        return IMAGE_ASPECTS if self.config.model_type == "llava" else ()

    def native_image_aspect(self, processor) -> str | None:
        """What ``processor`` does by itself: ``pad`` where its image processor pads
        (transformers' ``LlavaImageProcessor`` with ``do_pad=True``), else ``crop``
        (``CLIPImageProcessor``, what the llava-hf LLaVA-1.5 checkpoints ship)."""
        if not self.image_aspects:
            return None
        return "pad" if getattr(processor.image_processor, "do_pad", False) else "crop"

    def shape_images(self, processor, images: list, image_aspect: str | None) -> list:
        """``images`` as the processor should receive them: under ``pad`` each is centred on a
        square of the processor's mean colour (the original LLaVA's ``expand2square``), so the
        processor's resize + centre crop keeps all of it; under ``crop`` they pass unchanged."""
        if image_aspect != "pad" or not self.image_aspects:
            return list(images)
        fill = mean_colour(processor.image_processor)
        return [expand_to_square(image, fill) for image in images]

    def image_processor_kwargs(self, processor, image_aspect: str | None) -> dict:
        """Keyword arguments for the processor call: ``crop`` turns off a padding image processor."""
        if image_aspect == "crop" and getattr(processor.image_processor, "do_pad", False):
            return {"do_pad": False}
        return {}

    def vision_flops(self, tokens_out: int) -> int:
        return vit_flops(
            self.config.vision_config,
            layers_run=self.layer_index + 1,  # capture stops after the feature layer
            projector_in=self.config.vision_config.hidden_size,
            projector_out=self.config.text_config.hidden_size,
            tokens_out=tokens_out,
        )

    def modules(self) -> dict[str, nn.Module]:
        return {
            "vision_tower": self.core.vision_tower,
            "projector": self.core.multi_modal_projector,
            "language_model": self.core.language_model,
            "lm_head": getattr(self.model, "lm_head", None) or self.core.language_model.norm,
        }

    def chat_prompt(self, processor, turns: list[tuple[str, str | None]], images: int, videos: int = 0) -> str:
        if videos:
            raise ValueError(f"{self.name} takes videos as frames (images), not as videos")
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(chat_messages(turns, images, videos), add_generation_prompt=True)
        # llava-1.5's own format, for processors saved without a template
        text = ""
        for index, (user, reply) in enumerate(turns):
            placeholders = "<image>\n" * (images if index == 0 else 0)
            text += f"USER: {placeholders}{user} ASSISTANT:"
            if reply is not None:
                text += f" {reply}</s>"
        return text

    def encode_for_generate(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, BaseModelOutputWithPooling]:
        return {"image": self.core.get_image_features(pixel_values=inputs["pixel_values"])}

    def capture(self, pixel_values: torch.Tensor, attention: bool) -> TowerSignals:
        return capture_layer(
            self.core.vision_tower, self.layers[self.layer_index], pixel_values, attention, self.cls_token
        )

    def tower_layers(self) -> tuple[list[nn.Module], int]:
        return list(self.layers), self.layer_index

    def next_layer_projections(self, hidden: torch.Tensor):
        return next_layer_projections(self.layers, self.layer_index, hidden)

    def full_features(self, signals: TowerSignals) -> torch.Tensor:
        if self.config.vision_feature_select_strategy == "default":
            return signals.hidden[:, 1:]
        return signals.hidden

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.core.multi_modal_projector(tokens)

    def install(
        self, encode: Callable[[torch.Tensor], Selection], tokens_per_image: int, full: bool = False
    ) -> Callable[[], None]:
        core, config = self.core, self.config

        # Same signature as LlavaModel.get_image_features: generate() inspects it to pick kwargs.
        def get_image_features(
            pixel_values: torch.Tensor,
            vision_feature_layer=None,
            vision_feature_select_strategy=None,
            image_sizes=None,
            **kwargs,
        ) -> BaseModelOutputWithPooling:
            if vision_feature_layer not in (None, config.vision_feature_layer):
                raise ValueError(
                    f"VisionZip was applied for vision_feature_layer={config.vision_feature_layer}, "
                    f"got {vision_feature_layer}"
                )
            features = encode(pixel_values).tokens
            return BaseModelOutputWithPooling(pooler_output=list(features))

        def check_placeholders(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                return
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
            if kwargs.get("pixel_values") is not None:
                images = kwargs["pixel_values"].shape[0]
            elif encoded is not None:
                images = len(encoded.pooler_output)
            else:
                return
            found = int((input_ids == config.image_token_id).sum())
            if found != images * tokens_per_image:
                raise ValueError(
                    f"the prompt holds {found} image placeholder tokens for {images} image(s), but "
                    f"VisionZip passes {tokens_per_image} tokens per image: build the inputs with "
                    "visionzip_processor(processor, model) so that each image expands to "
                    f"{tokens_per_image} placeholders"
                )

        core.get_image_features = get_image_features  # instance attribute: this model only
        hook = core.register_forward_pre_hook(check_placeholders, with_kwargs=True)

        def undo() -> None:
            core.__dict__.pop("get_image_features", None)
            hook.remove()

        return undo
