"""Which tokens survive: the image's patch grid, dominant patches kept as they are, every
other patch tinted with the colour of the contextual token it was merged into (targets
outlined in white), and the CLS-attention heatmap VisionZip ranks by.

Panels are drawn pixel-exact with numpy (one panel pixel per processed-image pixel), so a
patch's colour can be checked in tests; matplotlib supplies the colour maps and the font
(its DejaVu Sans: PIL's tiny default font all but drops spaces). A legend strip above the
captions says what the frames and tints mean (:data:`LEGEND`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from visionzip_eval.backends import backend_for
from visionzip_eval.budget import Budget
from visionzip_eval.methods.registry import MethodSpec, display_name
from visionzip_eval.methods.visionzip import VisionZip

DOMINANT_OUTLINE = (255, 221, 0)  # yellow frame around kept patches
TARGET_OUTLINE = (255, 255, 255)  # white frame around contextual targets
TITLE_HEIGHT = 28  # each panel's caption
LEGEND_LINE = 22  # one line of the legend strip: swatch and label
LEGEND_PAD = 4
LEGEND_HEIGHT = LEGEND_PAD + LEGEND_LINE  # the strip when the legend fits on one line (sheets >= 680 px wide)
CAPTION_HEIGHT = LEGEND_HEIGHT + TITLE_HEIGHT  # all text above the panels
FONT_SIZE = 12
ATTENTION_TITLE = "CLS attention at layer -2 (bright = high)"
# (swatch, label) in the order drawn: what a frame or tint in the selection panels means.
LEGEND: tuple[tuple[str, str], ...] = (
    ("yellow frame", "dominant token (kept)"),
    ("tint", "contextual token (the dimmed patches are merged into the one most like them)"),
    ("white frame", "contextual target"),
)
SWATCH = 16  # legend swatch side, px
_SWATCH_BASE = np.array([128, 128, 128], dtype=np.float32)  # the "image" under a swatch's tint or frame
_SWATCH_BORDER = (64, 64, 64)  # keeps a white frame visible on the white sheet


@dataclass
class SelectionMap:
    """One image's selection on the patch grid (CLS left out)."""

    budget: Budget
    pixels: np.ndarray  # (H, W, 3) uint8: the processed image the tower saw
    grid: tuple[int, int]
    dominant: np.ndarray  # (rows, cols) bool: patch kept as a dominant token
    cluster: np.ndarray  # (rows, cols) int: contextual token index, -1 for dominant patches
    target: np.ndarray  # (rows, cols) bool: patch is a contextual target
    attention: np.ndarray  # (rows, cols) float: CLS attention summed over heads
    method: str = "visionzip"  # the registered method whose selection this is


def processed_pixels(processor, pixel_values: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    image = (pixel_values[0].float().cpu() * std + mean).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def selection_map(model, processor, image: Image.Image, budget: Budget | int | str,
                  method: str = "visionzip") -> SelectionMap:
    budget = Budget.parse(budget)
    if budget.is_full:
        raise ValueError("budget 'full' selects everything: pick a reduced budget to visualise")
    if MethodSpec.parse(method).name != "visionzip":
        return _method_map(model, processor, image, budget, method)
    backend = backend_for(model)
    reducer = VisionZip(budget.dominant, budget.contextual)
    reducer.check(backend)
    pixel_values = processor.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    parameter = next(model.parameters())
    signals = backend.capture(pixel_values.to(parameter.device, parameter.dtype), attention=True)
    selection = reducer.reduce(signals, backend)
    rows, cols = backend.patch_grid
    offset = backend.patch_offset
    slot = selection.slot[0, offset:].cpu().numpy().reshape(rows, cols)
    target = np.zeros(rows * cols, dtype=bool)
    target[selection.contextual_index[0].cpu().numpy() - offset] = True
    return SelectionMap(
        budget=budget,
        pixels=processed_pixels(processor, pixel_values),
        grid=(rows, cols),
        dominant=slot < budget.dominant,
        cluster=np.where(slot < budget.dominant, -1, slot - budget.dominant),
        target=target.reshape(rows, cols),
        attention=signals.cls_attention[0].sum(0)[offset:].cpu().numpy().reshape(rows, cols),
    )


def drawable(method: str, budget: Budget | int | str):
    """(spec, reducer) of a method whose selection can be drawn at ``budget``; ValueError (one
    line) for an unknown method, bad options, or an in-LLM method (no selection before the LLM)."""
    spec = MethodSpec.parse(method)
    reducer = spec.build(budget)
    if reducer.kind == "in-llm":
        raise ValueError(f"{spec.name} prunes inside the LLM, guided by the question: it selects nothing before "
                         "the LLM to draw; pick a pre-LLM method (visionzip-eval methods --kind pre-llm)")
    return spec, reducer


def _method_map(model, processor, image: Image.Image, budget: Budget, method: str) -> SelectionMap:
    """Any other registered pre-LLM method's kept patches (it merges nothing into targets of its
    own: every other patch is dropped, or folded into the kept ones)."""
    spec, reducer = drawable(method, budget)
    backend = backend_for(model)
    reducer.check(backend)
    pixel_values = processor.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    parameter = next(model.parameters())
    signals = backend.capture(pixel_values.to(parameter.device, parameter.dtype), attention=True)
    selection = reducer.reduce(signals, backend)
    if selection.dominant_index is None:
        raise ValueError(f"{spec.name} keeps no individual patches (it pools or merges them all): nothing to "
                         "draw; pick another method")
    rows, cols = backend.patch_grid
    offset = backend.patch_offset
    kept = np.zeros(rows * cols, dtype=bool)
    positions = selection.dominant_index[0].cpu().numpy()
    kept[positions[positions >= offset] - offset] = True
    return SelectionMap(
        budget=budget, pixels=processed_pixels(processor, pixel_values), grid=(rows, cols),
        dominant=kept.reshape(rows, cols), cluster=np.full((rows, cols), -1), target=np.zeros((rows, cols), bool),
        attention=signals.cls_attention[0].sum(0)[offset:].cpu().numpy().reshape(rows, cols), method=spec.label,
    )


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    rows, cols = grid.shape[:2]
    return grid.repeat(height // rows, axis=0).repeat(width // cols, axis=1)


def outline(panel: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    height, width = panel.shape[:2]
    ph, pw = height // mask.shape[0], width // mask.shape[1]
    for r, c in zip(*np.nonzero(mask)):
        y, x = r * ph, c * pw
        panel[y, x : x + pw] = panel[y + ph - 1, x : x + pw] = colour
        panel[y : y + ph, x] = panel[y : y + ph, x + pw - 1] = colour


def _palette() -> np.ndarray:
    return (np.array(colormaps["tab20"].colors) * 255).astype(np.float32)


def _tinted(pixels: np.ndarray, tint: np.ndarray) -> np.ndarray:
    return 0.35 * pixels.astype(np.float32) + 0.65 * tint


def selection_panel(view: SelectionMap) -> np.ndarray:
    """Dominant patches untouched and framed yellow; contextual targets tinted with their
    token's colour and framed white; every other patch (merged or dropped) dimmed, untinted, so
    the image stays readable (tinting all of them covered the whole grid)."""
    height, width = view.pixels.shape[:2]
    palette = _palette()
    tint = palette[np.maximum(view.cluster, 0) % len(palette)]
    tinted = _tinted(view.pixels, _upsample(tint, height, width))
    dimmed = _DIM * view.pixels.astype(np.float32) + (1 - _DIM) * _GREY
    target = _upsample(view.target, height, width)[..., None]
    other = _upsample(~view.dominant & ~view.target, height, width)[..., None]
    panel = np.where(target, tinted, np.where(other, dimmed, view.pixels.astype(np.float32))).round().astype(np.uint8)
    outline(panel, view.dominant, DOMINANT_OUTLINE)
    outline(panel, view.target, TARGET_OUTLINE)
    return panel


_DIM = 0.35  # share of the image kept in a patch that is not selected
_GREY = 160.0  # what the rest fades to


def attention_panel(view: SelectionMap) -> np.ndarray:
    height, width = view.pixels.shape[:2]
    scores = view.attention / max(float(view.attention.max()), 1e-12)
    heat = colormaps["inferno"](_upsample(scores, height, width))[..., :3] * 255
    return (0.4 * view.pixels + 0.6 * heat).round().astype(np.uint8)


@lru_cache(maxsize=None)
def font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """matplotlib's DejaVu Sans (always installed with it); PIL's default font as a fallback."""
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return ImageFont.load_default(size=size)


def _captioned(panel: np.ndarray, caption: str) -> Image.Image:
    height, width = panel.shape[:2]
    canvas = Image.new("RGB", (width, height + TITLE_HEIGHT), "white")
    canvas.paste(Image.fromarray(panel), (0, TITLE_HEIGHT))
    ImageDraw.Draw(canvas).text((6, 7), caption, fill="black", font=font())
    return canvas


def _swatch(kind: str) -> np.ndarray:
    """A legend swatch as the panels draw it: grey "image" under a yellow frame, stripes of
    three contextual tints, or a tinted patch under a white frame; a dark border around it."""
    palette = _palette()
    tile = np.broadcast_to(_SWATCH_BASE, (SWATCH, SWATCH, 3)).astype(np.float32)
    if kind == "tint":
        stripes = np.array_split(np.arange(SWATCH), 3)
        for colour, cols in zip((0, 2, 4), stripes):
            tile[:, cols] = _tinted(_SWATCH_BASE, palette[colour])
    elif kind == "white frame":
        tile[:] = _tinted(_SWATCH_BASE, palette[0])
    tile = tile.round().astype(np.uint8)
    frame = {"yellow frame": DOMINANT_OUTLINE, "white frame": TARGET_OUTLINE}.get(kind)
    if frame is not None:
        tile[:2], tile[-2:], tile[:, :2], tile[:, -2:] = frame, frame, frame, frame
    out = np.empty((SWATCH + 2, SWATCH + 2, 3), dtype=np.uint8)
    out[:] = _SWATCH_BORDER
    out[1:-1, 1:-1] = tile
    return out


def legend_strip(width: int) -> Image.Image:
    """The :data:`LEGEND` entries left to right, wrapping onto more lines when ``width`` is short."""
    face = font()
    items = [(_swatch(kind), label, SWATCH + 2 + 6 + int(np.ceil(face.getlength(label)))) for kind, label in LEGEND]
    lines, line, used = [], [], 0
    for item in items:
        extra = item[2] + (18 if line else 0)
        if line and used + extra > width - 12:
            lines.append(line)
            line, used = [], 0
            extra = item[2]
        line.append(item)
        used += extra
    lines.append(line)
    strip = Image.new("RGB", (width, LEGEND_PAD + LEGEND_LINE * len(lines)), "white")
    draw = ImageDraw.Draw(strip)
    for row, entries in enumerate(lines):
        x, y = 6, LEGEND_PAD + row * LEGEND_LINE
        for swatch, label, span in entries:
            strip.paste(Image.fromarray(swatch), (x, y + 1))
            draw.text((x + SWATCH + 2 + 6, y + 2), label, fill="black", font=face)
            x += span + 18
    return strip


def render(views: list[SelectionMap]) -> Image.Image:
    """The legend strip on top; below it the CLS-attention heatmap, then one selection panel
    per budget, side by side, each under its caption."""
    first = views[0]
    tiles = [_captioned(attention_panel(first), ATTENTION_TITLE)]
    for view in views:
        b = view.budget
        caption = (f"{b.total} = {b.dominant} dominant (yellow) + {b.contextual} contextual"
                   if view.method == "visionzip" else
                   f"{display_name(view.method)} at {b.total}: {int(view.dominant.sum())} patches kept (yellow)")
        tiles.append(_captioned(selection_panel(view), caption))
    width = sum(t.width for t in tiles) + 8 * (len(tiles) - 1)
    legend = legend_strip(width)
    sheet = Image.new("RGB", (width, legend.height + tiles[0].height), "white")
    sheet.paste(legend, (0, 0))
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, legend.height))
        x += tile.width + 8
    sheet.info["legend"] = [f"{kind}: {label}" for kind, label in LEGEND]
    return sheet


def visualize(model, processor, image: Image.Image, budgets, method: str = "visionzip") -> tuple[Image.Image, list[SelectionMap]]:
    views = [selection_map(model, processor, image, budget, method) for budget in budgets]
    return render(views), views
