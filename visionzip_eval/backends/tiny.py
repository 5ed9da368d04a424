"""What every tiny offline model shares: the byte-level tokenizer (256 byte symbols + specials,
no merges: every text encodes, ids are fixed, nothing downloaded), CLIP's normalisation and
``instantiate`` (random weights, deterministic by seed). Each family's own tiny builder (and its
real-size shape, where it has one) lives in its backend module and is declared in its ``builtin``;
the image processors are built from code with the real checkpoints' settings, only the widths
and depths shrink.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


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



def instantiate(model_class, config, tokenizer, seed: int, attn_implementation: str,
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

