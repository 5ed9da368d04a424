"""transformers ``LlavaNextForConditionalGeneration`` (AnyRes, CLIP tower): llava-hf/llava-v1.6-*-hf.

Facts this module relies on (transformers 5):
- ``LlavaNextImageProcessor`` cuts each image into *units* of 336 px: the whole image resized
  (the base unit) followed by the crops of the best-fitting grid pinpoint
  (``select_best_resolution``), row-major over a ``rows x cols`` grid (2 to 4 crops with the
  v1.6 pinpoints). ``pixel_values`` is (images, max_units, 3, 336, 336), zero-padded on the unit
  axis; ``image_sizes`` (images, 2) is each image's (height, width).
- ``LlavaNextModel.get_image_features(pixel_values, image_sizes, ...)`` recovers the unit count of
  each image from its size (``image_size_to_num_patches``), runs the tower on all units at once,
  reads ``hidden_states[-2]`` (CLS dropped under ``default``), projects, and
  ``pack_image_features`` lays each image out as: the base unit's 576 rows, then the crops stitched
  into one ``(rows*24) x (cols*24)`` grid, unpadded to the image's aspect ratio, with one
  ``image_newline`` after every grid row. ``generate`` calls it once before prefill (through
  ``model.base_model``, with the arguments its signature names) and ``forward`` scatters the rows
  into the ``image_token_id`` positions; the counts must match.
- ``LlavaNextProcessor.replace_image_token`` expands each ``<image>`` to that size-dependent count
  (``_get_number_of_features``: 576 + unpadded rows * cols + rows newlines).

VisionZip on LLaVA-NeXT (the paper's setting): the budget applies per unit, so an image of
``1 + crops`` units receives ``(1 + crops) * (dominant + contextual)`` rows: 5 units x 64 = 320 at
budget 64 (the usual 2x2 grid), 640 at 128, 160 at 32; a 1x2 or 2x1 grid gives 3 units, 1x3 or 3x1
gives 4. Unpadding and the newline grid only make sense for a full grid, so reduced images carry
**no image_newline** (the reference code, ``visionzip/llava_arch.py``
``restore_image_features_sorted``, builds the newline column for multi-crop images and never
appends it; it appends one to single-unit images, which the v1.6 pinpoints never produce: here
those get none either). Row layout of one reduced image (``anyres_layout``), the reference
code's order:

1. the base unit's rows as the reducer gives them (VisionZip: CLS, dominant patches in raster
   order, contextual tokens);
2. the crops' kept patches in raster order over the whole stitched crop grid (the order the full
   layout reads them, newlines left out);
3. the crops' kept CLS rows, crop order;
4. the crops' remaining rows (contextual / pooled tokens), crop order.

Patches on the padding around the image stay eligible (no unpadding), as in the reference.
``budget=full`` keeps the model's own layout (unpadded grid with newlines) and counts.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Mapping

import torch
from torch import nn
from transformers import (
    CLIPVisionModel,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextModel,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from visionzip_eval.backends.base import register_backend
from visionzip_eval.backends.llava_hf import LlavaHFBackend, _core, tiny_llava_config
from visionzip_eval.selection import Selection
from visionzip_eval.backends.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, instantiate, tiny_tokenizer


def _size(image_size) -> list[int]:
    """(height, width) as plain ints, whatever the processor returned (tensor, array, list)."""
    return [int(v) for v in (image_size.tolist() if hasattr(image_size, "tolist") else image_size)]


def row_positions(selection: Selection, rows: int) -> torch.Tensor:
    """(units, rows) the tower position each output row was taken from, ``-1`` for rows that are
    not one position (contextual merges, pooled cells)."""
    units = selection.tokens.shape[0]
    positions = torch.full((units, rows), -1, dtype=torch.long, device=selection.tokens.device)
    if selection.dominant_index is not None:
        kept = selection.dominant_index.shape[1]
        positions[:, :kept] = selection.dominant_index.to(positions.device)
    return positions


def anyres_layout(
    tokens: torch.Tensor,
    positions: torch.Tensor,
    grid: tuple[int, int],
    patch_grid: tuple[int, int],
    patch_offset: int,
) -> torch.Tensor:
    """One image's reduced units -> its rows for the LLM (see the module docstring).

    ``tokens``: (1 + rows * cols, K, D), the base unit then the crops row-major over ``grid``
    (rows, cols); ``positions``: (1 + rows * cols, K) from ``row_positions``; ``patch_grid``:
    (h, w) patches per unit; ``patch_offset``: position of the first patch (1 behind a CLS token).
    Returns ((1 + rows * cols) * K, D).
    """
    base, crops, where = tokens[0], tokens[1:], positions[1:]
    if crops.shape[0] == 0:
        return base
    rows, cols = grid
    if crops.shape[0] != rows * cols:
        raise ValueError(f"{crops.shape[0]} crops do not fill a {rows}x{cols} grid")
    h, w = patch_grid
    crop = torch.arange(crops.shape[0], device=tokens.device).unsqueeze(1).expand_as(where)
    patch = (where - patch_offset).clamp(min=0)
    raster = ((crop // cols) * h + patch // w) * (cols * w) + (crop % cols) * w + patch % w
    is_patch = where >= patch_offset
    is_special = (where >= 0) & ~is_patch  # e.g. each crop's CLS row
    is_rest = where < 0
    order = raster[is_patch].argsort(stable=True)
    return torch.cat([base, crops[is_patch][order], crops[is_special], crops[is_rest]], dim=0)


def _placeholder_error(found: int, expected: int, what: str, unit: str, per_unit: int) -> ValueError:
    return ValueError(
        f"the prompt holds {found} {what} placeholder tokens, but VisionZip passes {expected} "
        f"({per_unit} per {unit}): build the inputs with visionzip_processor(processor, model) so "
        f"that each placeholder expands to {per_unit} tokens per {unit}"
    )


# -- the tiny offline model (builtin:tiny-llava-next) ----------------------------------------------

# llava-hf/llava-v1.6-vicuna-7b-hf: AnyRes over these (height, width) resolutions, 336 px crops.
LLAVA_NEXT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# The chat template of llava-hf/llava-v1.6-vicuna-7b-hf (generation markers left out):
# "USER: <image>\n{text} ASSISTANT:".
LLAVA_NEXT_VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
    "{% else %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_llava_next_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaNextProcessor:
    """LLaVA-NeXT's processor with llava-v1.6-vicuna-7b-hf's settings (built in code)."""
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=LLAVA_NEXT_GRID_PINPOINTS,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_pad=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or tiny_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_VICUNA_CHAT_TEMPLATE,
    )


def build_tiny_llava_next(
    seed: int = 0, attn_implementation: str = "sdpa", **sizes: int
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A random-weight LLaVA-NeXT (v1.6-vicuna look-alike: CLIP 336/14 on AnyRes crops, Llama)."""
    processor = tiny_llava_next_processor()
    tokenizer = processor.tokenizer
    base = tiny_llava_config(
        vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **sizes
    )
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_id=base.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=LLAVA_NEXT_GRID_PINPOINTS,
        projector_hidden_act="gelu",
        image_seq_length=576,
    )
    return instantiate(LlavaNextForConditionalGeneration, config, tokenizer, seed, attn_implementation), processor


@register_backend
class LlavaNextBackend(LlavaHFBackend):
    name = "llava-next (LlavaNextForConditionalGeneration, AnyRes, CLIP tower)"
    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    packs_units: ClassVar[bool] = True
    model_class: ClassVar[type] = LlavaNextForConditionalGeneration
    builtin: ClassVar[dict[str, Callable]] = {"builtin:tiny-llava-next": build_tiny_llava_next}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not isinstance(model, (LlavaNextForConditionalGeneration, LlavaNextModel)):
            return False
        return isinstance(_core(model).vision_tower, CLIPVisionModel)

    # -- geometry ---------------------------------------------------------------------------
    def crop_grid(self, image_size) -> tuple[int, int]:
        """(rows, cols) of the AnyRes crop grid the processor cuts an image of this size into."""
        return tuple(
            get_anyres_image_grid_shape(
                _size(image_size), self.config.image_grid_pinpoints, self.config.vision_config.image_size
            )
        )

    def image_units(self, image_sizes, batch_num_images=None) -> list[int]:
        """Units (base image + crops) per image, as the model slices ``pixel_values``."""
        return [
            image_size_to_num_patches(
                _size(size), self.config.image_grid_pinpoints, self.config.vision_config.image_size
            )
            for size in image_sizes
        ]

    def tower_units(self, inputs: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]]:
        sizes = inputs.get("image_sizes")
        if sizes is None:
            return [], []
        return self.image_units(sizes, inputs.get("batch_num_images")), []

    # -- prompts and inputs -----------------------------------------------------------------
    def chat_prompt(self, processor, turns: list[tuple[str, str | None]], images: int, videos: int = 0) -> str:
        if getattr(processor, "chat_template", None) or self.config.text_config.model_type != "mistral":
            return super().chat_prompt(processor, turns, images, videos)
        if videos:
            raise ValueError(f"{self.name} takes videos as frames (images), not as videos")
        # llava-v1.6-mistral's own format, for processors saved without a template
        text = ""
        for index, (user, reply) in enumerate(turns):
            placeholders = "<image>\n" * (images if index == 0 else 0)
            text += f"[INST] {placeholders}{user} [/INST]"
            if reply is not None:
                text += f" {reply}</s>"
        return text

    def processor_overrides(self, processor, tokens_per_image: int, full: bool) -> dict[str, Callable]:
        if full:
            return {}  # the processor's own (size-dependent) count is the model's

        def replace_image_token(image_inputs, image_idx, **kwargs) -> str:
            return processor.image_token * (self._units_of_image(image_inputs, image_idx) * tokens_per_image)

        return {"replace_image_token": replace_image_token}

    def _units_of_image(self, image_inputs, image_idx: int) -> int:
        """Units of the processor's image ``image_idx`` (every LLaVA-NeXT image is cut into crops)."""
        return self.image_units([image_inputs["image_sizes"][image_idx]])[0]

    def encode_for_generate(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, BaseModelOutputWithPooling]:
        return {
            "image": self.core.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
            )
        }

    # -- features -----------------------------------------------------------------------------
    def _check_feature_args(self, vision_feature_layer, vision_feature_select_strategy) -> None:
        if vision_feature_layer not in (None, self.config.vision_feature_layer):
            raise ValueError(
                f"VisionZip was applied for vision_feature_layer={self.config.vision_feature_layer}, "
                f"got {vision_feature_layer}"
            )
        if vision_feature_select_strategy not in (None, self.config.vision_feature_select_strategy):
            raise ValueError(
                "VisionZip was applied for vision_feature_select_strategy="
                f"{self.config.vision_feature_select_strategy!r}, got {vision_feature_select_strategy!r}"
            )

    def _units_pixels(self, pixel_values: torch.Tensor, units: list[int]) -> torch.Tensor:
        """(images, max_units, 3, H, W) padded -> (sum(units), 3, H, W), padding dropped."""
        if pixel_values.dim() == 5:
            return torch.cat([pixels[:count] for pixels, count in zip(pixel_values, units)], dim=0)
        if pixel_values.dim() != 4 or pixel_values.shape[0] != sum(units):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} do not hold the {sum(units)} units "
                "the image sizes call for"
            )
        return pixel_values

    def _pack_full(self, features: list[torch.Tensor], image_sizes, **kwargs) -> list[torch.Tensor]:
        """The model's own layout of unreduced per-image features (unpad, newlines)."""
        packed, _ = self.core.pack_image_features(
            features,
            image_sizes,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=self.core.image_newline,
        )
        return packed

    def _image_features(
        self,
        encode: Callable[[torch.Tensor], Selection],
        full: bool,
        pixel_values: torch.Tensor,
        image_sizes,
        batch_num_images=None,
        **pack_kwargs,
    ) -> list[torch.Tensor]:
        units = self.image_units(image_sizes, batch_num_images)
        selection = encode(self._units_pixels(pixel_values, units))
        per_image = list(torch.split(selection.tokens, units, dim=0))
        if full:
            return self._pack_full(per_image, image_sizes, **pack_kwargs)
        positions = torch.split(row_positions(selection, selection.tokens.shape[1]), units, dim=0)
        return [
            anyres_layout(tokens, where, self.crop_grid(size) if count > 1 else (0, 0), self.patch_grid,
                          self.patch_offset).reshape(-1, tokens.shape[-1])
            for tokens, where, size, count in zip(per_image, positions, image_sizes, units)
        ]

    def _expected_image_rows(self, kwargs: dict, tokens_per_image: int) -> int | None:
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            return sum(len(rows) for rows in encoded.pooler_output)
        if kwargs.get("pixel_values") is not None and kwargs.get("image_sizes") is not None:
            units = self.image_units(kwargs["image_sizes"], kwargs.get("batch_num_images"))
            return sum(units) * tokens_per_image
        return None

    def _check_placeholders(self, input_ids: torch.Tensor, kwargs: dict, tokens_per_image: int) -> None:
        expected = self._expected_image_rows(kwargs, tokens_per_image)
        if expected is not None:
            found = int((input_ids == self.config.image_token_id).sum())
            if found != expected:
                raise _placeholder_error(found, expected, "image", "crop, base image included", tokens_per_image)

    def _overrides(self, encode: Callable[[torch.Tensor], Selection], full: bool) -> dict[str, Callable]:
        backend = self

        # Same signature as LlavaNextModel.get_image_features: generate() inspects it to pick kwargs.
        def get_image_features(
            pixel_values: torch.Tensor,
            image_sizes: torch.Tensor,
            vision_feature_layer=None,
            vision_feature_select_strategy=None,
            **kwargs,
        ) -> BaseModelOutputWithPooling:
            backend._check_feature_args(vision_feature_layer, vision_feature_select_strategy)
            features = backend._image_features(encode, full, pixel_values, image_sizes)
            return BaseModelOutputWithPooling(pooler_output=features)

        return {"get_image_features": get_image_features}

    def install(
        self, encode: Callable[[torch.Tensor], Selection], tokens_per_image: int, full: bool = False
    ) -> Callable[[], None]:
        core = self.core
        overrides = self._overrides(encode, full)

        def check_placeholders(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is not None:
                self._check_placeholders(input_ids, kwargs, tokens_per_image)

        for name, function in overrides.items():
            setattr(core, name, function)  # instance attributes: this model only
        # budget=full: the model's own count check (it raises on a mismatch) is the right one
        hook = None if full else core.register_forward_pre_hook(check_placeholders, with_kwargs=True)

        def undo() -> None:
            for name in overrides:
                core.__dict__.pop(name, None)
            if hook is not None:
                hook.remove()

        return undo
