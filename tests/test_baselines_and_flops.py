"""The random and pool baselines, and the FLOPs formulas against hand computations."""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig

from visionzip_eval import MethodSpec, NoReduction, PoolTokens, RandomTokens, VisionZip
from visionzip_eval.backends import backend_for
from visionzip_eval.profiling import DecoderShape, decode_step_flops, prefill_flops, vit_flops


@pytest.mark.parametrize("budget", [64, 128, 192, "50+14", 32])
@pytest.mark.parametrize("method", ["visionzip", "random", "pool"])
def test_every_method_passes_the_budget_total(tiny, pixel_values, method, budget):
    reducer = MethodSpec.parse(method).build(budget, seed=1)
    with torch.no_grad():
        tokens = reducer.encode_images(tiny[0], pixel_values[:2])
    total = VisionZip.from_budget(budget).dominant + VisionZip.from_budget(budget).contextual
    assert tokens.shape == (2, total, tiny[0].config.text_config.hidden_size)


def test_full_is_no_reduction_for_every_method():
    for method in ("visionzip", "random", "pool", "fastv", "sparsevlm"):
        assert MethodSpec.parse(method).build("full") == NoReduction()
    with pytest.raises(ValueError, match="unknown method 'fastvv'"):
        MethodSpec.parse("fastvv")


def test_pool_averages_grid_blocks(tiny, pixel_values):
    model = tiny[0]
    backend = backend_for(model)
    signals = backend.capture(pixel_values[:1], attention=False)
    pooled = PoolTokens(64).reduce(signals, backend).tokens  # 24x24 -> 8x8: 3x3 blocks
    grid = signals.hidden[0, 1:].reshape(24, 24, -1)
    torch.testing.assert_close(pooled[0, 0], grid[:3, :3].reshape(9, -1).mean(0))
    torch.testing.assert_close(pooled[0, 9], grid[3:6, 3:6].reshape(9, -1).mean(0))
    assert PoolTokens(128).reduce(signals, backend).tokens.shape[1] == 128  # 8x16


def test_random_is_seeded_positional_and_without_cls(tiny, pixel_values):
    model = tiny[0]
    backend = backend_for(model)
    signals = backend.capture(pixel_values[:2], attention=False)
    a = RandomTokens(64, seed=7).reduce(signals, backend)
    b = RandomTokens(64, seed=7).reduce(signals, backend)
    c = RandomTokens(64, seed=8).reduce(signals, backend)
    assert torch.equal(a.dominant_index, b.dominant_index)
    assert not torch.equal(a.dominant_index, c.dominant_index)
    assert (a.dominant_index.diff(dim=1) > 0).all() and a.dominant_index.min() >= 1
    rows = signals.hidden[0, a.dominant_index[0]]
    torch.testing.assert_close(a.tokens[0], rows)


def test_prefill_flops_hand_computation():
    config = LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=261,
    )
    shape = DecoderShape.from_config(config)
    assert (shape.head_dim, shape.kv_heads) == (16, 2)
    # per layer, n=10: projections 10*64*16*(2*4 + 2*2) = 122880; scores+AV 2*10*10*4*16 = 12800;
    # SwiGLU 3*10*64*192 = 368640 -> 504320 MACs; x2 layers = 1008640; LM head 64*261 = 16704.
    assert prefill_flops(shape, 10) == 2 * (1008640 + 16704)
    # one decode step at context 10: 2*(2*(64*16*12 + 2*11*4*16 + 3*64*192) + 64*261)
    assert decode_step_flops(shape, 10) == 2 * (2 * (12288 + 1408 + 36864) + 16704)


def test_prefill_flops_of_llama7b_match_its_parameter_count():
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    )
    shape = DecoderShape.from_config(config)
    linear_params = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # ~6.5e9 without embeddings
    per_token = prefill_flops(shape, 2, logits_tokens=0) - prefill_flops(shape, 1, logits_tokens=0)
    quadratic = 2 * 32 * 2 * (4 - 1) * 32 * 128  # the n^2 term's growth from n=1 to n=2
    assert per_token - quadratic == 2 * linear_params


def test_vit_flops_hand_computation():
    vision = CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=8, intermediate_size=32, num_attention_heads=2)
    # 4 patches + CLS = 5 tokens; embed 4*3*14*14*8 = 18816; layer 4*5*8*8 + 2*25*8 + 2*5*8*32
    # = 1280 + 400 + 2560 = 4240; projector 3 tokens * (8*16 + 16*16) = 1152
    assert vit_flops(vision, layers_run=2, projector_in=8, projector_out=16, tokens_out=3) == 2 * (
        18816 + 2 * 4240 + 1152
    )


def test_backend_vision_flops_drop_with_the_budget(tiny):
    backend = backend_for(tiny[0])
    assert backend.vision_flops(64) < backend.vision_flops(576)
