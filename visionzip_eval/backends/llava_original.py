"""The original LLaVA code base: the ``llava`` package (haotian-liu/LLaVA, published on PyPI as
``llava-torch``), ``LlavaLlamaForCausalLM`` checkpoints such as liuhaotian/llava-v1.5-7b.

The package pins versions far older than lmms-eval's, so it is installed without them::

    pip install --no-deps llava-torch==1.2.2.post1

and then imports and runs under transformers 5. Without it this backend never matches, and
loading such a checkpoint says which command installs it.

Facts this module relies on (llava-torch 1.2.2.post1):
- ``model.get_model().get_vision_tower()`` is llava's ``CLIPVisionTower``: it wraps a
  transformers ``CLIPVisionModel`` (``.vision_tower``), reads ``hidden_states[select_layer]``
  (``mm_vision_select_layer``, -2 for LLaVA-1.5) and drops CLS under ``select_feature ==
  "patch"``; ``model.get_model().mm_projector`` projects.
- ``prepare_inputs_labels_for_multimodal`` calls ``self.encode_images(images)`` and splices
  however many rows it returns at each ``IMAGE_TOKEN_INDEX`` (-200) of ``input_ids``: one
  index per image, so a reduced count needs no change to the prompt. ``install`` overrides
  ``encode_images`` on the model instance.
- transformers >= 5.2x hands the KV cache to ``forward`` as ``cache``, a keyword llava's
  ``forward`` does not take (``generate`` fails with a TypeError after prefill).
  ``accept_cache_kwarg`` wraps this one instance's ``forward`` to pass it on as
  ``past_key_values``; ``install`` applies it, and it stays (it changes no output).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_eval.backends.base import TowerSignals, VLMBackend, register_backend
from visionzip_eval.backends.llava_hf import capture_layer, feature_layer_index, next_layer_projections
from visionzip_eval.profiling import vit_flops
from visionzip_eval.selection import Selection
from visionzip_eval.backends.llava_hf import tiny_llava_config
from visionzip_eval.backends.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, tiny_tokenizer

INSTALL_COMMAND = "pip install --no-deps llava-torch==1.2.2.post1"
IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX
IGNORE_INDEX = -100  # llava.constants.IGNORE_INDEX
CONV_MODE = "vicuna_v1"  # LLaVA-1.5's conversation template


def llava_missing_error() -> ImportError:
    return ImportError(
        "this is an original LLaVA checkpoint (the `llava` package's LlavaLlamaForCausalLM), "
        f"and the llava package is not installed: `{INSTALL_COMMAND}` (its pinned dependencies "
        "are too old for lmms-eval, so install it without them)"
    )


def is_original_llava_config(config: Mapping) -> bool:
    """Whether a checkpoint's raw ``config.json`` dict is an original-LLaVA one."""
    return config.get("model_type") in ("llava_llama", "llava_mistral", "llava_mpt") or "mm_vision_tower" in config


def accept_cache_kwarg(model: nn.Module) -> nn.Module:
    """Let this llava model instance's ``forward`` take transformers 5's ``cache`` keyword (as
    ``past_key_values``); idempotent, no-op where ``forward`` already takes it."""
    import inspect

    forward = model.forward
    if getattr(forward, "_visionzip_cache_kwarg", False) or "cache" in inspect.signature(forward).parameters:
        return model

    accepted = set(inspect.signature(forward).parameters)

    def compat_forward(*args, cache=None, **kwargs):
        if cache is not None:
            kwargs["past_key_values"] = cache
        # generate() hands forward what it does not use itself (e.g. `tokenizer` for stop
        # strings); llava's forward takes no **kwargs
        return forward(*args, **{k: v for k, v in kwargs.items() if k in accepted})

    # generate() validates its kwargs against forward's signature: keep llava's, plus `cache`
    signature = inspect.signature(forward)
    extra = inspect.Parameter("cache", inspect.Parameter.KEYWORD_ONLY, default=None)
    params = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    params += [extra] + [p for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    compat_forward.__signature__ = signature.replace(parameters=params)
    compat_forward._visionzip_cache_kwarg = True
    model.forward = compat_forward  # instance attribute: this model only
    return model


class _LlavaImages:
    """``processor.image_processor``: llava's ``process_images`` (pads to a square under
    ``image_aspect_ratio == "pad"``, as LLaVA-1.5 does) behind the call the engine makes."""

    def __init__(self, processor: "LlavaOriginalProcessor"):
        self.processor = processor

    def __call__(self, images, return_tensors: str = "pt", **kwargs) -> dict:
        from llava.mm_utils import process_images

        pixel_values = process_images(list(images), self.processor.clip_image_processor, self.processor.model_config)
        if isinstance(pixel_values, list):
            raise ValueError("images of different shapes (anyres) are not supported for original LLaVA")
        return {"pixel_values": pixel_values}


class LlavaOriginalProcessor:
    """What ``llava.model.builder.load_pretrained_model`` returns for the input side (its
    tokenizer and CLIP image processor, the model's config), in the shape the engine takes."""

    image_token = "<image>"  # llava.constants.DEFAULT_IMAGE_TOKEN

    def __init__(self, tokenizer, image_processor, model_config, conv_mode: str = CONV_MODE):
        self.tokenizer = tokenizer
        self.clip_image_processor = image_processor
        self.model_config = model_config
        self.conv_mode = conv_mode
        self.image_processor = _LlavaImages(self)


def _llava_causal_lm():
    try:
        from llava.model import LlavaLlamaForCausalLM
    except ImportError:
        return None
    return LlavaLlamaForCausalLM


# -- the tiny offline model (builtin:tiny-llava-original) ------------------------------------------

def build_tiny_llava_original(
    directory: str | Path | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vision_hidden: int = 64,
    vision_layers: int = 4,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
):
    """A random-weight original LLaVA-1.5 (the ``llava`` package's ``LlavaLlamaForCausalLM``:
    CLIP 336/14 tower read at layer -2 without CLS, ``mlp2x_gelu`` projector, Llama LLM, padded
    square images) and its ``LlavaOriginalProcessor``, deterministic by seed; float32, eval.

    Writes ``directory`` (a fresh temporary ``.../llava-tiny`` if None): ``vision_tower/`` (the
    CLIP tower and its image processor, which ``mm_vision_tower`` names), the model and the
    tokenizer, so ``llava.model.builder.load_pretrained_model(directory, None, "llava-tiny")``
    loads it with no network (the builder needs "llava" in the model name). Needs the llava
    package (``pip install --no-deps llava-torch==1.2.2.post1``).
    """
    import tempfile

    try:
        from llava.model import LlavaConfig as OriginalLlavaConfig, LlavaLlamaForCausalLM
    except ImportError as error:
        raise llava_missing_error() from error
    directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="visionzip-")) / "llava-tiny"
    tower_dir = directory / "vision_tower"
    tokenizer = tiny_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    vision = tiny_llava_config(
        len(tokenizer), 0, vision_hidden=vision_hidden, vision_layers=vision_layers, vision_heads=vision_heads
    ).vision_config
    config = OriginalLlavaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 3,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        # llava-v1.5-7b's multimodal settings
        mm_vision_tower=str(tower_dir),
        mm_hidden_size=vision_hidden,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        mm_patch_merge_type="flat",
        image_aspect_ratio="pad",
        tokenizer_padding_side="right",
        tokenizer_model_max_length=2048,
        use_mm_proj=True,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = CLIPVisionModel(vision)
        tower.save_pretrained(tower_dir)  # first: the model reads the tower's config from there
        image_processor.save_pretrained(tower_dir)
        model = LlavaLlamaForCausalLM(config)  # the tower is built lazily (delay_load), not saved
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    wrapper = model.get_model().get_vision_tower()
    wrapper.load_model()
    wrapper.vision_tower.set_attn_implementation(attn_implementation)
    model = model.eval()
    return model, LlavaOriginalProcessor(tokenizer, wrapper.image_processor, model.config)


@register_backend
class LlavaOriginalBackend(VLMBackend):
    name = "original LLaVA (llava package, LlavaLlamaForCausalLM, CLIP tower)"
    model_types: ClassVar[tuple[str, ...]] = ("llava_llama", "llava_mistral", "llava_mpt")
    claim_order: ClassVar[int] = -1  # before llava-hf: some original checkpoints say model_type "llava"
    builtin: ClassVar[dict[str, Callable]] = {"builtin:tiny-llava-original": build_tiny_llava_original}

    @classmethod
    def claims(cls, config: dict) -> bool:
        return is_original_llava_config(config)

    @classmethod
    def load(cls, pretrained, dtype, device, attn_implementation):
        """An original-LLaVA checkpoint through ``llava.model.builder.load_pretrained_model``."""
        try:
            from llava.mm_utils import get_model_name_from_path
            from llava.model.builder import load_pretrained_model
        except ImportError as error:
            raise llava_missing_error() from error
        device = torch.device(device)
        name = get_model_name_from_path(str(pretrained))
        if "llava" not in name.lower():  # the builder picks its LLaVA path by the name
            name = f"llava-{name}"
        kwargs = {}
        if attn_implementation == "flash_attention_2":
            kwargs["use_flash_attn"] = True
        elif attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        # The builder forces torch_dtype=float16; transformers 5's `dtype` takes precedence, so the
        # LLM loads in `dtype` directly. device_map stays "auto": any other value makes the builder
        # cast the vision tower to float16 (lossy before a cast to float32 / bfloat16).
        tokenizer, model, image_processor, _ = load_pretrained_model(
            str(pretrained), None, name, device=str(device), dtype=dtype, **kwargs
        )
        model = accept_cache_kwarg(model.to(device=device, dtype=dtype).eval())
        return model, LlavaOriginalProcessor(tokenizer, image_processor, model.config)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("llava."):  # cheap: no llava import otherwise
            return False
        causal_lm = _llava_causal_lm()
        return causal_lm is not None and isinstance(model, causal_lm)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.core = model.get_model()
        wrapper = self.core.get_vision_tower()
        if wrapper is None or not getattr(wrapper, "is_loaded", False):
            raise ValueError(
                "the vision tower of this llava model is not loaded: load the model with "
                "llava.model.builder.load_pretrained_model (or call get_vision_tower().load_model())"
            )
        self.wrapper = wrapper
        self.tower = wrapper.vision_tower  # transformers CLIPVisionModel
        self.config = model.config
        self.layers = getattr(self.tower, "vision_model", self.tower).encoder.layers
        self.layer_index = feature_layer_index(wrapper.select_layer, len(self.layers))
        if wrapper.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"unexpected mm_vision_select_feature {wrapper.select_feature!r}")
        vision = self.tower.config
        side = vision.image_size // vision.patch_size
        self._grid = (side, side)
        self._patches = side * side

    @property
    def tower_tokens(self) -> int:
        return self._patches + 1

    @property
    def full_tokens(self) -> int:
        return self._patches if self.wrapper.select_feature == "patch" else self._patches + 1

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self._grid

    def vision_flops(self, tokens_out: int) -> int:
        return vit_flops(
            self.tower.config,
            layers_run=self.layer_index + 1,  # capture stops after the feature layer
            projector_in=self.tower.config.hidden_size,
            projector_out=self.config.hidden_size,
            tokens_out=tokens_out,
        )

    def modules(self) -> dict[str, nn.Module]:
        return {
            "vision_tower": self.tower,
            "projector": self.core.mm_projector,
            "language_model": self.core,  # LlavaLlamaModel: the decoder stack, once per forward
            "lm_head": self.model.lm_head,
        }

    # -- prompt and inputs ----------------------------------------------------------------
    def chat_prompt(self, processor, turns: list[tuple[str, str | None]], images: int, videos: int = 0) -> str:
        from llava.conversation import conv_templates

        if videos:
            raise ValueError(f"{self.name} takes videos as frames (images), not as videos")
        conv = conv_templates[getattr(processor, "conv_mode", CONV_MODE)].copy()
        for index, (user, reply) in enumerate(turns):
            placeholders = "<image>\n" * (images if index == 0 else 0)
            conv.append_message(conv.roles[0], placeholders + user)
            conv.append_message(conv.roles[1], reply)
        return conv.get_prompt()

    def native_image_aspect(self, processor) -> str | None:
        """llava's ``process_images`` follows the config: ``pad`` squares with the mean colour,
        anything but AnyRes resizes and centre-crops."""
        ratio = getattr(self.config, "image_aspect_ratio", None)
        return {"pad": "pad", "anyres": None}.get(ratio, "crop")

    def processor_overrides(self, processor, tokens_per_image: int, full: bool) -> dict[str, Callable]:
        return {}  # one IMAGE_TOKEN_INDEX per image whatever the count: nothing to expand

    def tower_units(self, inputs: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]]:
        pixel_values = inputs.get("images", inputs.get("pixel_values"))
        return [1] * (0 if pixel_values is None else len(pixel_values)), []

    def prepare_inputs(self, processor, texts: list[str], images: list[list]) -> dict:
        """llava's own input path: ``tokenizer_image_token`` (one IMAGE_TOKEN_INDEX per
        ``<image>``), left padding, ``process_images``."""
        from llava.mm_utils import tokenizer_image_token

        if any(images) and not all(images):
            # llava's splicing gives a text-only row of a batch the next row's image features
            raise ValueError("original LLaVA cannot batch requests with and without images together")
        tokenizer = processor.tokenizer
        rows = [tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX) for text in texts]
        width = max(len(row) for row in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.unk_token_id or 0)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        flat = [image for request in images for image in request]
        if flat:
            inputs["images"] = processor.image_processor(flat)["pixel_values"]
            inputs["image_sizes"] = [image.size for image in flat]
        return inputs

    def generate(self, inputs: Mapping[str, torch.Tensor], **kwargs) -> torch.Tensor:
        accept_cache_kwarg(self.model)
        input_ids = inputs["input_ids"]
        config = self.model.config
        had, previous = "tokenizer_padding_side" in config.__dict__, getattr(config, "tokenizer_padding_side", None)
        config.tokenizer_padding_side = "left"  # llava re-pads the spliced rows by this; batches need left
        try:
            out = self.model.generate(
                input_ids,
                images=inputs.get("images"),
                image_sizes=inputs.get("image_sizes"),
                attention_mask=inputs.get("attention_mask"),
                **kwargs,
            )
        finally:
            if had:
                config.tokenizer_padding_side = previous
            else:
                config.__dict__.pop("tokenizer_padding_side", None)
        # llava generates from inputs_embeds, so only new tokens come back: put the prompt first
        return torch.cat([input_ids, out.to(input_ids.device)], dim=1)

    def count_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens_per_image: int
    ) -> tuple[int, int]:
        images = int(((input_ids == IMAGE_TOKEN_INDEX) & attention_mask.bool()).sum())
        visual = images * tokens_per_image
        return visual, int(attention_mask.sum()) - images + visual

    def encode_for_generate(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, BaseModelOutputWithPooling]:
        return {"image": BaseModelOutputWithPooling(pooler_output=list(self.model.encode_images(inputs["pixel_values"])))}

    def track_visual_rows(self, callback) -> Callable[[], None]:
        """llava splices the image rows into ``inputs_embeds`` itself
        (``prepare_inputs_labels_for_multimodal``): run it with marker labels, whose image rows
        come back as IGNORE_INDEX, and pass those rows on."""
        model = self.model
        prepare = model.prepare_inputs_labels_for_multimodal

        def tracked(input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None):
            if labels is not None or images is None or input_ids.shape[1] == 1:
                return prepare(input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
            *outputs, marked = prepare(
                input_ids, position_ids, attention_mask, past_key_values, torch.zeros_like(input_ids), images, image_sizes
            )
            visual = marked == IGNORE_INDEX  # image rows and padding
            if outputs[2] is not None:
                visual &= outputs[2].bool()
            callback(visual)
            return (*outputs, None)

        model.prepare_inputs_labels_for_multimodal = tracked  # instance attribute: this model only
        return lambda: model.__dict__.pop("prepare_inputs_labels_for_multimodal", None)

    # -- the tower ------------------------------------------------------------------------
    def capture(self, pixel_values: torch.Tensor, attention: bool) -> TowerSignals:
        pixel_values = pixel_values.to(device=self.tower.device, dtype=self.tower.dtype)
        return capture_layer(self.tower, self.layers[self.layer_index], pixel_values, attention, cls_token=True)

    def tower_layers(self) -> tuple[list[nn.Module], int]:
        return list(self.layers), self.layer_index

    def next_layer_projections(self, hidden: torch.Tensor):
        return next_layer_projections(self.layers, self.layer_index, hidden)

    def full_features(self, signals: TowerSignals) -> torch.Tensor:
        return signals.hidden[:, 1:] if self.wrapper.select_feature == "patch" else signals.hidden

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        projector = self.core.mm_projector
        return projector(tokens.to(next(projector.parameters()).dtype))

    def install(
        self, encode: Callable[[torch.Tensor], Selection], tokens_per_image: int, full: bool = False
    ) -> Callable[[], None]:
        model = self.model
        if not full and getattr(self.config, "image_aspect_ratio", None) == "anyres":
            raise ValueError(
                "original LLaVA-1.6 (image_aspect_ratio=anyres) checkpoints are not supported with "
                "a reduced budget: llava re-tiles every crop's 576 rows; use the llava-hf LLaVA-NeXT "
                "checkpoints (per-crop budgets)"
            )
        accept_cache_kwarg(model)

        def encode_images(images: torch.Tensor) -> torch.Tensor:
            return encode(images).tokens

        model.encode_images = encode_images  # instance attribute: this model only

        def undo() -> None:
            model.__dict__.pop("encode_images", None)

        return undo
