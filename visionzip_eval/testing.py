"""Tiny offline LLaVA models with the real architecture, for tests, demos and benchmarks.

No network: the tokenizer is a byte-level BPE built in code (256 byte symbols + specials, no
merges), the image processors are built from code with the real checkpoints' settings, and the
weights are random but deterministic by seed. Only the widths and depths shrink:

- ``build_tiny_llava``: LLaVA-1.5 (llava-hf/llava-1.5-7b-hf): CLIP 336 px / patch 14, so images
  give 576 patches + CLS; Llama LLM.
- ``build_tiny_llava_next``: LLaVA-NeXT (llava-hf/llava-v1.6-vicuna-7b-hf): the same CLIP tower
  on AnyRes crops (base image + 2 to 4 crops of 336 px, the checkpoint's five grid pinpoints);
  Llama LLM.
- ``build_tiny_llava_onevision``: LLaVA-OneVision (llava-hf/llava-onevision-qwen2-*-ov-hf):
  SigLIP 384 px / patch 14 (729 patches, no CLS), AnyRes up to 6x6 crops, videos; Qwen2 LLM.
- ``build_tiny_llava_original``: the original ``llava`` package's LlavaLlamaForCausalLM
  (liuhaotian/llava-v1.5-7b layout), saved to a folder its own builder loads offline.
- ``load_tiny_llava_synth``: not random: the tiny LLaVA-1.5 trained on the synthetic benchmark
  (``visionzip_eval.synth``), loaded from the weights shipped in the package.
- ``build_tiny_qwen2_5_vl``: Qwen2.5-VL (Qwen/Qwen2.5-VL-*-Instruct): 14 px patches, 112 px
  attention windows with full-attention blocks, 2x2 PatchMerger, M-RoPE Qwen2 LLM; dynamic
  resolution capped at 224 x 224 px (64 merged tokens) by default; the vision ``qkv`` weights
  are scaled up so attention is not uniform.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

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


def tiny_tokenizer(extra_special_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: every text encodes, ids are fixed, nothing downloaded.

    ``extra_special_tokens`` (e.g. ``("<video>",)``) come after the byte symbols, so the ids of
    everything else do not move."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *extra_special_tokens]})
    return tokenizer


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


def _instantiate(model_class, config, tokenizer, seed: int, attn_implementation: str,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """``model_class(config)`` under ``seed`` (the global RNG left as it was), eval mode, with the
    attention implementation on every sub-config and the tokenizer's pad/eos ids; its weights
    are made in ``dtype`` on ``device`` (no float32 copy first: a 7B model in half precision
    would need twice its size)."""
    config._attn_implementation = attn_implementation
    for sub in (config.vision_config, config.text_config):
        sub._attn_implementation = attn_implementation
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = model_class(config) if dtype == torch.float32 else model_class._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


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
    return _instantiate(LlavaForConditionalGeneration, config, tokenizer, seed, attn_implementation), processor


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


def llava_onevision_7b_config() -> LlavaOnevisionConfig:
    """llava-hf/llava-onevision-qwen2-7b-ov-hf's architecture: SigLIP-so400m at 384 px (26 of its
    27 layers run: 1152 wide, 16 heads, 4304 MLP) and Qwen2-7B (3584 wide, 28 layers, 28 heads,
    4 KV heads, 18944 MLP, vocab 152064); the report's frames table predicts its GPU time."""
    text = Qwen2Config(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064)
    vision = SiglipVisionConfig(hidden_size=1152, num_hidden_layers=26, intermediate_size=4304,
                                num_attention_heads=16, image_size=384, patch_size=14)
    return LlavaOnevisionConfig(text_config=text.to_dict(), vision_config=vision.to_dict())


def build_llava15_7b_shape(layers: int = 32, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                           seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LLaVA-1.5-7B's architecture with random weights (``bench realsize``): the tiny tokenizer
    (the 32064-row embedding is the 7B's size whatever the tokenizer) and the CLIP processor."""
    processor = tiny_processor()
    model = _instantiate(LlavaForConditionalGeneration, llava15_7b_config(layers), processor.tokenizer, seed,
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


# -- LLaVA-NeXT ---------------------------------------------------------------------------

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
    return _instantiate(LlavaNextForConditionalGeneration, config, tokenizer, seed, attn_implementation), processor


# -- LLaVA-OneVision ----------------------------------------------------------------------

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
    return _instantiate(LlavaOnevisionForConditionalGeneration, config, tokenizer, seed, attn_implementation), processor


# -- original LLaVA (the llava package) --------------------------------------------------


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

    from visionzip_eval.backends.llava_original import LlavaOriginalProcessor, llava_missing_error

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


def sample_images() -> dict[str, "PIL.Image.Image"]:  # noqa: F821
    """Real photographs that ship inside installed packages (no download)."""
    from PIL import Image
    from skimage import data

    return {
        "astronaut": Image.fromarray(data.astronaut()),
        "coffee": Image.fromarray(data.coffee()),
        "chelsea": Image.fromarray(data.chelsea()),
        "rocket": Image.fromarray(data.rocket()),
    }


# -- Qwen2.5-VL ----------------------------------------------------------------------------

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
    model = _instantiate(Qwen2_5_VLForConditionalGeneration, config, tokenizer, seed, attn_implementation)
    with torch.no_grad():  # sharper than the 0.02 init: attention scores that are not uniform
        for block in model.model.visual.blocks:
            block.attn.qkv.weight.mul_(8.0)
    return model, processor


# -- the trained reference model --------------------------------------------------------------


def load_tiny_llava_synth(attn_implementation: str = "sdpa"):
    """The tiny LLaVA-1.5 *trained* on the synthetic benchmark (``visionzip_eval.synth``), whose
    weights ship in the package: (model, processor), CPU, float32, eval mode, offline."""
    from visionzip_eval.synth.weights import load_trained

    return load_trained(attn_implementation=attn_implementation)
