"""The tiny reference VLM trained on the synthetic benchmark: architecture, tokenizer, prompts.

Architecture: LLaVA-1.5 exactly (``LlavaForConditionalGeneration``: a CLIP tower at 336 px /
patch 14, so 576 patches + CLS, features from layer -2 without CLS, a two-layer GELU projector,
a Llama LLM), only narrower and shallower (:data:`SIZES`). The tokenizer is word-level over
the benchmark's vocabulary: every prompt the ``visionzip_synth_*`` tasks produce, every answer,
and the chat template's words, so a question is ~15-40 tokens after the 576 image tokens.

The processor is LLaVA-1.5's (``backends.llava_hf.tiny_processor``: CLIP 336 px, the llava-hf chat
template) around this tokenizer.

Prompts are built by lmms-eval's own ``doc_to_text`` functions and the model's chat template,
the same path the adapter takes at evaluation, so the trainer sees the exact token sequences
the benchmark will show the model.
"""

from __future__ import annotations

import string

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

from visionzip_eval.synth.questions import NUMBER_WORDS, RELATION_PHRASE
from visionzip_eval.synth.scenes import COLOR_NAMES, SHAPES
from visionzip_eval.backends.llava_hf import tiny_llava_config
from visionzip_eval.backends.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"
SIZES = dict(vision_hidden=96, vision_layers=4, vision_heads=4, text_hidden=128, text_layers=3, text_heads=4,
             text_kv_heads=4)

# lmms-eval's prompt pieces (the tasks' default lmms_eval_specific_kwargs) and the template.
PROMPT_PARTS = (
    "USER: ASSISTANT:",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Please answer yes or no.",
)


def split_words(text: str) -> list[str]:
    """The tokenizer's pre-tokenization: runs of word characters, runs of punctuation."""
    return [word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def vocabulary(corpus: list[str]) -> list[str]:
    """Special tokens, then every word of ``corpus``, the prompt parts and the answer words,
    sorted, so the ids depend only on the set of words."""
    words = set()
    for text in [*corpus, *PROMPT_PARTS]:
        words.update(split_words(text))
    words.update(COLOR_NAMES)
    words.update(SHAPES)
    words.update(NUMBER_WORDS)
    words.update(RELATION_PHRASE)
    words.update(str(d) for d in range(10))
    words.update(["A", "B", "C", "D", ".", "yes", "no", "Yes", "No"])
    return SPECIAL_TOKENS + sorted(words)


# Spelling fallback: any ASCII word the vocabulary lacks is spelt in characters ("zebra" ->
# z ##e ##b ##r ##a) instead of becoming <unk>, so every text round-trips. transformers'
# stop-string matching needs that (it tokenises a probe word, "abcdef", and looks for it in
# the decoded text). Appended after the words, so word ids do not depend on it.
FALLBACK_CHARACTERS = string.ascii_letters + string.digits + string.punctuation


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the benchmark's words, with a character fallback (WordPiece
    with whole words as pieces); decoding joins words with spaces."""
    words = vocabulary(corpus)
    pieces = [c for c in FALLBACK_CHARACTERS if c not in words] + ["##" + c for c in FALLBACK_CHARACTERS]
    vocab = {token: i for i, token in enumerate(words + [IMAGE_TOKEN] + pieces)}  # <image>: right after the words
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix="##"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlavaForConditionalGeneration:
    config = tiny_llava_config(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                               **SIZES)
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        _width_scaled_init(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


@torch.no_grad()
def _width_scaled_init(model: LlavaForConditionalGeneration) -> None:
    """Projector and LLM weights drawn with std 1/sqrt(fan-in) (embeddings std 1) instead of
    transformers' fixed 0.02, which is sized for 4096-wide models: at width 128 it leaves every
    attention logit near 0, and finding the few object tokens among 576 then sits on a saddle
    (measured on fresh scenes, existence questions: chance for 300 steps with 0.02, 0.75 train
    accuracy at 350 steps with this)."""
    for module in (model.model.multi_modal_projector, model.model.language_model, model.lm_head):
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, layer.in_features ** -0.5)
            elif isinstance(layer, torch.nn.Embedding):
                layer.weight.normal_(0.0, 1.0)


def pixel_values(images: list, dtype=torch.float32) -> torch.Tensor:
    """What the CLIP processor gives for 336 x 336 RGB images (no resize, no crop: rescale and
    normalise only), without its per-image Python overhead; tests check the equality."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255.0
    array = (array - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(dtype)


# ------------------------------------------------------------------ prompts, as lmms-eval builds them


def doc_prompt(bench: str, doc: dict) -> str:
    """The question text lmms-eval's task gives the model (its doc_to_text, default kwargs)."""
    from lmms_eval.tasks.gqa.utils import gqa_doc_to_text
    from lmms_eval.tasks.mme.utils import mme_doc_to_text
    from lmms_eval.tasks.pope.utils import pope_doc_to_text

    single_word = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
    if bench == "pope":
        return pope_doc_to_text(doc, single_word)
    if bench == "mme":
        return mme_doc_to_text(doc, single_word)
    if bench == "gqa":
        return gqa_doc_to_text(doc, single_word)
    if bench == "mmbench":
        from lmms_eval.tasks.mmbench.en_utils import mmbench_doc_to_text

        return mmbench_doc_to_text(doc, {"pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."})
    raise ValueError(f"unknown synthetic benchmark {bench!r}")


def chat_prompt(model: LlavaForConditionalGeneration, processor: LlavaProcessor, question: str) -> str:
    """The full prompt with one <image> placeholder, as the adapter renders it (one turn)."""
    from visionzip_eval.backends import backend_for

    return backend_for(model).chat_prompt(processor, [(question, None)], images=1)
