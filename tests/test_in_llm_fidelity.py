"""The in-LLM methods as their authors ran them: the whole prefill of PDrop and SparseVLM (cuts,
merges, renumbered positions) equals the official layer loop (``tests/official_prefill.py``) on
a tiny float64 LLaVA-1.5; the official fp16 casts (``selection_precision=reference``); one
token accounting for ``count=average`` on the 32-layer shape; the guards of the mechanism."""

import pytest
import torch
from official_prefill import official_pdrop_prefill, official_sparsevlm_prefill

from visionzip_eval.methods import llm_pruning
from visionzip_eval.apply import visionzip_processor
from visionzip_eval.methods import MethodSpec
from visionzip_eval.backends.llava_hf import build_tiny_llava
from visionzip_eval.testing import sample_images

LAYERS = 6
PROMPT = "USER: <image>\nWhat is in the picture, and where is it? ASSISTANT:"


@pytest.fixture(scope="module")
def tiny64():
    model, processor = build_tiny_llava(seed=3, text_layers=LAYERS)
    model = model.double()
    inputs = processor(images=[sample_images()["astronaut"]], text=[PROMPT], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return model, processor, inputs


def _prefill(model, processor, inputs, name, budget=64, **options):
    """Our prefill: the last position's final hidden state, each decision's kept original
    positions, counts, and the visual tokens per layer."""
    reducer = MethodSpec.parse(name, **options).build(budget)
    decisions, select = [], reducer.select

    def spy(view):
        decision = select(view)
        kept = view.index[0][decision.keep[0] & view.visual[0]]
        decisions.append((view.layer, kept.tolist()))
        return decision

    reducer.select = spy
    with reducer(model), torch.no_grad():
        visionzip_processor(processor, model)
        out = model(**inputs, output_hidden_states=True)
        per_layer = llm_pruning.visual_tokens_per_layer(model)
    visionzip_processor(processor, model)
    return out.hidden_states[-1][0, -1], decisions, per_layer[0].tolist()


def _embeds(model, inputs):
    captured = {}
    decoder = model.model.language_model
    handle = decoder.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return captured["inputs_embeds"]


def _image_block(model, inputs):
    positions = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    return int(positions[0]), len(positions)


@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_pdrop_prefill_equals_the_official_loop(tiny64, positions):
    model, processor, inputs = tiny64
    ours, decisions, _ = _prefill(model, processor, inputs, "pdrop", positions=positions)
    start, length = _image_block(model, inputs)
    layers = [layer for layer, _ in decisions]
    counts = [len(kept) for _, kept in decisions]
    want, kept = official_pdrop_prefill(
        model.model.language_model, _embeds(model, inputs), start, length, layers, counts,
        renumber=positions == "renumber",
    )
    assert layers == [1, 2, 3] and counts == [round(576 * (64 / 576) ** (i / 3)) for i in (1, 2, 3)]
    assert [k for _, k in decisions] == kept
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-9)


def test_pdrop_positions_change_the_result(tiny64):
    model, processor, inputs = tiny64
    renumbered = _prefill(model, processor, inputs, "pdrop", positions="renumber")
    original = _prefill(model, processor, inputs, "pdrop", positions="original")
    assert (renumbered[0] - original[0]).abs().max() > 1e-6


@pytest.mark.parametrize("version", ["v2", "v1"])
@pytest.mark.parametrize("budget", [64, 192])
def test_sparsevlm_prefill_equals_the_official_loop(tiny64, version, budget):
    model, processor, inputs = tiny64
    ours, decisions, per_layer = _prefill(model, processor, inputs, "sparsevlm", budget, version=version)
    start, length = _image_block(model, inputs)
    reducer = MethodSpec.parse("sparsevlm", version=version).build(budget)
    pruning = [stage - 1 for stage in reducer.prune_layers(LAYERS)]
    assert [layer - 1 for layer, _ in decisions] == pruning
    options = {"scale_bias": {192: (13.5, 0.0), 64: (0.8, 0.0)}[budget]} if version == "v1" else {
        "retain": [len(kept) for _, kept in decisions]}
    want, counts = official_sparsevlm_prefill(
        model.model.language_model, _embeds(model, inputs), start, length, pruning, **options
    )
    # the count MSL:331 records after layer l is what layer l + 1 processes here
    assert per_layer[1:] == counts[:-1]
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-9)


def test_sparsevlm_v1_refuses_budgets_its_rule_has_no_setting_for():
    with pytest.raises(ValueError, match="192/128/64 only.*version=v2"):
        MethodSpec.parse("sparsevlm", version="v1").build(100)


@pytest.mark.parametrize("name, options", [("fastv", {}), ("pdrop", {}), ("sparsevlm", {"version": "v2"})])
def test_average_count_reaches_64_on_the_32_layer_shape(name, options):
    """count=average at 64: the mean over all 32 layers of the visual tokens each processed."""
    model, processor = build_tiny_llava(seed=5, text_layers=32)
    inputs = processor(images=[sample_images()["astronaut"]], text=[PROMPT], return_tensors="pt")
    _, _, per_layer = _prefill(model, processor, inputs, name, 64, count="average", **options)
    assert len(per_layer) == 32 and per_layer[0] == 576
    assert abs(sum(per_layer) / 32 - 64) <= 1, per_layer


@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_reference_precision_ranks_the_scores_cast_to_the_model_dtype(name):
    """In a half-precision model, ``reference`` ranks the fp16-rounded head mean of the fp16-cast
    probabilities (the official casts), ``float32`` the float32 mean."""
    model, processor = build_tiny_llava(seed=3, text_layers=LAYERS)
    model = model.to(torch.bfloat16)
    inputs = processor(images=[sample_images()["astronaut"]], text=[PROMPT], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    seen = {}
    for precision in ("float32", "reference"):
        reducer = MethodSpec.parse(name, selection_precision=precision, **({"k": 1} if name == "fastv" else {})).build(64)
        select, scores = reducer.select, []
        original = reducer.last_token_scores

        def spy(view, source, precision="float32", original=original, scores=scores):
            out = original(view, source, precision)
            probs = view.attention(torch.full((1, 1), view.hidden.shape[1] - 1), source=source)
            scores.append((out, probs))
            return out

        reducer.last_token_scores = spy
        reducer.select = select
        with reducer(model), torch.no_grad():
            visionzip_processor(processor, model)
            model(**inputs)
        visionzip_processor(processor, model)
        seen[precision] = scores[0]
    out, probs = seen["reference"]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, probs.to(torch.bfloat16).mean(dim=1)[:, 0])
    out, probs = seen["float32"]
    assert out.dtype == torch.float32 and torch.equal(out, probs.mean(dim=1)[:, 0])


def test_float64_scores_rank_in_float64():
    from visionzip_eval.methods.base import top_positions
    from visionzip_eval.methods.in_llm import InLLMReducer

    scores = torch.tensor([[1.0, 1.0 + 1e-12, 0.5]], dtype=torch.float64)  # equal in float32
    assert top_positions(scores, 1).tolist() == [[1]]
    keep = InLLMReducer.keep_top(scores, torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]))
    assert keep.tolist() == [[False, True, False]]


# -- guards ------------------------------------------------------------------------------------


def _applied(name="fastv", **options):
    model, processor = build_tiny_llava(seed=3, text_layers=LAYERS)
    reducer = MethodSpec.parse(name, **options).build(64)
    inputs = processor(images=[sample_images()["astronaut"]], text=[PROMPT], return_tensors="pt")
    return model, processor, reducer, inputs


def test_static_cache_is_refused_in_one_line():
    model, processor, reducer, inputs = _applied()
    with reducer(model), torch.no_grad():
        visionzip_processor(processor, model)
        with pytest.raises(ValueError, match="needs a DynamicCache.*StaticCache") as error:
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static", do_sample=False)
        assert "\n" not in str(error.value)
    visionzip_processor(processor, model)


def test_visual_tokens_onto_a_used_cache_are_refused():
    """A chunked prefill (or a later turn reusing the cache) that brings the image after the
    cache holds tokens: its visual tokens would silently go unpruned."""
    from transformers import DynamicCache

    model, processor, reducer, inputs = _applied()
    with reducer(model), torch.no_grad():
        visionzip_processor(processor, model)
        cache = DynamicCache(config=model.config.get_text_config())
        model(input_ids=inputs["input_ids"][:, :3], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="brings .* onto a cache of 3 .*chunked prefill"):
            model(input_ids=inputs["input_ids"][:, 3:], pixel_values=inputs["pixel_values"],
                  past_key_values=cache, use_cache=True)
    visionzip_processor(processor, model)


def test_a_second_chunk_after_a_pruned_prefill_is_refused():
    from transformers import DynamicCache

    model, processor, reducer, inputs = _applied()
    with reducer(model), torch.no_grad():
        visionzip_processor(processor, model)
        cache = DynamicCache(config=model.config.get_text_config())
        model(**inputs, past_key_values=cache, use_cache=True)
        more = processor.tokenizer(" and why?", add_special_tokens=False, return_tensors="pt")["input_ids"]
        with pytest.raises(ValueError, match="chunked prefill or a turn reusing the cache"):
            model(input_ids=more, past_key_values=cache, use_cache=True)
    visionzip_processor(processor, model)


def test_decoders_whose_attention_scoring_cannot_recompute_are_refused():
    model, processor, reducer, _ = _applied("pdrop")
    decoder = model.model.language_model
    decoder.layers[2].self_attn.q_norm = torch.nn.Identity()
    with pytest.raises(ValueError, match="normalises queries and keys.*pre-LLM method"):
        reducer.apply(model)
    del decoder.layers[2].self_attn.q_norm
    decoder.layers[1].self_attn.sliding_window = 16
    with pytest.raises(ValueError, match="own attention windows"):
        reducer.apply(model)
