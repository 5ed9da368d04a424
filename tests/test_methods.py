"""Contract tests for every registered method x every model family, written once: exact token
counts, placeholder counts through generation, leaving a method restores the model, a batch
equals its singles, and methods that need a signal a tower lacks are refused in one line."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import hooks
from method_table import METHOD_ROWS

from visionzip_eval.backends import backend_for
from visionzip_eval.engine import Engine, Generation, Request
from visionzip_eval.loading import builtin_models, load_pretrained
from visionzip_eval.methods import MethodSpec, get_method, list_methods
from visionzip_eval.testing import sample_images

# every registered family, through the tiny random model its backend declares
FAMILIES = sorted(name for name in builtin_models() if name != "builtin:tiny-llava-synth")
ROW_IDS = [f"{name}-{','.join(f'{k}={v}' for k, v in options.items()) or 'default'}" for name, options, _ in METHOD_ROWS]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    if request.param == "builtin:tiny-llava-original":
        pytest.importorskip("llava", reason="the original llava package (llava-torch) is not installed")
    model, processor = load_pretrained(request.param, torch.float32, torch.device("cpu"), "sdpa")
    return request.param, model, processor


def test_every_registered_method_has_a_table_row():
    assert {info.name for info in list_methods()} == {name for name, _, _ in METHOD_ROWS}


def test_registry_lists_kinds_options_and_sources():
    for info in list_methods():
        assert info.kind in ("pre-llm", "in-llm") and info.description and info.display
        for option in info.options:  # every option has a type and a default that validates
            assert MethodSpec.parse(info.name, **{option.name: option.default}).options == ()
    names = {info.name for info in list_methods()}
    assert {"visionzip", "random", "pool", "fastervlm", "vispruner", "divprune", "prumerge+"} <= names


def test_cli_methods_json_lists_every_method():
    out = subprocess.run([sys.executable, "-m", "visionzip_eval.cli", "methods", "--json"], capture_output=True,
                         text=True, check=True).stdout
    listed = {m["name"]: m for m in json.loads(out)}
    assert set(listed) == {info.name for info in list_methods()}
    assert listed["vispruner"]["options"] == [
        {"name": "important_ratio", "type": "float", "default": 0.5},
        {"name": "selection_precision", "type": "'float32'/'reference'", "default": "float32"},
    ]
    assert listed["fastervlm"]["kind"] == "pre-llm"
    assert listed["divprune"]["options"] == [
        {"name": "scope", "type": "'per_unit'/'packed'", "default": "per_unit"},
    ]
    with pytest.raises(ValueError, match=r"method 'divprune': option scope must be 'per_unit'/'packed', got 'crop'"):
        get_method("divprune", 64, scope="crop")


def test_spec_labels_round_trip_and_errors_name_the_options():
    spec = MethodSpec.parse({"name": "vispruner", "important_ratio": "0.25"})
    assert spec.label == "vispruner,important_ratio=0.25" and MethodSpec.parse(spec.label) == spec
    assert MethodSpec.parse("vispruner", important_ratio=0.5).label == "vispruner"  # defaults are not named
    with pytest.raises(ValueError, match=r"method 'vispruner' has no option ratio: its options are important_ratio \(float"):
        MethodSpec.parse("vispruner", ratio=0.5)
    with pytest.raises(ValueError, match="option important_ratio must be float"):
        MethodSpec.parse("vispruner", important_ratio="half")
    with pytest.raises(ValueError, match="important_ratio must be in"):
        get_method("vispruner", 64, important_ratio=1.5)
    with pytest.raises(ValueError, match="unknown method 'nope': choose one of .*visionzip"):
        get_method("nope", 64)


def _images():
    images = sample_images()
    return [images["astronaut"], images["coffee"]]


def _build(name, options, budget=64):
    return MethodSpec.parse(name, **options).build(budget)


@pytest.mark.parametrize("name, options, deterministic", METHOD_ROWS, ids=ROW_IDS)
def test_method_on_family(family, name, options, deterministic):
    """Counts, generation, batch = singles and a clean model afterwards; or a one-line refusal.
    32 tokens per unit: fewer than any tiny family's units hold (Qwen2.5-VL keeps an image with
    no more merged tokens than the budget whole)."""
    pretrained, model, processor = family
    backend = backend_for(model)
    reducer = _build(name, options, budget=32)
    try:
        reducer.check(backend)
    except ValueError as error:
        assert name in str(error) or "CLS" in str(error) or "layer" in str(error)
        assert "\n" not in str(error)
        with pytest.raises(ValueError):
            reducer.apply(model)
        return
    before = hooks(model)
    engine = Engine(model, processor, reducer)
    in_llm = reducer.kind == "in-llm"
    try:
        assert engine.tokens_per_image == (backend.full_tokens if in_llm else 32)
        images = _images()
        requests = [Request(turns=[("What is shown?", None)], images=[image]) for image in images]
        settings = Generation(max_new_tokens=3)
        batch = engine.generate(requests, settings)
        for output in batch:
            visual, after = output.metrics["visual_tokens"], output.metrics["visual_tokens_after_pruning"]
            if in_llm:  # every visual token enters the LLM (LLaVA-NeXT: unpadded, with row ends);
                # the share 32 / full of them survives inside it
                assert after == round(visual * 32 / backend.full_tokens) < visual
            else:  # every unit (image, crop) reaches the LLM as exactly 32 rows
                assert visual == after == output.metrics["vision_units"] * 32
        if deterministic:
            singles = [engine.generate([request], settings)[0] for request in requests]
            assert [o.text for o in batch] == [o.text for o in singles]
            assert [o.metrics["visual_tokens"] for o in batch] == [o.metrics["visual_tokens"] for o in singles]
    finally:
        engine.close()
    assert hooks(model) == before


@pytest.mark.parametrize("name, options, deterministic", METHOD_ROWS, ids=ROW_IDS)
def test_encode_gives_exact_counts_on_llava(tiny, pixel_values, name, options, deterministic):
    model = tiny[0]
    for budget in (64, 128, 192):
        reducer = _build(name, options, budget)
        with torch.no_grad():
            tokens = reducer.encode_images(model, pixel_values)
        rows = 576 if reducer.kind == "in-llm" else budget  # in-LLM methods prune inside the LLM
        assert tokens.shape == (3, rows, model.config.text_config.hidden_size)
        assert torch.isfinite(tokens).all()
        if deterministic:
            with torch.no_grad():
                single = reducer.encode_images(model, pixel_values[1:2])
            torch.testing.assert_close(single[0], tokens[1], rtol=1e-4, atol=1e-5)


def test_leaving_any_method_restores_outputs(tiny):
    model, processor = tiny
    inputs = processor(images=_images()[0], text="USER: <image>\nWhat? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        want = model(**inputs).logits
    before = hooks(model)
    for name, options, _ in METHOD_ROWS:
        with _build(name, options)(model):
            pass
        assert hooks(model) == before, name
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)


def test_report_names_show_non_default_options():
    from visionzip_eval.benchmarks import method_name, method_sort_key

    assert method_name("vispruner") == "VisPruner"
    assert method_name("vispruner,important_ratio=0.25") == "VisPruner (important_ratio=0.25)"
    assert method_name("none") == "Vanilla" and method_name("fastv") == "FastV (in-LLM)"  # pruned inside the LLM
    assert method_sort_key("visionzip,merge=average")[0] == method_sort_key("visionzip")[0]
