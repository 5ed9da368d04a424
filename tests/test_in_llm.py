"""In-LLM methods (FastV, PyramidDrop, SparseVLM) remove tokens for real: removal equals
masking the same tokens out of every later attention (prefill and decoding), a batch equals its
singles, the pruned counts and FLOPs are what each method promises, and nothing stays behind."""

import pytest
import torch
from helpers import hooks
from method_table import METHOD_ROWS

from visionzip_eval.methods import llm_pruning
from visionzip_eval.apply import visionzip_processor
from visionzip_eval.backends import backend_for
from visionzip_eval.engine import Engine, Generation, Request
from visionzip_eval.methods import MethodSpec, list_methods
from visionzip_eval.backends.llava_hf import build_tiny_llava
from visionzip_eval.backends.qwen2_5_vl import build_tiny_qwen2_5_vl
from visionzip_eval.testing import sample_images

IN_LLM = [row for row in METHOD_ROWS if MethodSpec.parse(row[0]).name in {i.name for i in list_methods("in-llm")}]
IN_LLM_IDS = [f"{name}-{','.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for name, o, _ in IN_LLM]
LAYERS = 6  # deep enough for every method's default layers (FastV K=2, the scaled stages of the others)
PROMPTS = ["What is this?", "Describe the picture in many words, please, and be precise."]


@pytest.fixture(scope="module", params=["llava-hf", "llava-hf-eager", "llava-original"])
def family(request, tmp_path_factory):
    if request.param == "llava-original":
        pytest.importorskip("llava.model.builder", reason="the original llava package (llava-torch) is not installed")
        from visionzip_eval.backends.llava_original import build_tiny_llava_original

        model, processor = build_tiny_llava_original(tmp_path_factory.mktemp("llava") / "llava-tiny", text_layers=LAYERS)
    else:
        attention = "eager" if request.param.endswith("eager") else "sdpa"
        model, processor = build_tiny_llava(seed=0, text_layers=LAYERS, attn_implementation=attention)
    return request.param, model, processor


def _images():
    images = sample_images()
    return [images["astronaut"], images["coffee"]]


def _generate(family, prompts, images, steps=5, whole=False, per_row=1):
    """Greedy generation with per-step logits (the first from prefill), left-padded batch
    (``whole``: transformers' output object itself)."""
    name, model, processor = family
    backend = backend_for(model)
    texts = [backend.chat_prompt(processor, [(p, None)], per_row) for p in prompts]
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        if name == "llava-original":
            inputs = backend.prepare_inputs(processor, texts, [images[i : i + per_row] for i in range(0, len(images), per_row)])
            model.config.tokenizer_padding_side = "left"
            out = model.generate(inputs["input_ids"], images=inputs["images"], image_sizes=inputs["image_sizes"],
                                 attention_mask=inputs["attention_mask"], **settings)
        else:
            processor.tokenizer.padding_side = "left"
            inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
            out = model.generate(**inputs, **settings)
    if whole:
        return out
    return torch.stack(out.logits, 1), out.sequences[:, -steps:]


@pytest.mark.parametrize("name, options, _", IN_LLM, ids=IN_LLM_IDS)
@pytest.mark.parametrize("budget", [64, 192])
def test_removal_equals_masking_and_batch_equals_singles(family, name, options, _, budget):
    _, model, processor = family
    reducer = MethodSpec.parse(name, **options).build(budget)
    before = hooks(model)
    with reducer(model):
        visionzip_processor(processor, model)
        images = _images()
        llm_pruning.set_mode(model, "mask")
        masked_logits, masked_tokens = _generate(family, PROMPTS, images)
        masked_counts = llm_pruning.visual_tokens_per_layer(model)
        llm_pruning.set_mode(model, "remove")
        logits, tokens = _generate(family, PROMPTS, images)
        counts = llm_pruning.visual_tokens_per_layer(model)
        torch.testing.assert_close(logits, masked_logits, rtol=0, atol=1e-4)
        assert torch.equal(tokens, masked_tokens) and torch.equal(counts, masked_counts)
        for row in range(2):
            single_logits, single_tokens = _generate(family, PROMPTS[row : row + 1], images[row : row + 1])
            torch.testing.assert_close(single_logits[0], logits[row], rtol=0, atol=1e-4)
            assert torch.equal(single_tokens[0], tokens[row])
    visionzip_processor(processor, model)
    assert hooks(model) == before
    assert counts[:, 0].tolist() == [576, 576] and (counts[:, -1] < 576).all()


@pytest.mark.parametrize("name", ["fastv", "sparsevlm"])
def test_rows_keeping_different_counts_batch_like_singles(family, name):
    """A row with two images keeps twice the tokens of a row with one: the narrower row is
    padded with slots no query attends to, and each row still equals its single run."""
    if family[0] == "llava-original":
        pytest.skip("this test builds its batch with the transformers processor (llava-hf)")
    _, model, processor = family
    images = _images()
    reducer = MethodSpec.parse(name).build(64)
    processor.tokenizer.padding_side = "left"
    backend = backend_for(model)
    texts = [backend.chat_prompt(processor, [(PROMPTS[0], None)], 2), backend.chat_prompt(processor, [(PROMPTS[1], None)], 1)]
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
    with reducer(model), torch.no_grad():
        visionzip_processor(processor, model)
        batch = model.generate(**processor(images=images + images[1:], text=texts, return_tensors="pt", padding=True),
                               **settings)
        counts = llm_pruning.visual_tokens_per_layer(model)
        singles = [model.generate(**processor(images=group, text=[text], return_tensors="pt"), **settings)
                   for group, text in ((images, texts[0]), (images[1:], texts[1]))]
    visionzip_processor(processor, model)
    assert counts[:, -1].tolist() == [128, 64]
    for row, single in enumerate(singles):
        torch.testing.assert_close(torch.stack(single.logits, 1)[0], torch.stack(batch.logits, 1)[row], rtol=0, atol=1e-4)


def test_removal_shortens_every_later_layer_and_its_cache(family):
    """FastV at 64 kept: layers >= K output 64 visual rows, their KV caches hold only those
    (plus the decoded tokens), and the logits differ from the unpruned model's."""
    _, model, processor = family
    reducer = MethodSpec.parse("fastv").build(64)
    lengths = {}

    def record(number):
        def hook(module, args, output):
            lengths.setdefault(number, output.shape[1])
        return hook

    decoder = backend_for(model).decoder()
    handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(decoder.layers)]
    try:
        full = _generate(family, PROMPTS[:1], _images()[:1], steps=3, whole=True)
        lengths.clear()
        with reducer(model):
            visionzip_processor(processor, model)
            pruned = _generate(family, PROMPTS[:1], _images()[:1], steps=3, whole=True)
        visionzip_processor(processor, model)
    finally:
        for handle in handles:
            handle.remove()
    prompt = lengths[0]
    assert [lengths[i] for i in range(LAYERS)] == [prompt] * 2 + [prompt - 576 + 64] * (LAYERS - 2)
    cached = [layer.keys.shape[-2] for layer in pruned.past_key_values.layers]
    assert cached == [prompt + 2] * 2 + [prompt - 576 + 64 + 2] * (LAYERS - 2)
    assert not torch.allclose(torch.stack(pruned.logits), torch.stack(full.logits), atol=1e-4)


def test_engine_reports_pruned_counts_and_fewer_flops(family):
    _, model, processor = family
    request = Request(turns=[("What is shown?", None)], images=_images()[:1])
    settings = Generation(max_new_tokens=2)
    metrics = {}
    for label, reducer in (("full", MethodSpec.parse("none").build("full")),
                           ("fastv", MethodSpec.parse("fastv").build(64))):
        engine = Engine(model, processor, reducer)
        try:
            metrics[label] = engine.generate([request], settings)[0].metrics
        finally:
            engine.close()
    assert metrics["full"]["visual_tokens"] == metrics["fastv"]["visual_tokens"] == 576
    assert metrics["full"]["visual_tokens_after_pruning"] == 576
    assert metrics["fastv"]["visual_tokens_after_pruning"] == 64
    assert metrics["full"]["visual_tokens_layer_average"] == 576
    assert 64 < metrics["fastv"]["visual_tokens_layer_average"] < 576
    assert metrics["fastv"]["prompt_tokens"] == metrics["full"]["prompt_tokens"]
    assert metrics["fastv"]["prefill_flops"] < metrics["full"]["prefill_flops"]


@pytest.mark.parametrize("name, options, _", IN_LLM, ids=IN_LLM_IDS)
def test_qwen2_5_vl_is_refused_in_one_line(name, options, _):
    model, _processor = build_tiny_qwen2_5_vl(seed=0)
    reducer = MethodSpec.parse(name, **options).build(32)
    with pytest.raises(ValueError, match="prunes inside the LLM") as error:
        reducer.apply(model)
    assert "\n" not in str(error.value)


def test_layers_that_do_not_fit_are_refused(tiny):
    model, _ = tiny  # a 2-layer LLM: FastV's K=2 leaves nothing to prune
    with pytest.raises(ValueError, match=r"fastv: pruning layers \(2,\) do not fit a 2-layer LLM"):
        MethodSpec.parse("fastv").build(64).apply(model)
    assert llm_pruning.installed(model) is None
