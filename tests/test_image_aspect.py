"""``image_aspect`` for LLaVA-1.5: ``pad`` gives the pixels of the original LLaVA's
``process_images`` with ``image_aspect_ratio=pad`` (square on the processor's mean colour, then
the CLIP processor), ``crop`` those of the llava-hf processor alone (resize + centre crop).

Real photos: skimage's (landscape, square) and matplotlib's grace_hopper (portrait); rotated
ones give portraits with an odd padding. The llava-hf processor is the one ``from_pretrained``
loads from a saved checkpoint folder: a ``CLIPImageProcessor`` with the settings of
llava-hf/llava-1.5-7b-hf (336 px, OpenAI CLIP mean, no padding)."""

from types import SimpleNamespace

import matplotlib.cbook
import pytest
import torch
from PIL import Image

from visionzip_eval.backends import backend_for
from visionzip_eval.backends.llava_hf import expand_to_square, mean_colour
from visionzip_eval.engine import Engine, Generation, Request, resolve_image_aspect
from visionzip_eval.media import parse_image_aspect
from visionzip_eval.testing import sample_images

llava_mm_utils = pytest.importorskip("llava.mm_utils", reason="the original llava package (llava-torch) is not installed")
PAD = SimpleNamespace(image_aspect_ratio="pad")  # an original LLaVA-1.5 model config, as process_images reads it


def photos() -> dict[str, Image.Image]:
    images = sample_images()
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        grace = Image.open(handle)
        grace.load()
    images["grace_hopper"] = grace.convert("RGB")  # 512 x 600, portrait
    images["chelsea_portrait"] = images["chelsea"].transpose(Image.Transpose.ROTATE_90)  # 300 x 451: odd padding
    return images


@pytest.fixture(scope="module")
def llava_hf(tmp_path_factory):
    """A tiny llava-hf checkpoint loaded the way real ones are (model + AutoProcessor)."""
    from visionzip_eval.loading import load_pretrained
    from visionzip_eval.backends.llava_hf import save_tiny_llava

    folder = save_tiny_llava(tmp_path_factory.mktemp("llava-hf"), seed=0)
    return load_pretrained(str(folder), torch.float32, torch.device("cpu"), "sdpa")


def tower_input(model, engine, images):
    """The pixel values the tower receives when ``engine`` generates for one request."""
    seen = []
    handle = model.model.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["pixel_values"]).clone()),
        with_kwargs=True,
    )
    try:
        engine.generate([Request(turns=[("What is shown?", None)], images=images)], Generation(max_new_tokens=1))
    finally:
        handle.remove()
    return seen[0]


def official(images, image_processor):
    return llava_mm_utils.process_images(list(images), image_processor, PAD)


def test_the_processor_is_the_llava_hf_one(llava_hf):
    image_processor = llava_hf[1].image_processor
    assert type(image_processor).__name__ == "CLIPImageProcessor" and not getattr(image_processor, "do_pad", False)
    assert image_processor.do_center_crop and image_processor.crop_size == {"height": 336, "width": 336}
    assert mean_colour(image_processor) == (122, 116, 104)  # int(255 * OpenAI CLIP mean)


@pytest.mark.parametrize("name", ["coffee", "chelsea", "rocket", "astronaut", "grace_hopper", "chelsea_portrait"])
def test_pad_gives_the_pixels_of_llava_process_images(llava_hf, name):
    model, processor = llava_hf
    image = photos()[name]
    engine = Engine(model, processor, image_aspect="pad")
    try:
        got = engine.pixel_inputs([image])["pixel_values"]
    finally:
        engine.close()
    want = official([image], processor.image_processor)
    assert got.shape == want.shape == (1, 3, 336, 336)
    assert torch.equal(got, want)
    cropped = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    assert torch.equal(got, cropped) == (image.width == image.height)  # only a square image is left alone


def test_expand_to_square_is_llava_expand2square():
    fill = (122, 116, 104)
    for name, image in photos().items():
        mine, theirs = expand_to_square(image, fill), llava_mm_utils.expand2square(image, fill)
        assert mine.size == theirs.size and mine.tobytes() == theirs.tobytes(), name


def test_pad_reaches_the_tower_in_a_mixed_batch(llava_hf):
    """Through generate (the processor builds the inputs): a batch of two requests holding
    landscape, portrait and square photos feeds the tower exactly process_images' pixels."""
    from visionzip_eval.methods import get_method

    model, processor = llava_hf
    images = photos()
    first = [images["coffee"], images["grace_hopper"]]
    second = [images["astronaut"], images["chelsea_portrait"], images["rocket"]]
    seen = []
    handle = model.model.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["pixel_values"]).clone()), with_kwargs=True
    )
    engine = Engine(model, processor, get_method("visionzip", 64), image_aspect="pad")
    try:
        engine.generate([Request(turns=[("What is shown?", None)], images=first),
                         Request(turns=[("And here?", None)], images=second)], Generation(max_new_tokens=2))
        features, _ = engine.encode(second)  # the multi-turn path: encode alone
    finally:
        engine.close()
        handle.remove()
    assert len(seen) == 2
    assert torch.equal(seen[0], official(first + second, processor.image_processor))
    assert torch.equal(seen[1], official(second, processor.image_processor))
    assert [len(rows) for rows in features["image"].pooler_output] == [64, 64, 64]


def test_default_and_crop_are_the_llava_hf_processor(llava_hf):
    model, processor = llava_hf
    images = [photos()["coffee"], photos()["chelsea"]]
    want = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    for requested in (None, "crop"):
        engine = Engine(model, processor, image_aspect=requested)
        try:
            assert engine.image_aspect == "crop"
            assert torch.equal(engine.pixel_inputs(images)["pixel_values"], want)
        finally:
            engine.close()


def test_a_padding_image_processor(llava_hf):
    """transformers' LlavaImageProcessor with do_pad=True pads by itself: that is its default
    (native pad, same pixels as process_images), and crop turns its padding off."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    model, base = llava_hf
    clip = base.image_processor
    padding = LlavaImageProcessor(size=clip.size, crop_size=clip.crop_size, image_mean=clip.image_mean,
                                  image_std=clip.image_std, resample=clip.resample, do_pad=True)
    processor = LlavaProcessor(image_processor=padding, tokenizer=base.tokenizer, chat_template=base.chat_template,
                               patch_size=base.patch_size, vision_feature_select_strategy=base.vision_feature_select_strategy,
                               num_additional_image_tokens=base.num_additional_image_tokens)
    images = [photos()["rocket"], photos()["grace_hopper"]]
    expected = {None: official(images, clip), "pad": official(images, clip),
                "crop": clip(images, return_tensors="pt")["pixel_values"]}
    for requested, want in expected.items():
        engine = Engine(model, processor, image_aspect=requested)
        try:
            assert engine.image_aspect == (requested or "pad")
            assert torch.equal(engine.pixel_inputs(images)["pixel_values"], want), requested
            # the processor call of generate gets the same switch
            assert torch.equal(tower_input(model, engine, images), want), requested
        finally:
            engine.close()


@pytest.mark.parametrize("value", ["square", "letterbox", 1, "padd"])
def test_bad_values_are_refused_on_one_line(value):
    with pytest.raises(ValueError, match=r"image_aspect must be pad or crop, got .*: pad = square on the processor's mean colour") as error:
        parse_image_aspect(value)
    assert "\n" not in str(error.value)


def test_parsing_accepts_case_and_unset():
    assert parse_image_aspect(" PAD ") == "pad" and parse_image_aspect("crop") == "crop"
    assert parse_image_aspect(None) is None and parse_image_aspect("auto") is None


def test_families_that_shape_their_own_images_refuse_another_aspect():
    from visionzip_eval.backends.llava_next import build_tiny_llava_next

    model, processor = build_tiny_llava_next()
    anyres = backend_for(model)  # AnyRes: shapes its own images
    assert anyres.image_aspects == () and resolve_image_aspect(anyres, processor, None) is None
    with pytest.raises(ValueError, match="image_aspect=pad is for LLaVA-1.5 models; .* shapes its images itself: drop image_aspect"):
        resolve_image_aspect(anyres, processor, "pad")


def test_original_llava_follows_its_config():
    from visionzip_eval.backends.llava_original import build_tiny_llava_original

    model, processor = build_tiny_llava_original()
    assert processor.model_config.image_aspect_ratio == "pad"
    backend = backend_for(model)
    assert resolve_image_aspect(backend, processor, None) == "pad"
    assert resolve_image_aspect(backend, processor, "pad") == "pad"
    with pytest.raises(ValueError, match="image_aspect_ratio=pad says: drop image_aspect or set image_aspect=pad") as error:
        resolve_image_aspect(backend, processor, "crop")
    assert "\n" not in str(error.value)
    # and its own processing is the official one: pad through process_images
    image = photos()["chelsea"]
    got = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    assert torch.equal(got, official([image], processor.clip_image_processor))


# -- the adapter and the sweep ------------------------------------------------------------------
def test_adapter_takes_image_aspect_and_records_it(tmp_path, llava_hf):
    from visionzip_eval.lmms.adapter import ADAPTER_ARGS, VisionZipLMM

    assert "image_aspect" in ADAPTER_ARGS
    lm = VisionZipLMM(model=llava_hf, budget=64, image_aspect="pad", output_dir=str(tmp_path))
    try:
        assert lm.engine.image_aspect == "pad" and lm.efficiency.static["image_aspect"] == "pad"
        image = photos()["coffee"]
        assert torch.equal(lm.engine.pixel_inputs([image])["pixel_values"], official([image], llava_hf[1].image_processor))
    finally:
        lm.engine.close()
    lm = VisionZipLMM(model=llava_hf, budget=64, output_dir=str(tmp_path))
    lm.engine.close()
    assert lm.efficiency.static["image_aspect"] == "crop"  # the llava-hf processor's own


def test_adapter_refuses_a_bad_value_before_loading():
    from visionzip_eval.lmms.adapter import VisionZipLMM

    with pytest.raises(ValueError, match="image_aspect must be pad or crop, got 'square'"):
        VisionZipLMM(pretrained="/nonexistent/checkpoint", image_aspect="square")


def _config(tmp_path, **model):
    import yaml

    from visionzip_eval.sweep import load_config

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "models": [{"name": "tiny", "pretrained": "builtin:tiny-llava", **model}],
        "budgets": ["full", 64], "tasks": ["pope"], "executor": {"accelerate": True},
    }))
    return load_config(path)


def test_sweep_carries_image_aspect_to_every_executor(tmp_path, llava_hf):
    from visionzip_eval.lmms.adapter import VisionZipLMM
    from visionzip_eval.sweep import plan
    from visionzip_eval.sweep.executors import accelerate_command

    config = _config(tmp_path, image_aspect="pad")
    spec = config.models[0]
    assert spec.image_aspect == "pad" and spec.args == {"image_aspect": "pad"}
    command = accelerate_command(config, plan(config)[1], tmp_path / "w")
    assert "image_aspect=pad" in command[command.index("--model_args") + 1].split(",")
    # the in-process runner builds the adapter with the spec's args (sweep.runner.evaluate_in_process)
    lm = VisionZipLMM(model=llava_hf, budget=64, output_dir=str(tmp_path), **spec.args)
    lm.engine.close()
    assert lm.engine.image_aspect == "pad"
    assert _config(tmp_path, args={"image_aspect": "crop"}).models[0].image_aspect == "crop"
    assert _config(tmp_path).models[0].image_aspect is None


def test_sweep_refuses_bad_or_conflicting_values(tmp_path):
    from visionzip_eval.sweep.config import ConfigError

    with pytest.raises(ConfigError, match=r"models.0.image_aspect: .*image_aspect must be pad or crop, got 'square'") as error:
        _config(tmp_path, image_aspect="square")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="image_aspect is pad but args.image_aspect is crop: give it once"):
        _config(tmp_path, image_aspect="pad", args={"image_aspect": "crop"})


def test_paper_configs_pad():
    from pathlib import Path

    from visionzip_eval.sweep import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("llava15_7b_paper.yaml", "llava15_13b.yaml"):
        for model in load_config(configs / name).models:
            assert model.image_aspect == "pad" and model.args["image_aspect"] == "pad", name
