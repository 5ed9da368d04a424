"""Demo-Chat's logic (visionzip_eval.demos.chat): the chosen tokens, starting from a method, the patch
grid, and conversations that encode the image once."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from visionzip_eval.apply import applied_reducer, tokens_per_image
from visionzip_eval.backends import backend_for
from visionzip_eval.demos.chat import (
    SCALE,
    ChosenTokens,
    Conversation,
    answer,
    base_unit,
    grid_picture,
    method_start,
    patch_at,
    patches_between,
    unit_pixels,
)
from visionzip_eval.engine import Engine
from visionzip_eval.methods import get_method
from visionzip_eval.methods.base import NoReduction
from visionzip_eval.methods.visionzip import VisionZip
from visionzip_eval.demos.visualize import DOMINANT_OUTLINE

SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def trained():
    from visionzip_eval.synth.benchmark import build_docs
    from visionzip_eval.synth.scenes import render
    from visionzip_eval.synth.weights import load_trained as load_tiny_llava_synth

    model, processor = load_tiny_llava_synth()
    _, scenes = build_docs("pope", n_scenes=2)
    engine = Engine(model, processor)
    try:
        yield model, processor, engine, render(scenes[0])[0]
    finally:
        engine.close()


@pytest.fixture
def tower_calls(trained):
    model = trained[0]
    calls = []
    hook = model.model.vision_tower.register_forward_pre_hook(lambda *_: calls.append(1))
    yield calls
    hook.remove()


def test_chosen_tokens_pass_exactly_the_chosen_rows_in_positional_order(tiny, pixel_values):
    model, _ = tiny
    backend = backend_for(model)
    hidden = backend.capture(pixel_values, attention=False).hidden
    with_cls = ChosenTokens(patches=(100, 5, 2, 5), cls=True)
    assert with_cls.patches == (2, 5, 100) and with_cls.tokens_per_image(backend) == 4
    selection = with_cls.select(model, pixel_values)
    assert torch.equal(selection.tokens, hidden[:, [0, 3, 6, 101]])
    assert selection.dominant_index.tolist() == [[0, 3, 6, 101]] * len(pixel_values)
    assert (selection.slot >= 0).sum().item() == 4 * len(pixel_values)
    without = ChosenTokens(patches=(2, 5, 100)).select(model, pixel_values)
    assert torch.equal(without.tokens, hidden[:, [3, 6, 101]])
    projected = ChosenTokens(patches=(2, 5, 100), cls=True).encode_images(model, pixel_values)
    assert torch.equal(projected, backend.project(hidden[:, [0, 3, 6, 101]]))


def test_contextual_merge_is_visionzips_own(tiny, pixel_values):
    """Chosen = VisionZip's dominant patches + CLS, merging the rest into its contextual count:
    the very rows VisionZip sends (same merge code); with the contextual tokens the rest of the
    patches land in them, CLS is never merged."""
    model, _ = tiny
    reference = VisionZip(12, 4).select(model, pixel_values[:1])
    index = reference.dominant_index[0]
    chosen = ChosenTokens(patches=tuple((index[1:] - 1).tolist()), cls=True, contextual=4)
    ours = chosen.select(model, pixel_values[:1])
    assert torch.equal(ours.tokens, reference.tokens) and torch.equal(ours.slot, reference.slot)
    one = pixel_values[:1]
    assert torch.equal(chosen.encode_images(model, one), VisionZip(12, 4).encode_images(model, one))
    no_cls = ChosenTokens(patches=(0, 1, 2), contextual=3).select(model, pixel_values[:1])
    assert no_cls.tokens.shape[1] == 6 and no_cls.slot[0, 0] == -1 and (no_cls.slot[0, 1:] >= 0).all()
    assert sorted(set(no_cls.slot[0, 4:].tolist())) == [3, 4, 5]  # every unchosen patch is merged


def test_method_start_takes_any_pre_llm_methods_selection(trained):
    model, _, engine, image = trained
    unit = base_unit(engine, image)
    start = method_start(engine, image, "visionzip", 64)
    assert (len(start.patches), start.cls, start.contextual) == (53, True, 10)
    assert torch.equal(start.encode_images(model, unit), VisionZip(54, 10).encode_images(model, unit))
    for name in ("fastervlm", "random", "divprune"):  # random: a fresh seed-0 draw each time
        start = method_start(engine, image, name, "32")
        assert (len(start.patches), start.cls, start.contextual) == (32, False, 0)
        assert list(start.patches) == (get_method(name, 32).select(model, unit).dominant_index[0] - 1).tolist()
    with pytest.raises(ValueError, match="pool keeps no individual patches"):
        method_start(engine, image, "pool", 64)
    with pytest.raises(ValueError, match="fastv prunes inside the LLM"):
        method_start(engine, image, "fastv", 64)
    with pytest.raises(ValueError, match="press 'all'"):
        method_start(engine, image, "visionzip", "full")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        method_start(engine, image, "nope", 64)


def test_bad_selections_are_refused_on_one_line():
    backend = SimpleNamespace(patch_grid=(24, 24), cls_token=False, name="siglip tower")
    with pytest.raises(ValueError, match="no patches chosen"):
        ChosenTokens(patches=())
    with pytest.raises(ValueError, match="whole number"):
        ChosenTokens(patches=(1,), contextual=-1)
    with pytest.raises(ValueError, match="patch 576 is outside the 24x24 grid"):
        ChosenTokens(patches=(1, 576)).check(backend)
    with pytest.raises(ValueError, match="has no CLS token: untick CLS"):
        ChosenTokens(patches=(1,), cls=True).check(backend)
    with pytest.raises(ValueError, match="3 contextual tokens cannot be merged from the 2 unchosen"):
        ChosenTokens(patches=tuple(range(574)), contextual=3).check(backend)


def test_three_turns_run_the_tower_once_and_each_answer_equals_a_fresh_one(trained, tower_calls):
    model, processor, engine, image = trained
    chosen = ChosenTokens(patches=tuple(range(0, 576, 41)), cls=True, contextual=3)  # 15 + CLS + 3
    conversation = Conversation(image, chosen)
    questions = ["Is there a red circle in the image?", "How many shapes are in the image?",
                 "Is there a green square in the image?"]
    turns = [conversation.ask(engine, q + SUFFIX) for q in questions]
    assert len(tower_calls) == 1  # encoded once, reused by turns 2 and 3
    assert [t.encoded for t in turns] == [True, False, False]
    assert [t.visual_tokens for t in turns] == [19] * 3 and all(t.prefill_ms > 0 for t in turns)
    history = []
    for question, turn in zip(questions, turns):
        assert turn.answer == answer(model, processor, image, chosen, question + SUFFIX, history)
        history.append((question + SUFFIX, turn.answer))
    assert len(tower_calls) == 4  # the fresh answers run the tower every time
    assert conversation.history == history
    with pytest.raises(ValueError, match="ask a question"):
        conversation.ask(engine, "  ")
    assert conversation.matches(image.copy(), ChosenTokens(patches=tuple(range(0, 576, 41)), cls=True, contextual=3))
    assert not conversation.matches(image, ChosenTokens(patches=(1,)))


def test_ten_patches_miss_what_every_token_sees(trained):
    """The tiny model finds the red circle with every token and with VisionZip's 64, not
    through ten patches that do not cover it; the plain API leaves the model and processor as
    they were."""
    model, processor, _, image = trained
    question = "Is there a red circle in the image?" + SUFFIX
    ten = ChosenTokens(patches=(51, 87, 130, 212, 247, 300, 365, 450, 482, 550), cls=True)
    before = applied_reducer(model)
    answers = [answer(model, processor, image, r, question) for r in (NoReduction(), VisionZip(54, 10), ten)]
    assert answers == ["yes", "yes", "no"]
    assert applied_reducer(model) is before
    ids = processor(images=[image], text="USER: <image>\nx ASSISTANT:", return_tensors="pt")["input_ids"]
    assert (ids == model.config.image_token_id).sum() == tokens_per_image(model)  # what is applied now


def test_anyres_keeps_the_chosen_patches_in_every_crop():
    from visionzip_eval.engine import Generation, Request
    from visionzip_eval.backends.llava_next import build_tiny_llava_next
    from visionzip_eval.testing import sample_images

    model, processor = build_tiny_llava_next(seed=0)
    engine = Engine(model, processor)
    try:
        image = next(iter(sample_images().values()))
        units = engine.backend.image_units([image.size[::-1]])[0]
        assert units > 1
        assert base_unit(engine, image).shape == (1, 3, 336, 336)
        chosen = ChosenTokens(patches=(3, 40, 41), cls=True)
        engine.set_reducer(chosen)
        features, _ = engine.encode([image])
        assert [len(rows) for rows in features["image"].pooler_output] == [units * 4]
        output = engine.generate([Request(turns=[("what?", None)], images=[image])], Generation(max_new_tokens=2),
                                 image_features=features)[0]
        assert output.metrics["visual_tokens"] == units * 4
    finally:
        engine.close()


def test_grid_picture_frames_the_chosen_patches_and_dims_the_rest():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)  # a 4 x 4 grid of 12 px patches
    picture = grid_picture(pixels, (4, 4), [5], scale=2)
    assert picture.shape == (96, 96, 3)
    inside = slice(24 + 2, 48 - 2)  # patch 5 = row 1, col 1, inside its frame
    assert np.array_equal(picture[inside, inside], pixels.repeat(2, 0).repeat(2, 1)[inside, inside])
    assert tuple(picture[24, 30]) == DOMINANT_OUTLINE and tuple(picture[47, 30]) == DOMINANT_OUTLINE
    other = slice(48 + 2, 72 - 2)  # patch 10, not chosen: dimmed
    dimmed = (pixels.repeat(2, 0).repeat(2, 1)[other, other] * 0.3).round()
    assert np.array_equal(picture[other, other], dimmed.astype(np.uint8))


def test_clicks_map_to_patches_and_rectangles_cover_their_corners():
    size = (24 * 14 * SCALE, 24 * 14 * SCALE)
    assert patch_at(0, 0, (24, 24), size) == 0
    assert patch_at(size[0] - 1, size[1] - 1, (24, 24), size) == 575
    assert patch_at(28 * 3 + 27, 28 * 2, (24, 24), size) == 2 * 24 + 3
    assert patch_at(-5, 10_000, (24, 24), size) == 23 * 24  # clamped onto the grid
    assert patches_between(2 * 24 + 5, 0, (24, 24)) == [*range(6), *range(24, 30), *range(48, 54)]
    assert patches_between(30, 30, (24, 24)) == [30]


def test_unit_pixels_are_what_the_tower_sees(trained):
    _, _, engine, image = trained
    pixels = unit_pixels(engine, image)
    assert pixels.shape == (336, 336, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - np.asarray(image.resize((336, 336))).astype(int)).mean() < 3


def test_the_plain_api_leaves_a_bare_model_bare(tiny):
    from visionzip_eval.testing import sample_images

    model, processor = tiny
    image = next(iter(sample_images().values()))
    text = answer(model, processor, image, ChosenTokens(patches=(1, 2, 3)), "what is it?", max_new_tokens=3)
    assert isinstance(text, str) and applied_reducer(model) is None
    ids = processor(images=[image], text="USER: <image>\nx ASSISTANT:", return_tensors="pt")["input_ids"]
    assert (ids == model.config.image_token_id).sum() == 576  # the processor expands to 576 again
