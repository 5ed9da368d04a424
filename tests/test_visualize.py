"""Token-selection pictures: sizes, and highlighted patches exactly the selected ones."""

import numpy as np
import pytest
from PIL import Image

from visionzip_eval import VisionZip
from visionzip_eval.testing import sample_images
from visionzip_eval.demos.visualize import (
    CAPTION_HEIGHT,
    DOMINANT_OUTLINE,
    TARGET_OUTLINE,
    selection_map,
    selection_panel,
    visualize,
)


@pytest.fixture(scope="module")
def views(tiny):
    model, processor = tiny
    sheet, views = visualize(model, processor, sample_images()["astronaut"], [192, 64])
    return sheet, views


def test_sheet_size(views):
    sheet, maps = views
    assert sheet.size == (3 * 336 + 2 * 8, 336 + CAPTION_HEIGHT)
    assert np.asarray(sheet).std() > 10  # not blank


def test_maps_match_the_selection(tiny, views):
    model, processor = tiny
    _, maps = views
    image = sample_images()["astronaut"]
    pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    for view in maps:
        selection = VisionZip(view.budget.dominant, view.budget.contextual).select(model, pixel_values)
        kept = set((selection.dominant_index[0, 1:] - 1).tolist())  # patches, CLS left out
        assert set(np.flatnonzero(view.dominant).tolist()) == kept
        assert int(view.dominant.sum()) == view.budget.dominant - 1
        targets = set((selection.contextual_index[0] - 1).tolist())
        assert set(np.flatnonzero(view.target).tolist()) == targets
        assert set(np.unique(view.cluster[~view.dominant]).tolist()) <= set(range(view.budget.contextual))


def test_highlighted_patches_are_exactly_the_dominant_ones(views):
    _, maps = views
    view = maps[1]  # 64 tokens
    panel = selection_panel(view)
    rows, cols = view.grid
    for r in range(rows):
        for c in range(cols):
            corner = tuple(panel[r * 14, c * 14 + 7])  # the patch's top edge
            if view.dominant[r, c]:
                assert corner == DOMINANT_OUTLINE
            elif view.target[r, c]:
                assert corner == TARGET_OUTLINE
            else:  # merged patches are tinted: interior differs from the original pixels
                inner = panel[r * 14 + 7, c * 14 + 7].astype(int)
                assert corner not in (DOMINANT_OUTLINE, TARGET_OUTLINE)
                assert np.abs(inner - view.pixels[r * 14 + 7, c * 14 + 7].astype(int)).sum() > 0
    # dominant interiors are the untouched image
    r, c = map(int, np.argwhere(view.dominant)[0])
    assert (panel[r * 14 + 3 : r * 14 + 11, c * 14 + 3 : c * 14 + 11] == view.pixels[r * 14 + 3 : r * 14 + 11, c * 14 + 3 : c * 14 + 11]).all()


def test_full_budget_is_refused(tiny):
    with pytest.raises(ValueError, match="pick a reduced budget"):
        selection_map(*tiny, Image.new("RGB", (50, 50)), "full")
