"""VisionZip on the original LLaVA code base (the ``llava`` package, ``llava-torch`` installed with
--no-deps), on a tiny random-weight LlavaLlamaForCausalLM with the real architecture (CLIP
336/14 read at layer -2 without CLS, mlp2x_gelu projector, Llama LLM), saved to a folder and
loaded back offline by llava's own builder, as the paper's Quick Start does."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("llava.model.builder", reason="the llava package (pip install --no-deps llava-torch)")

from llava.conversation import conv_templates  # noqa: E402
from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token  # noqa: E402
from llava.model.builder import load_pretrained_model  # noqa: E402
from transformers import CLIPVisionModel  # noqa: E402

from helpers import generate_requests  # noqa: E402

from visionzip_eval import NoReduction, VisionZip, remove_reduction, visionzip  # noqa: E402
from visionzip_eval.backends import backend_for  # noqa: E402
from visionzip_eval.loading import load_pretrained  # noqa: E402
from visionzip_eval.backends.llava_original import (  # noqa: E402
    IMAGE_TOKEN_INDEX,
    LlavaOriginalBackend,
    LlavaOriginalProcessor,
)
from visionzip_eval.lmms.adapter import SAMPLE_ERROR, VisionZipLMM  # noqa: E402
from visionzip_eval.selection import visionzip_select  # noqa: E402
from visionzip_eval.backends.llava_original import build_tiny_llava_original  # noqa: E402
from visionzip_eval.testing import sample_images  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny original LLaVA: (folder, the in-memory float32 model, its processor)."""
    directory = tmp_path_factory.mktemp("original") / "llava-tiny"
    model, processor = build_tiny_llava_original(directory, seed=0)
    return directory, model, processor


def vicuna_prompt(question: str, images: int = 1) -> str:
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" * images + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def reference_encode(model, tower_dir, pixel_values, dominant, contextual):
    """VisionZip the way the official code reads its signals: an eager tower run with
    output_attentions=True, the full attention map of layer -2, keys from that layer's input."""
    tower = CLIPVisionModel.from_pretrained(tower_dir, attn_implementation="eager").eval()
    out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    layers = getattr(tower, "vision_model", tower).encoder.layers
    index = len(layers) - 2
    layer = layers[index]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[index]))
    b, n, _ = keys.shape
    metric = keys.view(b, n, layer.self_attn.num_heads, -1).mean(2)
    selection = visionzip_select(out.hidden_states[-2], out.attentions[index][:, :, 0], metric, dominant, contextual)
    return model.get_model().mm_projector(selection.tokens)


def test_builder_is_deterministic_and_loads_back_through_llava(checkpoint, tmp_path):
    directory, model, processor = checkpoint
    again, _ = build_tiny_llava_original(tmp_path / "llava-tiny", seed=0)
    other, _ = build_tiny_llava_original(tmp_path / "llava-other", seed=1)
    state, same, different = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert not all(torch.equal(state[k], different[k]) for k in state)
    loaded, loaded_processor = load_pretrained(str(directory), torch.float32, torch.device("cpu"), None)
    assert isinstance(loaded_processor, LlavaOriginalProcessor)
    assert isinstance(backend_for(loaded), LlavaOriginalBackend)
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)  # no float16 round trip


def test_paper_quick_start_sends_64_rows_per_image(checkpoint):
    """load_pretrained_model -> visionzip(model, 54, 10) -> the usual LLaVA generation: the LLM
    receives exactly 64 visual rows per image, equal to VisionZip(54, 10).encode_images."""
    directory = str(checkpoint[0])
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        directory, None, get_model_name_from_path(directory)
    )
    model = visionzip(model, dominant=54, contextual=10)
    image = sample_images()["astronaut"]
    input_ids = tokenizer_image_token(vicuna_prompt("What is shown?"), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    input_ids = input_ids.unsqueeze(0).to(model.device)
    image_tensor = process_images([image], image_processor, model.config).to(model.device, dtype=torch.float16)

    seen = []
    hook = model.get_model().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("inputs_embeds")), with_kwargs=True
    )
    try:
        output_ids = model.generate(input_ids, images=image_tensor, image_sizes=[image.size], do_sample=False,
                                    max_new_tokens=3, use_cache=True)
    finally:
        hook.remove()
        remove_reduction(model)
    assert output_ids.shape == (1, 3)
    prefill = seen[0]
    position = int((input_ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    assert prefill.shape[1] == input_ids.shape[1] - 1 + 64
    with torch.no_grad():
        expected = VisionZip(54, 10).encode_images(model, image_tensor)
    assert expected.shape == (1, 64, model.config.hidden_size)
    assert torch.equal(prefill[0, position : position + 64], expected[0])
    text = model.get_model().embed_tokens(input_ids[0, position + 1 :])
    assert torch.equal(prefill[0, position + 64 :], text)


@pytest.mark.parametrize("dominant, contextual", [(54, 10), (108, 20), (5, 2)])
def test_encode_equals_the_eager_reference(checkpoint, dominant, contextual):
    directory, model, processor = checkpoint
    images = list(sample_images().values())[:3]
    pixel_values = processor.image_processor(images)["pixel_values"]
    with torch.no_grad():
        want = reference_encode(model, directory / "vision_tower", pixel_values, dominant, contextual)
        got = VisionZip(dominant, contextual).encode_images(model, pixel_values)
    assert got.shape == (3, dominant + contextual, model.config.hidden_size)
    assert (got - want).abs().max() < 1e-4


def test_full_path_equals_llava_encode_images(checkpoint):
    _, model, processor = checkpoint
    pixel_values = processor.image_processor(list(sample_images().values())[:2])["pixel_values"]
    with torch.no_grad():
        ours = NoReduction().encode_images(model, pixel_values)
        vanilla = model.encode_images(pixel_values)
    assert ours.shape == (2, 576, model.config.hidden_size)
    assert torch.equal(ours, vanilla)


def test_tower_stops_after_the_feature_layer(checkpoint):
    _, model, processor = checkpoint
    layers = backend_for(model).layers
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            VisionZip(54, 10).encode_images(model, processor.image_processor([sample_images()["coffee"]])["pixel_values"])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == list(range(len(layers) - 1))


def make_lm(checkpoint, tmp_path, **kwargs):
    _, model, processor = checkpoint
    lm = VisionZipLMM(model=(model, processor), output_dir=str(tmp_path), warmup=1, **kwargs)
    images = sample_images()
    docs = [{"image": images["astronaut"]}, {"image": b"not an image"}, {"image": images["coffee"]},
            {"image": [images["rocket"], images["chelsea"]]}]
    lm.task_dict = {"demo": {"test": docs}}
    return lm


@pytest.mark.parametrize("budget, per_image", [("64", 64), ("full", 576)])
def test_lmms_eval_adapter_smoke(checkpoint, tmp_path, budget, per_image):
    lm = make_lm(checkpoint, tmp_path, budget=budget, batch_size=2)
    try:
        results = lm.generate_until(generate_requests([0, 1, 2, 3]))
    finally:
        lm.clean()
        lm.engine.close()
    assert [r.text == SAMPLE_ERROR for r in results] == [False, True, False, False]
    rows = {r["doc_id"]: r for r in map(json.loads, (tmp_path / "efficiency.jsonl").read_text().splitlines())}
    assert rows[1]["error"].startswith("broken image")
    tokenizer = checkpoint[2].tokenizer
    for doc, images in ((0, 1), (2, 1), (3, 2)):
        row = rows[doc]
        assert row["error"] is None and row["tokens_per_image"] == per_image
        assert row["visual_tokens"] == images * per_image
        text_tokens = len(tokenizer_image_token(vicuna_prompt("What is shown?", images), tokenizer))
        assert row["prompt_tokens"] == text_tokens - images + images * per_image
        assert row["vision_units"] == images and row["vision_flops"] > 0 and row["prefill_flops"] > 0
        assert row["vision_ms"] > 0 and row["prefill_ms"] > 0 and row["vision_ms"] + row["prefill_ms"] <= row["ttft_ms"] + 1e-6
        assert 1 <= row["generated_tokens"] <= 4
    for result, doc in zip(results, (0, 1, 2, 3)):
        if doc != 1:
            assert result.token_counts.input_tokens == rows[doc]["prompt_tokens"]
    assert "encode_images" not in checkpoint[1].__dict__  # engine.close() removed the reduction


def test_batched_answers_equal_single_answers(checkpoint, tmp_path):
    """Left padding through llava's splicing: a batch answers as its requests alone do."""
    from visionzip_eval.engine import Generation, Request

    lm = make_lm(checkpoint, tmp_path, budget=64)
    try:
        photos = sample_images()
        batch = [Request(turns=[("What is shown?", None)], images=[photos["astronaut"]]),
                 Request(turns=[("Describe the two pictures in detail.", None)], images=[photos["rocket"], photos["coffee"]])]
        settings = Generation(max_new_tokens=5)
        together = [o.text for o in lm.engine.generate(batch, settings)]
        alone = [lm.engine.generate([r], settings)[0].text for r in batch]
    finally:
        lm.engine.close()
    assert together == alone


def test_import_and_a_clear_error_without_llava(checkpoint):
    """Without the llava package visionzip_eval imports, the backend is absent, and loading an
    original-LLaVA checkpoint names the pip command."""
    code = (
        "import sys; sys.modules['llava'] = None\n"
        "import torch, visionzip_eval\n"
        "from visionzip_eval.loading import load_pretrained\n"
        "try:\n"
        f"    load_pretrained({str(checkpoint[0])!r}, torch.float32, torch.device('cpu'))\n"
        "except ImportError as error:\n"
        "    print('ERROR', error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERROR" in out.stdout and "pip install --no-deps llava-torch==1.2.2.post1" in out.stdout


def test_builtin_tiny_original_llava():
    model, processor = load_pretrained("builtin:tiny-llava-original", torch.float32, torch.device("cpu"))
    assert isinstance(backend_for(model), LlavaOriginalBackend) and isinstance(processor, LlavaOriginalProcessor)
    assert backend_for(model).full_tokens == 576 and backend_for(model).tower_tokens == 577
