"""The selection picture explains itself: a legend strip (yellow frame, tint, white frame) drawn
into the image, and captions whose spaces survive rendering ("CLS attention", not "CLSattention").

On a handcrafted SelectionMap: no model needed.
"""

import numpy as np
import pytest

from visionzip_eval.budget import Budget
from visionzip_eval.demos.visualize import (
    DOMINANT_OUTLINE,
    TARGET_OUTLINE,
    SelectionMap,
    attention_panel,
    render,
    selection_panel,
)

PANEL = 336
OLD_CAPTION = 28  # the per-panel caption strip the sheet had before the legend


def _view(budget=64, seed=0):
    rng = np.random.default_rng(seed)
    b = Budget.parse(budget)
    yy, xx = np.mgrid[0:PANEL, 0:PANEL]
    pixels = np.stack([xx * 255 // (PANEL - 1), yy * 255 // (PANEL - 1), np.full_like(xx, 90)], -1).astype(np.uint8)
    rows = cols = 24
    kept = np.zeros(rows * cols, dtype=bool)
    kept[rng.choice(rows * cols, b.dominant - 1, replace=False)] = True
    target = np.zeros(rows * cols, dtype=bool)
    target[rng.choice(np.flatnonzero(~kept), b.contextual, replace=False)] = True
    dominant = kept.reshape(rows, cols)
    return SelectionMap(
        budget=b, pixels=pixels, grid=(rows, cols), dominant=dominant,
        cluster=np.where(dominant, -1, rng.integers(0, b.contextual, (rows, cols))),
        target=target.reshape(rows, cols), attention=rng.random((rows, cols)).astype(np.float32),
    )


def _ink_gaps(strip: np.ndarray) -> list[int]:
    """Widths of the blank column runs between the dark (text) pixels of a caption strip."""
    columns = np.flatnonzero((strip.max(axis=-1) < 128).any(axis=0))
    return [int(b - a - 1) for a, b in zip(columns[:-1], columns[1:]) if b - a > 1]


@pytest.mark.parametrize("budgets", [[64], [192, 64]])
def test_sheet_has_a_legend_strip_above_the_panels(budgets):
    views = [_view(b, seed=i) for i, b in enumerate(budgets)]
    sheet = render(views)
    pixels = np.asarray(sheet)
    height, width = pixels.shape[:2]
    assert width == (1 + len(views)) * PANEL + 8 * len(views)
    assert height > PANEL + OLD_CAPTION  # taller by the legend strip
    # the panels are intact at the bottom: the legend draws over none of them
    assert (pixels[height - PANEL:, :PANEL] == attention_panel(views[0])).all()
    for i, view in enumerate(views):
        x = (i + 1) * (PANEL + 8)
        assert (pixels[height - PANEL:, x:x + PANEL] == selection_panel(view)).all()
    legend = pixels[: height - PANEL - OLD_CAPTION]
    assert legend.shape[0] >= 16
    yellow = (legend == DOMINANT_OUTLINE).all(axis=-1)
    assert yellow.sum() >= 16  # the dominant swatch's frame
    colours = {tuple(c) for c in legend.reshape(-1, 3)}
    tints = {c for c in colours if max(c) - min(c) > 40 and c != DOMINANT_OUTLINE}
    assert len(tints) >= 3  # the merged swatch shows several contextual tints
    # a white frame around a tinted patch (the target swatch), kept visible by a dark border
    white = (legend == TARGET_OUTLINE).all(axis=-1)
    framed = white[:, :-2] & (legend[:, 2:].max(axis=-1) < 200)
    assert framed.any()
    assert (legend.max(axis=-1) < 80).sum() > 100  # label text
    entries = sheet.info["legend"]
    assert len(entries) == 3
    assert "yellow frame" in entries[0] and "dominant" in entries[0] and "kept" in entries[0]
    assert entries[1].startswith("tint") and "merged into" in entries[1] and "contextual token" in entries[1]
    assert "white frame" in entries[2] and "contextual target" in entries[2]


def test_captions_keep_their_spaces():
    sheet = np.asarray(render([_view()]))
    height = sheet.shape[0]
    caption = sheet[height - PANEL - OLD_CAPTION: height - PANEL, :PANEL]  # over the attention panel
    gaps = _ink_gaps(caption)
    # every space between words shows as a visible gap (PIL's default 10 px font draws ~2 px)
    words = "CLS attention at layer -2 (bright = high)".split(" ")
    assert sum(g >= 4 for g in gaps) == len(words) - 1, gaps
    assert gaps[2] >= 4 > max(gaps[:2])  # C|L, L|S tight; "CLS attention" apart

    from visionzip_eval.demos.visualize import ATTENTION_TITLE

    assert ATTENTION_TITLE.split(" ") == words
