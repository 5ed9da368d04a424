"""LLaVA instruction data for ``visionzip-eval tune``: read, check, tokenise, batch.

The format is LLaVA's (``llava_v1_5_mix665k.json``, LLaVA-Instruct): a JSON list of
``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
"value": ...}, ...]}``, multi-turn included. Everything is checked before training starts
(:func:`read_samples`), each problem as one line naming the sample and the fix.

Tokenising (:func:`encode_conversation`): the conversation is rendered with the checkpoint's own
chat template, the characters of each assistant reply are located by rendering the
conversation up to that reply with and without it, and a token is a label exactly when its
characters lie inside a reply. The template of LLaVA-1.5 ends a reply with no end-of-sequence
token, so one is added after each reply (and is a label: the model learns to stop), as the
original LLaVA's ``</s>`` separator does. The one ``<image>`` token is then expanded to the
count the model receives under its reduction, as ``visionzip_processor`` makes the processor
do at evaluation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100  # labels the loss skips (transformers' cross-entropy ignore_index)
ROLES = {"human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class Sample:
    """One checked conversation: ``turns`` of (user text without the placeholder, reply)."""

    id: str
    image: Path
    turns: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class DataSummary:
    path: Path
    sha256: str
    size_bytes: int
    total: int  # samples in the file
    text_only: int  # samples without an image, left out (nothing of a visual-token reduction trains on them)
    used: int  # samples kept after --data-fraction

    def as_dict(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "size_bytes": self.size_bytes,
                "samples_in_file": self.total, "text_only_skipped": self.text_only, "samples": self.used}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_json(path: Path) -> list:
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file: give the LLaVA instruction JSON (a list of conversations)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"--data {path}: not a UTF-8 text file: give the LLaVA instruction JSON") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--data {path}: malformed JSON ({error.msg}, line {error.lineno} column {error.colno}): "
            "fix the file (LLaVA's format: a JSON list of {id, image, conversations})"
        ) from None
    if not isinstance(data, list):
        raise ValueError(f"--data {path}: the top level is a {type(data).__name__}, not a list: "
                         "LLaVA's format is a JSON list of {id, image, conversations}")
    if not data:
        raise ValueError(f"--data {path}: empty data (no samples): give a file with at least one conversation")
    return data


def _check_sample(index: int, raw, image_folder: Path, missing: list) -> Sample | None:
    """The sample as a :class:`Sample`, None for a text-only one; ValueError for a malformed one.
    Images that do not exist go into ``missing`` (reported together)."""
    where = f"sample {index}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is a {type(raw).__name__}, not an object with id, image and conversations")
    where = f"sample {index} (id {raw.get('id', '?')!r})"
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where} has no conversations list: each sample needs "
                         '"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]')
    turns, user = [], None
    for position, message in enumerate(conversations):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise ValueError(f"{where}, message {position}: needs a 'from' and a text 'value'")
        role = ROLES.get(message.get("from"))
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"{where}, message {position}: from {message.get('from')!r} where a "
                             f"{'human' if expected == 'user' else 'gpt'} message belongs: messages alternate "
                             "human, gpt, human, gpt, ... starting with human")
        if role == "user":
            user = message["value"]
        else:
            turns.append((user, message["value"]))
    if len(conversations) % 2:
        raise ValueError(f"{where}: the last message is from human, with no gpt reply to learn: end every "
                         "conversation with a gpt message")
    placeholders = sum(user.count(IMAGE_PLACEHOLDER) for user, _ in turns)
    if any(reply.count(IMAGE_PLACEHOLDER) for _, reply in turns):
        raise ValueError(f"{where}: a gpt reply holds {IMAGE_PLACEHOLDER}: the image goes in a human message")
    image = raw.get("image")
    if image is None:
        if placeholders:
            raise ValueError(f"{where}: {IMAGE_PLACEHOLDER} in the conversation but no 'image' field: add the image's path")
        return None
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: 'image' must be one image path (multi-image samples are not supported)")
    if placeholders != 1:
        what = "no" if placeholders == 0 else f"{placeholders}"
        raise ValueError(f"{where}: conversation with {what} {IMAGE_PLACEHOLDER} placeholder(s) for its one image: "
                         f"put exactly one {IMAGE_PLACEHOLDER} in a human message (LLaVA writes \"<image>\\n\" "
                         "before the first question)")
    path = image_folder / image
    if not path.is_file():
        missing.append((where, path))
    return Sample(str(raw.get("id", index)), path, tuple(turns))


def read_samples(data: str | Path, image_folder: str | Path, fraction: float = 1.0,
                 seed: int = 0) -> tuple[list[Sample], DataSummary]:
    """Every sample of ``data`` checked (structure, ``<image>``, image files on disk), text-only
    samples left out, then a seeded ``fraction`` of them (the paper's tenth: 0.1)."""
    path, folder = Path(data), Path(image_folder)
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"--data-fraction must be in (0, 1], got {fraction!r}: 0.1 takes a tenth of the samples")
    if not folder.is_dir():
        raise ValueError(f"--image-folder {folder}: no such folder: give the folder the samples' image paths are relative to")
    raw = _load_json(path)
    missing: list = []
    checked = [_check_sample(i, item, folder, missing) for i, item in enumerate(raw)]
    samples = [s for s in checked if s is not None]
    if missing:
        where, first = missing[0]
        raise ValueError(f"missing image file: {where} names {first} ({len(missing)} of {len(raw)} samples lack "
                         "their image): fix --image-folder or the image paths in --data")
    if not samples:
        raise ValueError(f"--data {path}: no sample has an image ({len(raw)} text-only): a visual-token reduction "
                         "tunes on image conversations")
    text_only = len(checked) - len(samples)
    used = len(samples) if fraction == 1 else max(1, round(fraction * len(samples)))
    if used < len(samples):
        keep = np.sort(np.random.default_rng(seed).choice(len(samples), size=used, replace=False))
        samples = [samples[int(i)] for i in keep]
    return samples, DataSummary(path, file_sha256(path), path.stat().st_size, len(raw), text_only, len(samples))


# -- tokenising ---------------------------------------------------------------------------------


def _messages(turns, upto: int, reply: bool) -> list[dict]:
    """Chat messages for the first ``upto`` turns, the last one with its reply or not; the
    image goes into the user message whose text held the placeholder."""
    messages = []
    for index, (user, answer) in enumerate(turns[:upto]):
        content = []
        if IMAGE_PLACEHOLDER in user:
            content.append({"type": "image"})
            user = user.replace(IMAGE_PLACEHOLDER + "\n", "").replace("\n" + IMAGE_PLACEHOLDER, "")
            user = user.replace(IMAGE_PLACEHOLDER, "").strip()
        content.append({"type": "text", "text": user})
        messages.append({"role": "user", "content": content})
        if index < upto - 1 or reply:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def render_conversation(processor, turns) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the checkpoint's chat template, and the character span of
    each assistant reply in it (from the prompt's end to the reply's last non-space character)."""
    template = getattr(processor, "chat_template", None)
    if not template:
        raise ValueError(f"{type(processor).__name__} has no chat template: tuning renders conversations with the "
                         "checkpoint's own template (llava-hf checkpoints ship one)")
    text = processor.apply_chat_template(_messages(turns, len(turns), True), tokenize=False)
    spans = []
    for index in range(1, len(turns) + 1):
        prompt = processor.apply_chat_template(_messages(turns, index, False), tokenize=False, add_generation_prompt=True)
        upto = processor.apply_chat_template(_messages(turns, index, True), tokenize=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ValueError("the chat template does not render a conversation as its prompts followed by the "
                             "replies, so the reply tokens cannot be told apart: tune supports LLaVA-style templates")
        # the separator a template writes after a reply (LLaVA-1.5's space) is no reply token
        spans.append((len(prompt), len(prompt) + len(upto[len(prompt):].rstrip())))
    return text, spans


def encode_conversation(processor, turns, tokens_per_image: int, image_token_id: int,
                        max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are the reply tokens (plus an end-of-sequence token after
    each reply when the template writes none), IGNORE_INDEX elsewhere; the image token expanded
    to ``tokens_per_image`` placeholders. Truncated to ``max_length``, never inside the image."""
    tokenizer = processor.tokenizer
    text, spans = render_conversation(processor, turns)
    encoded = tokenizer(text, return_offsets_mapping=True)
    tokens, offsets = encoded["input_ids"], encoded["offset_mapping"]

    def reply_of(start: int, end: int) -> int | None:
        # a token whose characters overlap a reply is a reply token (a SentencePiece token may
        # carry the space before the reply's first word)
        return next((k for k, (s, e) in enumerate(spans) if end > start and start < e and end > s), None)

    owners = [reply_of(*span) for span in offsets]
    ids, labels = [], []
    eos = tokenizer.eos_token_id
    for index, (token, owner) in enumerate(zip(tokens, owners)):
        if token == image_token_id:
            ids += [image_token_id] * tokens_per_image
            labels += [IGNORE_INDEX] * tokens_per_image
            continue
        ids.append(token)
        labels.append(token if owner is not None else IGNORE_INDEX)
        reply_ends = owner is not None and (index + 1 == len(tokens) or owners[index + 1] != owner)
        if reply_ends and token != eos:
            ids.append(eos)
            labels.append(eos)
    found = ids.count(image_token_id)
    if found != tokens_per_image:
        raise ValueError(f"the rendered conversation holds {found // tokens_per_image} image tokens, not one: the "
                         f"tokenizer must keep {IMAGE_PLACEHOLDER} as one token")
    if max_length is not None and len(ids) > max_length:
        if len(ids) - ids[::-1].index(image_token_id) > max_length:
            raise ValueError(f"--max-length {max_length} cuts into the image's {tokens_per_image} tokens: raise it")
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


class ConversationDataset(torch.utils.data.Dataset):
    """Tokenised samples (all tokenised up front, so a template problem stops the run before
    training); images are read when a batch is built (:class:`Collator`)."""

    def __init__(self, samples: list[Sample], processor, tokens_per_image: int, image_token_id: int,
                 max_length: int | None = None):
        self.samples = samples
        self.encoded = [encode_conversation(processor, s.turns, tokens_per_image, image_token_id, max_length)
                        for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        ids, labels = self.encoded[index]
        return {"input_ids": ids, "labels": labels, "image": str(self.samples[index].image)}


class Collator:
    """A batch: right-padded ids, labels and attention mask, and the images through the
    checkpoint's image processor (shaped as ``image_aspect`` says, as the evaluation does)."""

    def __init__(self, processor, backend, image_aspect: str | None = None):
        self.processor = processor
        self.backend = backend
        self.image_aspect = image_aspect
        self.image_kwargs = backend.image_processor_kwargs(processor, image_aspect)
        self.pad_id = processor.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = processor.tokenizer.eos_token_id

    def __call__(self, features: list[dict]) -> dict:
        from PIL import Image

        length = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            mask[row, :n] = 1
        images = []
        for feature in features:
            with Image.open(feature["image"]) as image:
                images.append(image.convert("RGB"))
        images = self.backend.shape_images(self.processor, images, self.image_aspect)
        pixels = self.processor.image_processor(images, return_tensors="pt", **self.image_kwargs)["pixel_values"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}
