"""Demo-Chat as plain Python: choose the visual tokens yourself, then talk about the image.

The VisionZip README's Demo-Chat lets a user pick which visual tokens reach the LLM. Here:

- :class:`ChosenTokens` is a ``TokenReducer`` that passes exactly the chosen patches of each
  tower input (in positional order), the CLS token if asked, and optionally VisionZip's
  contextual tokens merged from the unchosen patches (``selection.merge_contextual``, the same
  code VisionZip runs). It plugs into everything a reducer plugs into (``with reducer(model)``,
  ``visionzip_processor``, the engine), so the processor's placeholder expansion follows its
  count. It is not a registered method: it has no budget, and a sweep cannot choose patches.
  On AnyRes models (LLaVA-NeXT, OneVision) the same patches are kept in every unit: the base
  image and each crop.
- :func:`method_start` turns any registered pre-LLM method's selection at a budget into a
  ``ChosenTokens`` (VisionZip's: its dominant patches, CLS and its contextual count, so sending
  it reproduces VisionZip exactly).
- :class:`Conversation` is one image with one selection: the visual tokens are encoded once
  and reused by every turn (as the lmms-eval adapter's multi-round path does).
- :func:`answer` is the same question through the plain Python API (the reducer applied to the
  model, the processor expanding the placeholders, ``model.generate``), with no cache.
- :func:`grid_picture`, :func:`patch_at`, :func:`patches_between` are the patch grid the page
  draws and clicks on.

``visionzip_eval.demos.app`` draws the gradio page around these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from visionzip_eval.apply import visionzip_processor
from visionzip_eval.backends.base import TowerSignals, VLMBackend, backend_for
from visionzip_eval.engine import Engine, Generation, Request
from visionzip_eval.methods.base import TokenReducer
from visionzip_eval.methods.registry import MethodSpec
from visionzip_eval.methods.visionzip import VisionZip
from visionzip_eval.selection import MergeRule, Selection, gather_rows, merge_contextual
from visionzip_eval.demos.visualize import DOMINANT_OUTLINE, outline, processed_pixels

MAX_NEW_TOKENS = 32


@dataclass
class ChosenTokens(TokenReducer):
    """Exactly the chosen patches (raster indices into the tower's patch grid, CLS not
    counted), in positional order; with ``cls`` the CLS token first; with ``contextual`` > 0
    the unchosen patches merged into that many contextual tokens as VisionZip merges them
    (``merge``: reference = target + mean of members, average = mean of both)."""

    patches: tuple[int, ...] = ()
    cls: bool = False
    contextual: int = 0
    merge: MergeRule = "reference"

    budget_fields = ()

    def __post_init__(self) -> None:
        patches = sorted({int(p) for p in self.patches})
        if not patches:
            raise ValueError("no patches chosen: click patches on the grid, or start from a method's selection")
        if patches[0] < 0:
            raise ValueError(f"patch index {patches[0]} is negative")
        self.patches = tuple(patches)
        if isinstance(self.contextual, bool) or int(self.contextual) != self.contextual or self.contextual < 0:
            raise ValueError(f"contextual tokens must be a whole number >= 0, got {self.contextual!r}")
        self.contextual = int(self.contextual)
        if self.merge not in ("reference", "average"):
            raise ValueError(f"unknown merge rule {self.merge!r}: use 'reference' or 'average'")

    @property
    def needs_attention(self) -> bool:  # the merge compares layer L's keys
        return self.contextual > 0

    def check(self, backend: VLMBackend) -> None:
        rows, cols = backend.patch_grid
        total = rows * cols
        if self.patches[-1] >= total:
            raise ValueError(f"patch {self.patches[-1]} is outside the {rows}x{cols} grid (patches 0..{total - 1})")
        if self.cls and not backend.cls_token:
            raise ValueError(f"the {backend.name} tower has no CLS token: untick CLS")
        left = total - len(self.patches)
        if self.contextual > left:
            raise ValueError(f"{self.contextual} contextual tokens cannot be merged from the {left} unchosen patches")

    def tokens_per_image(self, backend: VLMBackend) -> int:
        return len(self.patches) + int(self.cls) + self.contextual

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        hidden = signals.hidden
        batch, tokens, _ = hidden.shape
        offset = backend.patch_offset
        rows, cols = backend.patch_grid
        if tokens - offset != rows * cols:
            raise ValueError(
                f"the tower gave {tokens - offset} patches for this input, not the {rows}x{cols} grid the "
                "patches were chosen on"
            )
        device = hidden.device
        keep = torch.zeros(tokens, dtype=torch.bool, device=device)
        keep[torch.tensor(self.patches, device=device) + offset] = True
        keep[0] |= self.cls  # CLS sits at position 0 (offset 1); without CLS the tick is refused
        kept = keep.nonzero().squeeze(1)  # ascending: CLS first, then raster order
        index = kept.expand(batch, -1)
        slot = torch.full((batch, tokens), -1, dtype=torch.long, device=device)
        slot[:, kept] = torch.arange(len(kept), device=device)
        if not self.contextual:
            return Selection(tokens=gather_rows(hidden, index), dominant_index=index, slot=slot)
        unchosen = torch.ones(tokens, dtype=torch.bool, device=device)
        unchosen[:offset] = False  # the CLS token is sent or dropped, never merged
        unchosen[kept] = False
        rest = unchosen.nonzero().squeeze(1).expand(batch, -1)
        merged, target_pos, member_slot = merge_contextual(
            gather_rows(hidden, rest), gather_rows(signals.metric, rest), self.contextual, self.merge
        )
        slot.scatter_(1, rest, member_slot + len(kept))
        return Selection(
            tokens=torch.cat([gather_rows(hidden, index), merged], dim=1),
            dominant_index=index,
            contextual_index=rest[:, target_pos],
            slot=slot,
        )

    def describe(self) -> str:
        parts = [f"{len(self.patches)} patch{'es' if len(self.patches) != 1 else ''}"]
        if self.cls:
            parts.append("CLS")
        if self.contextual:
            parts.append(f"{self.contextual} contextual")
        return " + ".join(parts)


# -- the tower input the page draws --------------------------------------------------------


def base_unit(engine: Engine, image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) the image's first tower input as the engine preprocesses it: the image
    itself for LLaVA-1.5, the resized whole image (base unit) for AnyRes models."""
    processed = engine.pixel_inputs([image.convert("RGB")])
    if "image_grid_thw" in processed:
        raise ValueError(
            f"{engine.backend.name} sizes its patch grid to each image: the page needs one fixed grid per "
            "tower input (LLaVA-1.5, LLaVA-NeXT, OneVision)"
        )
    pixel_values = processed["pixel_values"]
    unit = pixel_values[0, :1] if pixel_values.dim() == 5 else pixel_values[:1]
    return unit.to(engine.device, engine.dtype)


def unit_pixels(engine: Engine, image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8: the base unit as the tower sees it (what the grid is drawn on)."""
    return processed_pixels(engine.processor, base_unit(engine, image))


@torch.no_grad()
def method_start(engine: Engine, image: Image.Image, method: str, budget: str | int) -> ChosenTokens:
    """The patches ``method`` keeps at ``budget`` on the image's base unit, as a selection to
    edit. VisionZip's comes with CLS and its contextual count, so it reproduces VisionZip."""
    spec = MethodSpec.parse(method)
    reducer = spec.build(budget)
    if reducer.kind == "in-llm":
        raise ValueError(
            f"{spec.name} prunes inside the LLM, guided by the question: it selects nothing before the LLM"
        )
    if reducer.keeps_all:
        raise ValueError("budget 'full' keeps every patch: press 'all' instead")
    selection = reducer.select(engine.model, base_unit(engine, image))
    if selection.dominant_index is None:
        raise ValueError(
            f"{spec.name} keeps no individual patches (it pools or merges them all): start from another method"
        )
    offset = engine.backend.patch_offset
    positions = selection.dominant_index[0].tolist()
    return ChosenTokens(
        patches=tuple(p - offset for p in positions if p >= offset),
        cls=bool(offset and 0 in positions),
        contextual=reducer.contextual if isinstance(reducer, VisionZip) else 0,
    )


# -- the patch grid ---------------------------------------------------------------------------

SCALE = 2  # grid picture pixels per processed-image pixel (bigger click targets)
_DIM = 0.3  # brightness of unchosen patches
_GRID_LINE = (90, 90, 90)


def grid_picture(pixels: np.ndarray, grid: tuple[int, int], chosen: Iterable[int], scale: int = SCALE) -> np.ndarray:
    """The processed image, ``scale`` times larger, with its patch grid drawn: chosen patches as
    they are, framed yellow; the others dimmed."""
    rows, cols = grid
    picture = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    height, width = picture.shape[:2]
    mask = np.zeros(rows * cols, dtype=bool)
    mask[list(chosen)] = True
    mask = mask.reshape(rows, cols)
    ph, pw = height // rows, width // cols
    dim = ~mask.repeat(ph, axis=0).repeat(pw, axis=1)
    out = np.where(dim[..., None], picture * _DIM, picture).round().astype(np.uint8)
    out[::ph] = _GRID_LINE
    out[:, ::pw] = _GRID_LINE
    outline(out, mask, DOMINANT_OUTLINE)
    return out


def patch_at(x: float, y: float, grid: tuple[int, int], size: tuple[int, int]) -> int:
    """The raster index of the patch under pixel (x, y) of a picture of ``size`` (width, height)."""
    rows, cols = grid
    width, height = size
    col = min(max(int(x * cols // width), 0), cols - 1)
    row = min(max(int(y * rows // height), 0), rows - 1)
    return row * cols + col


def patches_between(a: int, b: int, grid: tuple[int, int]) -> list[int]:
    """Every patch of the rectangle with corner patches ``a`` and ``b``."""
    cols = grid[1]
    (r0, c0), (r1, c1) = divmod(a, cols), divmod(b, cols)
    return [r * cols + c for r in range(min(r0, r1), max(r0, r1) + 1) for c in range(min(c0, c1), max(c0, c1) + 1)]


# -- talking about the image ---------------------------------------------------------------


def image_key(image: Image.Image) -> str:
    """Identifies an image by its pixels (the page hands a fresh object every event)."""
    rgb = image.convert("RGB")
    return f"{rgb.size}:{hashlib.sha1(rgb.tobytes()).hexdigest()}"


@dataclass
class Turn:
    """One answer and what the LLM received for it."""

    answer: str
    visual_tokens: int  # visual tokens in the LLM's input (all units of the image)
    prefill_ms: float
    encoded: bool  # the tower ran for this turn (first turn of a conversation)
    encode_ms: float  # the encode's time on the turn that ran it, else 0


@dataclass
class Conversation:
    """One image and one reducer; the visual tokens are encoded at the first turn and reused
    by every later turn (the reducer does not look at the text)."""

    image: Image.Image
    reducer: TokenReducer
    history: list[tuple[str, str]] = field(default_factory=list)
    features: dict | None = None
    key: str = ""

    def __post_init__(self) -> None:
        self.image = self.image.convert("RGB")
        self.key = image_key(self.image)

    def matches(self, image: Image.Image, reducer: TokenReducer) -> bool:
        return reducer == self.reducer and image_key(image) == self.key

    def ask(self, engine: Engine, question: str, max_new_tokens: int = MAX_NEW_TOKENS) -> Turn:
        question = question.strip()
        if not question:
            raise ValueError("ask a question about the image")
        engine.set_reducer(self.reducer)
        encode_ms, encoded = 0.0, self.features is None
        if encoded:
            self.features, encode_ms = engine.encode([self.image])
        request = Request(turns=[*self.history, (question, None)], images=[self.image])
        output = engine.generate([request], Generation(max_new_tokens=max_new_tokens), image_features=self.features)[0]
        self.history.append((question, output.text))
        return Turn(output.text, output.metrics["visual_tokens"], output.metrics["prefill_ms"], encoded, encode_ms)


@torch.no_grad()
def answer(
    model,
    processor,
    image: Image.Image,
    reducer: TokenReducer,
    question: str,
    history: Iterable[tuple[str, str]] = (),
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> str:
    """The answer through the plain Python API, nothing cached: ``reducer`` applied to the model
    for this call, the processor expanding the image placeholder to its count, greedy
    ``model.generate``."""
    backend = backend_for(model)
    prompt = backend.chat_prompt(processor, [*history, (question.strip(), None)], images=1)
    parameter = next(model.parameters())
    with reducer(model):
        visionzip_processor(processor, model)
        inputs = processor(images=[image.convert("RGB")], text=prompt, return_tensors="pt").to(parameter.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    visionzip_processor(processor, model)  # back to the expansion of whatever is applied now
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
