"""The in-LLM methods choose what their official code chooses: on a tiny LLaVA-1.5 (eager, so
the full model's attention maps can be read), the first pruning of FastV, PyramidDrop and
SparseVLM keeps the same positions as the plain transcriptions in ``tests/official_*.py``, fed
with the unpruned model's attention maps and hidden states (float32 model, float64 references)."""

import pytest
import torch
from official_fastv import official_fastv_keep
from official_pdrop import official_pdrop_stage_keep_from_attention
from official_sparsevlm import official_sparsevlm_layer, official_text_raters

from visionzip_eval.apply import visionzip_processor
from visionzip_eval.methods import MethodSpec
from visionzip_eval.backends.llava_hf import build_tiny_llava
from visionzip_eval.testing import sample_images

LAYERS = 6


@pytest.fixture(scope="module")
def reference():
    """The tiny model, its inputs, and the unpruned prefill's attentions and hidden states."""
    model, processor = build_tiny_llava(seed=3, attn_implementation="eager", text_layers=LAYERS)
    image = sample_images()["astronaut"]
    inputs = processor(images=[image], text=["USER: <image>\nWhat is in the picture, and where? ASSISTANT:"],
                       return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    positions = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    return model, processor, inputs, out, positions


def _first_decision(reference, name, **options):
    """What the method kept at its first pruning layer: (kept positions, the Prune, layer)."""
    model, processor, inputs, _, _ = reference
    reducer = MethodSpec.parse(name, **options).build(64)
    seen = []
    select = reducer.select

    def spy(view):
        decision = select(view)
        seen.append((view.index[0][decision.keep[0]], decision, view.layer))
        return decision

    reducer.select = spy
    with reducer(model):
        visionzip_processor(processor, model)
        with torch.no_grad():
            model(**inputs)
    visionzip_processor(processor, model)
    return seen[0]


def test_fastv_keeps_what_the_official_rule_keeps(reference):
    _, _, inputs, out, positions = reference
    kept, _, layer = _first_decision(reference, "fastv")
    assert layer == 2
    want = official_fastv_keep([a.double() for a in out.attentions], int(positions[0]), len(positions), 64, k=2)
    assert kept.tolist() == want.tolist()


def test_pdrop_first_stage_keeps_what_the_official_rule_keeps(reference):
    _, _, _, out, positions = reference
    kept, decision, layer = _first_decision(reference, "pdrop")
    count = int((decision.keep[0][positions]).sum())
    want = official_pdrop_stage_keep_from_attention(out.attentions[layer].double(), positions, count)
    assert layer == 1 and count == round(576 * (64 / 576) ** (1 / 3))
    assert kept.tolist() == want.tolist()


def test_sparsevlm_first_layer_keeps_and_merges_what_the_official_rule_does(reference):
    model, _, _, out, positions = reference
    kept, decision, layer = _first_decision(reference, "sparsevlm")
    count = int((decision.keep[0][positions]).sum())
    start, length = int(positions[0]), len(positions)
    raters = start + length + official_text_raters(out.hidden_states[0].double(), start, length)
    want = official_sparsevlm_layer(
        out.attentions[layer - 1].double(), out.hidden_states[layer].double(), positions, raters, retain=count
    )
    assert kept.tolist() == want.source_positions[want.source_positions >= 0].tolist()
    order = want.center_positions.argsort()  # ours: any order (they go by position); official: by score
    ours = decision.extra_index[0].argsort()
    assert decision.extra_index[0][ours].tolist() == want.center_positions[order].tolist()
    torch.testing.assert_close(decision.extra_hidden[0][ours].double(), want.merged_hidden[order], rtol=1e-4, atol=1e-5)
