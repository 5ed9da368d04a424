"""VisionZip on a tiny LLaVA with the real architecture (CLIP 336/14 -> 577 tokens, Llama LLM)."""

import pytest
import torch

from visionzip_eval import (
    NoReduction,
    VisionZip,
    remove_reduction,
    tokens_per_image,
    visionzip,
    visionzip_processor,
)
from visionzip_eval.backends import backend_for
from visionzip_eval.selection import visionzip_select
from visionzip_eval.backends.llava_hf import build_tiny_llava
from visionzip_eval.testing import sample_images
from helpers import hooks, llm_input_embeddings

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def reference_encode(model, pixel_values, dominant, contextual):
    """VisionZip the way the official code reads its signals: an eager tower run with
    output_attentions=True on every layer, the full attention map of layer -2, and keys
    recomputed from that layer's input."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    layer_index = len(tower.encoder.layers) - 2
    layer = tower.encoder.layers[layer_index]
    attn_map = out.attentions[layer_index]  # (B, H, N, N)
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[layer_index]))
    b, n, d = keys.shape
    metric = keys.view(b, n, layer.self_attn.num_heads, -1).mean(2)
    hidden = out.hidden_states[-2]
    tokens = visionzip_select(hidden, attn_map[:, :, 0], metric, dominant, contextual).tokens
    return model.model.multi_modal_projector(tokens)


@pytest.mark.parametrize("dominant, contextual", [(54, 10), (108, 20), (162, 30), (5, 2)])
def test_encode_sdpa_and_eager_equal_reference(tiny, tiny_eager, pixel_values, dominant, contextual):
    vz = VisionZip(dominant, contextual)
    with torch.no_grad():
        want = reference_encode(tiny_eager[0], pixel_values, dominant, contextual)
        before = hooks(tiny[0]), hooks(tiny_eager[0])
        sdpa = vz.encode_images(tiny[0], pixel_values)
        eager = vz.encode_images(tiny_eager[0], pixel_values)
    assert sdpa.shape == (3, dominant + contextual, tiny[0].config.text_config.hidden_size)
    assert (sdpa - want).abs().max() < 1e-4
    assert (eager - want).abs().max() < 1e-4
    assert (hooks(tiny[0]), hooks(tiny_eager[0])) == before


def test_full_path_equals_vanilla_image_features(tiny, pixel_values):
    model = tiny[0]
    with torch.no_grad():
        ours = NoReduction().encode_images(model, pixel_values)
        vanilla = torch.stack(model.model.get_image_features(pixel_values=pixel_values).pooler_output)
    assert ours.shape == (3, 576, model.config.text_config.hidden_size)
    assert torch.equal(ours, vanilla)


def test_tower_stops_after_the_feature_layer(tiny, pixel_values):
    model = tiny[0]
    layers = model.model.vision_tower.encoder.layers
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            VisionZip(54, 10).encode_images(model, pixel_values[:1])
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(len(layers) - 1))  # the last layer's output is never used


def test_one_liner_feeds_exactly_64_rows_per_image(tiny):
    model, processor = build_tiny_llava(seed=1)
    images = list(sample_images().values())[:2]
    before = hooks(model)
    model = visionzip(model, dominant=54, contextual=10)
    try:
        processor = visionzip_processor(processor, model)
        inputs = processor(images=images, text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
        embeds, out = llm_input_embeddings(model, **inputs)
        mask = inputs["input_ids"] == model.config.image_token_id
        assert mask.sum(1).tolist() == [64, 64]
        with torch.no_grad():
            want = VisionZip(54, 10).encode_images(model, inputs["pixel_values"])
        assert torch.equal(embeds[mask].view(2, 64, -1), want)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        assert tokens_per_image(model) == 64
    finally:
        remove_reduction(model)
    assert hooks(model) == before and tokens_per_image(model) == 576


def test_two_models_carry_different_budgets(pixel_values):
    a, _ = build_tiny_llava(seed=3)
    b, _ = build_tiny_llava(seed=3)
    visionzip(a, 54, 10)
    visionzip(b, 108, 20)
    try:
        with torch.no_grad():
            fa = a.model.get_image_features(pixel_values=pixel_values[:1]).pooler_output[0]
            fb = b.model.get_image_features(pixel_values=pixel_values[:1]).pooler_output[0]
        assert fa.shape[0] == 64 and fb.shape[0] == 128
    finally:
        remove_reduction(a), remove_reduction(b)


def test_nested_block_restores_the_outer_reducer(tiny):
    model = tiny[0]
    before = hooks(model)
    visionzip(model, 108, 20)
    try:
        with VisionZip(54, 10)(model):
            assert tokens_per_image(model) == 64
        assert tokens_per_image(model) == 128
    finally:
        remove_reduction(model)
    assert hooks(model) == before


def test_budget_larger_than_the_tower_is_refused(tiny, pixel_values):
    before = hooks(tiny[0])
    with pytest.raises(ValueError, match="exceeds the vision tower's 577 tokens"):
        VisionZip(570, 8).encode_images(tiny[0], pixel_values)
    with pytest.raises(ValueError, match="contextual must be >= 1"):
        VisionZip(54, 0)
    with pytest.raises(ValueError, match="dominant must be >= 1"):
        visionzip(tiny[0], 0, 10)
    assert hooks(tiny[0]) == before


def test_from_budget_and_unsupported_model():
    assert VisionZip.from_budget(128) == VisionZip(108, 20)
    assert VisionZip.from_budget("50+14") == VisionZip(50, 14)
    with pytest.raises(ValueError, match="no reduction"):
        VisionZip.from_budget("full")
    with pytest.raises(ValueError, match="no VisionZip backend for Linear"):
        backend_for(torch.nn.Linear(2, 2))


def test_backend_reads_llava_geometry(tiny):
    backend = backend_for(tiny[0])
    assert backend.tower_tokens == 577 and backend.full_tokens == 576
    assert backend.layer_index == len(tiny[0].model.vision_tower.encoder.layers) - 2
