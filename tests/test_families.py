"""The contract every model family meets, once per row of ``family_table.py``: leaving the
reduction restores the model exactly (outputs, weights, hooks, instance attributes), the LLM
receives the documented visual rows inside it, and unreduced placeholder counts are refused
with the fix. A family registered without a row fails ``test_every_family_has_a_row``."""

import importlib.util

import pytest
import torch
from family_table import FAMILY_ROWS
from helpers import hooks

from visionzip_eval import VisionZip, applied_reducer, visionzip_processor
from visionzip_eval.backends import BACKENDS


def row_id(row):
    return row.backend.__module__.rsplit(".", 1)[-1]


def needs(row):
    if row.needs and importlib.util.find_spec(row.needs) is None:
        pytest.skip(f"the {row.needs} package is not installed")


def state(model):
    """Hooks, ``get_*`` overrides, and every instance attribute of the model and its inner model."""
    return hooks(model), sorted(model.__dict__), sorted(model.model.__dict__)


def test_every_family_has_a_row():
    assert {row.backend for row in FAMILY_ROWS} == set(BACKENDS)


@pytest.mark.parametrize("row", FAMILY_ROWS, ids=row_id)
def test_leaving_the_block_restores_the_model_exactly(row):
    needs(row)
    model, processor = row.build(seed=2)
    pristine, _ = row.build(seed=2)
    args, kwargs = row.request(processor)
    reducer = VisionZip(*row.budget)
    with torch.no_grad():
        full = model(*args, **kwargs).logits
    before = state(model)  # after a first forward: transformers adds its own hooks lazily
    with reducer(model):
        assert applied_reducer(model) == reducer
        visionzip_processor(processor, model)
        small_args, small_kwargs = row.request(processor)
        with torch.no_grad():
            inside = model(*small_args, **small_kwargs).logits
            model.generate(*small_args, **small_kwargs, max_new_tokens=2, do_sample=False)
        unreduced, reduced = row.visual_rows
        assert inside.shape[1] == full.shape[1] - unreduced + reduced
    visionzip_processor(processor, model)
    assert applied_reducer(model) is None and state(model) == before
    with torch.no_grad():
        got = model(*args, **kwargs).logits
        want = pristine(*args, **kwargs).logits
        got_gen = model.generate(*args, **kwargs, max_new_tokens=4, do_sample=False)
        want_gen = pristine.generate(*args, **kwargs, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want) and torch.equal(got_gen, want_gen)
    for (name, a), (_, b) in zip(model.state_dict().items(), pristine.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("row", [r for r in FAMILY_ROWS if r.placeholder_errors], ids=row_id)
def test_wrong_placeholder_count_says_how_to_fix(row):
    needs(row)
    model, processor = row.build(seed=0)
    for request, message in row.placeholder_errors:
        args, kwargs = request(processor)  # the processor's own (unreduced) counts
        with VisionZip(*row.budget)(model), torch.no_grad():
            with pytest.raises(ValueError, match=message):
                model(*args, **kwargs)
        assert applied_reducer(model) is None
