"""Which tokens survive: the image's patch grid, dominant patches kept as they are, every
other patch tinted with the colour of the contextual token it was merged into (targets
outlined in white), and the CLS-attention heatmap VisionZip ranks by.

Panels are drawn pixel-exact with numpy (one panel pixel per processed-image pixel), so a
patch's colour can be checked in tests; matplotlib supplies only the colour maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

from visionzip_eval.backends import backend_for
from visionzip_eval.budget import Budget
from visionzip_eval.methods.visionzip import VisionZip

DOMINANT_OUTLINE = (255, 221, 0)  # yellow frame around kept patches
TARGET_OUTLINE = (255, 255, 255)  # white frame around contextual targets
CAPTION_HEIGHT = 28


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


def _processed_pixels(processor, pixel_values: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    image = (pixel_values[0].float().cpu() * std + mean).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def selection_map(model, processor, image: Image.Image, budget: Budget | int | str) -> SelectionMap:
    budget = Budget.parse(budget)
    if budget.is_full:
        raise ValueError("budget 'full' selects everything: pick a reduced budget to visualise")
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
        pixels=_processed_pixels(processor, pixel_values),
        grid=(rows, cols),
        dominant=slot < budget.dominant,
        cluster=np.where(slot < budget.dominant, -1, slot - budget.dominant),
        target=target.reshape(rows, cols),
        attention=signals.cls_attention[0].sum(0)[offset:].cpu().numpy().reshape(rows, cols),
    )


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    rows, cols = grid.shape[:2]
    return grid.repeat(height // rows, axis=0).repeat(width // cols, axis=1)


def _outline(panel: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    height, width = panel.shape[:2]
    ph, pw = height // mask.shape[0], width // mask.shape[1]
    for r, c in zip(*np.nonzero(mask)):
        y, x = r * ph, c * pw
        panel[y, x : x + pw] = panel[y + ph - 1, x : x + pw] = colour
        panel[y : y + ph, x] = panel[y : y + ph, x + pw - 1] = colour


def selection_panel(view: SelectionMap) -> np.ndarray:
    """Dominant patches untouched and framed yellow; merged patches dimmed and tinted with
    their contextual token's colour; targets framed white."""
    height, width = view.pixels.shape[:2]
    palette = (np.array(colormaps["tab20"].colors) * 255).astype(np.float32)
    tint = palette[np.maximum(view.cluster, 0) % len(palette)]
    tinted = 0.35 * view.pixels.astype(np.float32) + 0.65 * _upsample(tint, height, width)
    merged = _upsample(~view.dominant, height, width)[..., None]
    panel = np.where(merged, tinted, view.pixels.astype(np.float32)).round().astype(np.uint8)
    _outline(panel, view.dominant, DOMINANT_OUTLINE)
    _outline(panel, view.target, TARGET_OUTLINE)
    return panel


def attention_panel(view: SelectionMap) -> np.ndarray:
    height, width = view.pixels.shape[:2]
    scores = view.attention / max(float(view.attention.max()), 1e-12)
    heat = colormaps["inferno"](_upsample(scores, height, width))[..., :3] * 255
    return (0.4 * view.pixels + 0.6 * heat).round().astype(np.uint8)


def _captioned(panel: np.ndarray, caption: str) -> Image.Image:
    height, width = panel.shape[:2]
    canvas = Image.new("RGB", (width, height + CAPTION_HEIGHT), "white")
    canvas.paste(Image.fromarray(panel), (0, CAPTION_HEIGHT))
    ImageDraw.Draw(canvas).text((6, 8), caption, fill="black")
    return canvas


def render(views: list[SelectionMap]) -> Image.Image:
    """CLS-attention heatmap, then one selection panel per budget, side by side."""
    first = views[0]
    tiles = [_captioned(attention_panel(first), "CLS attention at layer -2 (bright = high)")]
    for view in views:
        b = view.budget
        tiles.append(
            _captioned(
                selection_panel(view),
                f"{b.total} = {b.dominant} dominant (yellow) + {b.contextual} contextual",
            )
        )
    width = sum(t.width for t in tiles) + 8 * (len(tiles) - 1)
    sheet = Image.new("RGB", (width, tiles[0].height), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + 8
    return sheet


def visualize(model, processor, image: Image.Image, budgets) -> tuple[Image.Image, list[SelectionMap]]:
    views = [selection_map(model, processor, image, budget) for budget in budgets]
    return render(views), views
