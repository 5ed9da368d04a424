"""transformers ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, AnyRes images, videos):
llava-hf/llava-onevision-qwen2-*-ov-hf.

Facts this module relies on (transformers 5):
- The tower is SigLIP (384 px, patch 14: 27 x 27 = 729 patches) with **no CLS token**; the
  checkpoints read ``hidden_states[-1]`` (the last encoder layer's output, before
  ``post_layernorm``) with ``vision_feature_select_strategy="full"``: all 729 rows per unit.
- Images: ``LlavaOnevisionImageProcessor`` takes a nested list (images per prompt) and returns
  ``batch_num_images``. A prompt with one image gets AnyRes (base unit + crops of the best of
  36 grid pinpoints, 1x1 up to 6x6); a prompt with several images gets one unit per image (padded
  to a square). ``get_image_features`` slices the units the same way, and
  ``pack_image_features`` lays AnyRes images out like LLaVA-NeXT (base rows, stitched crop grid,
  unpadded, one newline per row) but first shrinks the crop grid by bilinear interpolation when it
  holds more than ~9 units' worth of patches (``anyres_max_9``); a single-unit image gets its 729
  rows plus one newline. ``LlavaOnevisionProcessor.replace_image_token`` mirrors both counts.
- Videos: ``pixel_values_videos`` (videos, frames, 3, 384, 384); ``get_video_features`` projects
  every frame, pools each 27 x 27 grid to 14 x 14 (bilinear, ``apply_pooling``) and appends one
  newline per video: ``frames * 196 + 1`` rows under ``<video>`` (``replace_video_token``).

VisionZip on LLaVA-OneVision:
- Dominant tokens without a CLS token: each patch is scored by the mean attention it receives
  from all 729 queries of layer L (summed over heads), computed from layer L's captured
  queries and keys in query chunks (``selection.received_attention``); the tower keeps SDPA /
  FlashAttention. ``dominant`` then counts patches only (54 + 10: 54 patches, 10 contextual).
  Contextual merging is unchanged.
- Images, per unit like LLaVA-NeXT: a one-image prompt of ``1 + crops`` units receives
  ``(1 + crops) * (dominant + contextual)`` rows (a 2x2 grid: 5 x 64 = 320 at 64), laid out as
  ``llava_next.anyres_layout`` (base unit, crops' kept patches in raster order of the stitched
  grid, crops' contextual rows), with no newline, no unpadding and no ``anyres_max_9``
  interpolation (the budget is the reduction; large images keep one budget per crop, up to
  37 units). Each image of a multi-image prompt is one unit: ``dominant + contextual`` rows.
- Videos: VisionZip per frame with the per-frame budget, replacing the 2x2 pooling; a video of
  F frames receives ``F * (dominant + contextual)`` rows, frame after frame, and **no newline**.
- ``budget=full`` keeps the model's own layouts and counts (interpolation, newlines, pooling).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Mapping

import torch
from torch import nn
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionModel,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import (
    image_size_to_num_patches,
)

from visionzip_eval.backends.base import TowerSignals, chat_messages, register_backend
from visionzip_eval.backends.llava_hf import _core
from visionzip_eval.backends.llava_next import (
    LlavaNextBackend,
    _placeholder_error,
    _size,
)
from visionzip_eval.profiling import vit_flops
from visionzip_eval.selection import Selection
from visionzip_eval.backends.tiny import instantiate, tiny_tokenizer


# -- the tiny offline model (builtin:tiny-llava-onevision) -----------------------------------------

SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
# llava-hf/llava-onevision-qwen2-*-ov-hf: 384 px crops, 1x1 up to 6x6 grids.
LLAVA_ONEVISION_GRID_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]

# The chat template of llava-hf/llava-onevision-qwen2-*-ov-hf (generation markers left out):
# "<|im_start|>user <image>\n{text}<|im_end|>\n<|im_start|>assistant\n".
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_llava_onevision_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaOnevisionProcessor:
    """LLaVA-OneVision's processor with the -ov-hf checkpoints' settings (built in code)."""
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": 384, "width": 384},
        image_grid_pinpoints=LLAVA_ONEVISION_GRID_PINPOINTS,
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        do_pad=True,
    )
    video_processor = LlavaOnevisionVideoProcessor(
        size={"height": 384, "width": 384}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD
    )
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or tiny_tokenizer(("<video>",)),
        video_processor=video_processor,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )


def build_tiny_llava_onevision(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vision_hidden: int = 64,
    vision_layers: int = 4,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A random-weight LLaVA-OneVision (SigLIP 384/14 without CLS, AnyRes, video; Qwen2 LLM)."""
    processor = tiny_llava_onevision_processor()
    tokenizer = processor.tokenizer
    vision = SiglipVisionConfig(
        image_size=384,
        patch_size=14,
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 3,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=LLAVA_ONEVISION_GRID_PINPOINTS,
        projector_hidden_act="gelu",
    )
    return instantiate(LlavaOnevisionForConditionalGeneration, config, tokenizer, seed, attn_implementation), processor



def llava_onevision_7b_config() -> LlavaOnevisionConfig:
    """llava-hf/llava-onevision-qwen2-7b-ov-hf's architecture: SigLIP-so400m at 384 px (26 of its
    27 layers run: 1152 wide, 16 heads, 4304 MLP) and Qwen2-7B (3584 wide, 28 layers, 28 heads,
    4 KV heads, 18944 MLP, vocab 152064); the report's frames table predicts its GPU time."""
    text = Qwen2Config(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064)
    vision = SiglipVisionConfig(hidden_size=1152, num_hidden_layers=26, intermediate_size=4304,
                                num_attention_heads=16, image_size=384, patch_size=14)
    return LlavaOnevisionConfig(text_config=text.to_dict(), vision_config=vision.to_dict())


@register_backend
class LlavaOnevisionBackend(LlavaNextBackend):
    name = "llava-onevision (LlavaOnevisionForConditionalGeneration, SigLIP tower, images and videos)"
    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    model_class: ClassVar[type] = LlavaOnevisionForConditionalGeneration
    builtin: ClassVar[dict[str, Callable]] = {"builtin:tiny-llava-onevision": build_tiny_llava_onevision}

    cls_token: ClassVar[bool] = False  # SigLIP: every token is a patch

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not isinstance(model, (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)):
            return False
        return isinstance(_core(model).vision_tower, SiglipVisionModel)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def tower_tokens(self) -> int:
        return self._patches

    @property
    def full_tokens(self) -> int:
        default = self.config.vision_feature_select_strategy == "default"
        return self._patches - 1 if default else self._patches

    @property
    def patch_offset(self) -> int:
        return 0

    @property
    def video_token_id(self) -> int:
        return self.config.video_token_id

    def full_features(self, signals: TowerSignals) -> torch.Tensor:
        if self.config.vision_feature_select_strategy == "default":
            return signals.hidden[:, 1:]
        return signals.hidden

    def vision_flops(self, tokens_out: int) -> int:
        return vit_flops(
            self.config.vision_config,
            layers_run=self.layer_index + 1,
            projector_in=self.config.vision_config.hidden_size,
            projector_out=self.config.text_config.hidden_size,
            tokens_out=tokens_out,
            cls_token=False,
        )

    def image_units(self, image_sizes, batch_num_images=None) -> list[int]:
        """Units per image: base + crops for the image of a one-image prompt, 1 otherwise."""
        if batch_num_images is None:
            single = [True] * len(image_sizes)
        else:
            single = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        return [
            image_size_to_num_patches(
                _size(size), self.config.image_grid_pinpoints, self.config.vision_config.image_size
            )
            if alone
            else 1
            for size, alone in zip(image_sizes, single)
        ]

    def _units_of_image(self, image_inputs, image_idx: int) -> int:
        counts = [int(n) for n in image_inputs.get("batch_num_images", [1] * (image_idx + 1))]
        start = 0
        for n in counts:
            if image_idx < start + n:
                if n != 1:
                    return 1
                break
            start += n
        return self.image_units([image_inputs["image_sizes"][image_idx]])[0]

    def tower_units(self, inputs: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]]:
        images, _ = super().tower_units(inputs)
        videos = inputs.get("pixel_values_videos")
        return images, [] if videos is None else [int(video.shape[0]) for video in videos]

    # -- prompts and inputs -----------------------------------------------------------------
    def chat_prompt(self, processor, turns: list[tuple[str, str | None]], images: int, videos: int = 0) -> str:
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(chat_messages(turns, images, videos), add_generation_prompt=True)
        # the -ov-hf checkpoints' (Qwen2 ChatML) format, for processors saved without a template
        text = ""
        for index, (user, reply) in enumerate(turns):
            first = index == 0
            placeholders = "<image>" * (images if first else 0) + "<video>" * (videos if first else 0)
            text += f"<|im_start|>user {placeholders}\n{user}<|im_end|>\n"
            if reply is not None:
                text += f"<|im_start|>assistant\n{reply}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"

    def processor_inputs(self, images: list[list], videos: list[list[list]]) -> dict:
        # Nested per prompt: the image processor decides AnyRes (one image) or one unit each.
        kwargs = {}
        if any(images):
            kwargs["images"] = [request for request in images if request]
        flat_videos = [video for request in videos for video in request]
        if flat_videos:
            kwargs["videos"] = flat_videos
        return kwargs

    def processor_overrides(self, processor, tokens_per_image: int, full: bool) -> dict[str, Callable]:
        if full:
            return {}  # the processor's own counts are the model's
        overrides = super().processor_overrides(processor, tokens_per_image, full)

        def replace_video_token(video_inputs, video_idx, **kwargs) -> str:
            video = video_inputs["pixel_values_videos"][video_idx]
            frames = len(video) if isinstance(video, (list, tuple)) else int(video.shape[0])
            return processor.video_token * (frames * tokens_per_image)

        overrides["replace_video_token"] = replace_video_token
        return overrides

    def encode_for_generate(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, BaseModelOutputWithPooling]:
        encoded = {}
        if inputs.get("pixel_values") is not None:
            encoded["image"] = self.core.get_image_features(
                pixel_values=inputs["pixel_values"],
                image_sizes=inputs["image_sizes"],
                batch_num_images=inputs.get("batch_num_images"),
            )
        if inputs.get("pixel_values_videos") is not None:
            encoded["video"] = self.core.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])
        return encoded

    # -- features -----------------------------------------------------------------------------
    def _pack_full(self, features: list[torch.Tensor], image_sizes, vision_aspect_ratio=None) -> list[torch.Tensor]:
        packed, _ = self.core.pack_image_features(
            features,
            image_sizes,
            image_newline=self.core.image_newline,
            vision_aspect_ratio=vision_aspect_ratio or self.config.vision_aspect_ratio,
        )
        return packed

    def _video_features(
        self, encode: Callable[[torch.Tensor], Selection], full: bool, pixel_values_videos: torch.Tensor
    ) -> torch.Tensor:
        videos, frames = pixel_values_videos.shape[:2]
        tokens = encode(pixel_values_videos.flatten(0, 1)).tokens  # (videos * frames, K, D)
        if not full:
            return tokens.reshape(videos, frames * tokens.shape[1], tokens.shape[-1])
        # the model's own layout: 2x2 bilinear pooling per frame, one newline per video
        pooled = self.core.apply_pooling(tokens)
        pooled = pooled.reshape(videos, frames * pooled.shape[1], -1)
        newline = self.core.image_newline[None, None, :].repeat(videos, 1, 1).to(pooled.device, pooled.dtype)
        return torch.cat((pooled, newline), dim=1)

    def _check_placeholders(self, input_ids: torch.Tensor, kwargs: dict, tokens_per_image: int) -> None:
        super()._check_placeholders(input_ids, kwargs, tokens_per_image)
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("video")
        if encoded is not None:
            expected = int(encoded.pooler_output.shape[0] * encoded.pooler_output.shape[1])
        elif kwargs.get("pixel_values_videos") is not None:
            expected = int(kwargs["pixel_values_videos"].shape[:2].numel()) * tokens_per_image
        else:
            return
        found = int((input_ids == self.config.video_token_id).sum())
        if found != expected:
            raise _placeholder_error(found, expected, "video", "frame", tokens_per_image)

    def _overrides(self, encode: Callable[[torch.Tensor], Selection], full: bool) -> dict[str, Callable]:
        backend = self

        # Same signatures as LlavaOnevisionModel's: generate() inspects them to pick kwargs.
        def get_image_features(
            pixel_values: torch.Tensor,
            image_sizes: torch.Tensor,
            vision_feature_layer=None,
            vision_feature_select_strategy=None,
            vision_aspect_ratio=None,
            batch_num_images=None,
            **kwargs,
        ) -> BaseModelOutputWithPooling:
            backend._check_feature_args(vision_feature_layer, vision_feature_select_strategy)
            features = backend._image_features(
                encode, full, pixel_values, image_sizes, batch_num_images, vision_aspect_ratio=vision_aspect_ratio
            )
            return BaseModelOutputWithPooling(pooler_output=features)

        def get_video_features(
            pixel_values_videos: torch.Tensor,
            vision_feature_layer=None,
            vision_feature_select_strategy=None,
            **kwargs,
        ) -> BaseModelOutputWithPooling:
            backend._check_feature_args(vision_feature_layer, vision_feature_select_strategy)
            return BaseModelOutputWithPooling(pooler_output=backend._video_features(encode, full, pixel_values_videos))

        return {"get_image_features": get_image_features, "get_video_features": get_video_features}
