"""The app's plain helpers (visionzip_eval.demos.app) and its page being built; the page itself is
driven in a real browser by test_app_browser.py."""

from __future__ import annotations

import numpy as np
import pytest

from visionzip_eval.demos.app import open_image, parse_indices, redundancy_view


@pytest.fixture(scope="module")
def trained():
    from visionzip_eval.engine import Engine
    from visionzip_eval.synth.benchmark import build_docs
    from visionzip_eval.synth.scenes import render
    from visionzip_eval.synth.weights import load_trained as load_tiny_llava_synth

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
    from visionzip_eval.demos.app import build_app

    model, processor, _, image = trained
    page = build_app(model, processor, examples=[image])
    assert isinstance(page, gradio.Blocks)
    ids = {block.elem_id for block in page.blocks.values() if getattr(block, "elem_id", None)}
    assert {"image", "grid", "visionzip", "all", "none", "invert", "cls", "contextual", "send", "answer",
            "received", "redundancy"} <= ids


# -- the page's handlers, without a browser -------------------------------------------------


@pytest.fixture(scope="module")
def handlers(trained, tmp_path_factory):
    from visionzip_eval.demos.app import Handlers

    path = tmp_path_factory.mktemp("app") / "scene.png"
    trained[3].save(path)
    return Handlers(trained[2]), str(path)


def centre(handlers, pixels, patch):
    """The picture pixel (x, y) at the centre of ``patch`` (what a click there sends)."""
    from visionzip_eval.demos.chat import SCALE

    rows, cols = handlers.grid
    height, width = pixels.shape[0] * SCALE, pixels.shape[1] * SCALE
    row, col = divmod(patch, cols)
    return int((col + 0.5) * width / cols), int((row + 0.5) * height / rows)


def test_a_new_image_starts_from_visionzip_and_fresh_chats(handlers):
    h, path = handlers
    empty = h.on_image(None, "64")
    assert empty[0] is None and empty[2] == [] and empty[3].startswith("**0 of 576 patches chosen**")
    pixels, picture, chosen, text, listed, cls, contextual, chats, *rest = h.on_image(path, "64")
    assert pixels.ndim == 3 and picture is not None
    assert cls is True and contextual == 10 and len(chosen) + 1 + contextual == 64
    assert text == f"**{len(chosen)} of 576 patches chosen** + CLS + 10 contextual → 64 visual tokens"
    assert listed == ", ".join(map(str, chosen)) and chats == {} and rest == [[], [], "", "", ""]
    fastv_less = h.on_start(path, "random", "32", pixels)
    assert len(fastv_less[1]) == 32 and fastv_less[4:] == (False, 0)


def test_clicks_toggle_a_patch_or_a_rectangle(handlers):
    h, path = handlers
    pixels = h.on_image(path, "64")[0]
    _, chosen, _, _, corner = h.on_click(pixels, [], "toggle a patch", None, False, 0, centre(h, pixels, 25))
    assert chosen == [25] and corner is None
    assert h.on_click(pixels, [25], "toggle a patch", None, False, 0, centre(h, pixels, 25))[1] == []
    rectangle = "rectangle: click two corners"
    _, chosen, text, _, corner = h.on_click(pixels, [], rectangle, None, False, 0, centre(h, pixels, 25))
    assert chosen == [] and corner == 25 and text.endswith("corner at patch 25: click the opposite corner")
    _, chosen, _, _, corner = h.on_click(pixels, [], rectangle, 25, False, 0, centre(h, pixels, 2 * 24 + 3))
    assert chosen == [25, 26, 27, 49, 50, 51] and corner is None  # rows 1-2, columns 1-3
    # a rectangle starting on a chosen patch takes its patches away
    assert h.on_click(pixels, chosen + [0], rectangle, 25, False, 0, centre(h, pixels, 50))[1] == [0, 27, 51]
    with pytest.raises(ValueError, match="choose an image first"):
        h.on_click(None, [], "toggle a patch", None, False, 0, (0, 0))


def test_all_none_invert_and_typed_indices(handlers):
    h, _ = handlers
    assert h.on_set("all", None, [3], False, 0)[1] == list(range(576))
    assert h.on_set("none", None, [3], False, 0)[1] == []
    assert h.on_set("invert", None, list(range(1, 576)), True, 2)[1:3] == (
        [0], "**1 of 576 patches chosen** + CLS + 2 contextual → 4 visual tokens")
    assert h.on_typed("5, 1-2", None, False, 0)[1] == [1, 2, 5]
    with pytest.raises(ValueError, match="outside 0..575"):
        h.on_typed("576", None, False, 0)


def test_send_answers_and_reuses_the_tokens_on_the_next_turn(handlers):
    h, path = handlers
    chosen = list(range(40))
    answer, full, received, chat_chosen, chat_full, chats = h.on_send(path, "What is shown?", chosen, True, 0, True, {})
    assert answer == chats["chosen"].history[-1][1] and full == chats["full"].history[-1][1]
    lines = received.split("\n\n")
    assert lines[0].startswith("**chosen tokens**: 41 visual tokens reached the LLM") and "turn 1: tower ran" in lines[0]
    assert lines[1].startswith("**all tokens**: 576 visual tokens reached the LLM")
    assert [m["role"] for m in chat_chosen] == ["user", "assistant"] and len(chat_full) == 2
    again = h.on_send(path, "And the colour?", chosen, True, 0, False, chats)
    assert again[1] == "" and "full" not in again[5] and again[4] == []
    assert "turn 2: reused from turn 1 (tower not run)" in again[2]
    changed = h.on_send(path, "And now?", chosen[:10], True, 0, False, again[5])
    assert "turn 1: tower ran" in changed[2] and "(image or selection changed: new conversation)" in changed[2]
    with pytest.raises(ValueError, match="ask a question about the image"):
        h.on_send(path, "  ", chosen, True, 0, False, {})


def test_header_says_the_default_is_the_tiny_synthetic_model(trained):
    """It answered "no" to "Is there a person?" on the astronaut photo, and the page never said why."""
    pytest.importorskip("gradio")
    from visionzip_eval.demos.app import build_app

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
    from visionzip_eval.demos.app import build_app

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
