"""The app's plain helpers (visionzip_eval.app) and its page being built; the page itself is
driven in a real browser by test_app_browser.py."""

from __future__ import annotations

import numpy as np
import pytest

from visionzip_eval.app import open_image, parse_indices, redundancy_view


@pytest.fixture(scope="module")
def trained():
    from visionzip_eval.engine import Engine
    from visionzip_eval.synth.benchmark import build_docs
    from visionzip_eval.synth.scenes import render
    from visionzip_eval.testing import load_tiny_llava_synth

    model, processor = load_tiny_llava_synth()
    _, scenes = build_docs("pope", n_scenes=2)
    return model, processor, Engine(model, processor), render(scenes[0])[0]


def test_images_are_opened_or_refused_on_one_line(tmp_path):
    good = tmp_path / "good.png"
    from PIL import Image

    Image.new("RGBA", (20, 10), (255, 0, 0, 128)).save(good)
    image = open_image(str(good))
    assert image.mode == "RGB" and image.size == (20, 10)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    with pytest.raises(ValueError, match=r"^cannot read broken.png as an image: ") as error:
        open_image(str(broken))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="choose an image first"):
        open_image(None)


def test_typed_patch_indices():
    assert parse_indices("3, 17 40-42,3", 576) == [3, 17, 40, 41, 42]
    assert parse_indices("  ", 576) == []
    with pytest.raises(ValueError, match="outside 0..575"):
        parse_indices("570-576", 576)
    with pytest.raises(ValueError, match="cannot read patch 'x'"):
        parse_indices("1, x", 576)


def test_redundancy_view_of_a_scene(trained):
    _, _, engine, image = trained
    picture, summary = redundancy_view(engine, image)
    assert picture.width > 600 and picture.height > 400
    assert np.asarray(picture).std() > 10  # drawn, not blank
    assert summary.startswith("At the feature layer (layer ") and "top 54 of 576 patches hold" in summary


def test_the_page_builds_with_the_default_model(trained):
    gradio = pytest.importorskip("gradio")
    from visionzip_eval.app import build_app

    model, processor, _, image = trained
    page = build_app(model, processor, examples=[image])
    assert isinstance(page, gradio.Blocks)
    ids = {block.elem_id for block in page.blocks.values() if getattr(block, "elem_id", None)}
    assert {"image", "grid", "visionzip", "all", "none", "invert", "cls", "contextual", "send", "answer",
            "received", "redundancy"} <= ids


def test_header_says_the_default_is_the_tiny_synthetic_model(trained):
    """It answered "no" to "Is there a person?" on the astronaut photo, and the page never said why."""
    pytest.importorskip("gradio")
    from visionzip_eval.app import build_app

    model, processor, _, image = trained
    page = build_app(model, processor, examples=[image], model_name="builtin:tiny-llava-synth")
    header = next(block.value for block in page.blocks.values() if type(block).__name__ == "Markdown")
    assert "builtin:tiny-llava-synth" in header and "trained only on the synthetic scenes" in header
    assert "knows nothing of real photos" in header and "--model" in header
    other = build_app(model, processor, model_name="some/folder")
    header = next(block.value for block in other.blocks.values() if type(block).__name__ == "Markdown")
    assert "some/folder" in header and "synthetic" not in header


def test_sending_with_no_patches_keeps_the_previous_answer(trained, tmp_path):
    gradio = pytest.importorskip("gradio")
    from visionzip_eval.app import build_app

    model, processor, _, image = trained
    path = tmp_path / "scene.png"
    image.save(path)
    page = build_app(model, processor)
    send = next(f.fn for f in page.fns.values() if getattr(f.fn, "__name__", "") == "on_send")
    answered = send(str(path), "Is there a red circle?", [0, 1, 2], False, 0, False, {})
    assert isinstance(answered[0], str) and answered[0]
    with pytest.warns(UserWarning, match="no patches chosen"):
        kept = send(str(path), "Is there a red circle?", [], False, 0, False, answered[-1])
    assert len(kept) == 6 and all(update == gradio.skip() for update in kept)  # every output left as it was
