"""Each competitor's selection against a plain-loop transcription of its official code
(``tests/official_*.py``, which cite the official files and lines), on the tiny LLaVA-1.5.

The references read an eager tower's own attention maps. Both sides run in float64 on the
same layer outputs: the random tiny tower's patch features are near-duplicates (cosine ~0.999),
so float32 rounding alone can reorder near-ties between two correct implementations. A second
test per method checks that the model path (float32, recomputed signals) is that function."""

import pytest
import torch
from official_divprune import official_num_kept, reference_divprune
from official_fastervlm import reference_fastervlm
from official_prumerge_plus import reference_prumerge_plus_adaptive, reference_prumerge_plus_fixed
from official_vispruner import reference_vispruner

from visionzip_eval.backends import backend_for
from visionzip_eval.methods import get_method
from visionzip_eval.methods.divprune import divprune_select
from visionzip_eval.methods.prumerge_plus import adaptive_count, fixed_kept_positions, full_width_cls_attention, merge_kept
from visionzip_eval.methods.vispruner import vispruner_select
from visionzip_eval.selection import gather_rows


@pytest.fixture(scope="module")
def eager(tiny_eager, pixel_values):
    """The eager tower's outputs in float64: layer L's output, the attention maps of layers L
    and L + 1, and the next layer's projections of layer L's output."""
    model = tiny_eager[0]
    layers = model.model.vision_tower.encoder.layers
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
        hidden = out.hidden_states[-2]  # output of layers[-2], what LLaVA reads
        following = layers[-1]
        normed = following.layer_norm1(hidden)
        values = dict(
            hidden=hidden,
            attention=out.attentions[-2],  # computed inside layers[-2]
            next_attention=out.attentions[-1],  # inside the layer that reads `hidden`
            next_queries=following.self_attn.q_proj(normed),
            next_keys=following.self_attn.k_proj(normed),
            projected=model.model.multi_modal_projector(hidden[:, 1:]),
        )
    return {key: value.double() for key, value in values.items()}


def _select(tiny, pixel_values, name, tokens, **options):
    with torch.no_grad():
        return get_method(name, tokens, **options).select(tiny[0], pixel_values)


def _signals(tiny, pixel_values):
    backend = backend_for(tiny[0])
    with torch.no_grad():
        return backend, backend.capture(pixel_values, attention=True)


@pytest.mark.parametrize("tokens", [64, 128, 192, 7])
def test_fastervlm_matches_official(tiny, pixel_values, eager, tokens):
    ours = _select(tiny, pixel_values, "fastervlm", tokens)
    for b in range(pixel_values.shape[0]):
        out, kept = reference_fastervlm(eager["hidden"][b], eager["attention"][b, :, 0], None, tokens)
        assert ours.dominant_index[b].tolist() == kept.tolist()
        torch.testing.assert_close(ours.tokens[b].double(), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens, ratio", [(64, 0.5), (128, 0.5), (192, 0.5), (64, 0.75), (100, 0.25), (20, 0.0)])
def test_vispruner_matches_official(eager, tokens, ratio):
    importance = eager["attention"][:, :, 0, 1:].mean(dim=1)
    ours = vispruner_select(eager["hidden"][:, 1:], importance, tokens, ratio) + 1
    for b in range(ours.shape[0]):
        _, kept = reference_vispruner(eager["hidden"][b], eager["attention"][b, :, 0], None, tokens, ratio)
        assert ours[b].tolist() == kept.tolist()


def test_vispruner_model_path_is_the_selection(tiny, pixel_values):
    ours = _select(tiny, pixel_values, "vispruner", 64)
    backend, signals = _signals(tiny, pixel_values)
    want = vispruner_select(signals.hidden[:, 1:], signals.cls_attention[:, :, 1:].mean(dim=1), 64, 0.5) + 1
    assert torch.equal(ours.dominant_index, want)
    assert torch.equal(ours.tokens, gather_rows(signals.hidden, want))


@pytest.mark.parametrize("tokens", [64, 128, 192])
def test_divprune_matches_official(eager, tokens):
    ours = divprune_select(eager["projected"], tokens)
    for b in range(ours.shape[0]):
        assert ours[b].tolist() == sorted(reference_divprune(eager["projected"][b], tokens).tolist())


def test_divprune_model_path_is_the_selection(tiny, pixel_values):
    ours = _select(tiny, pixel_values, "divprune", 128)
    backend, signals = _signals(tiny, pixel_values)
    with torch.no_grad():
        want = divprune_select(backend.project(signals.hidden[:, 1:]), 128) + 1
    assert torch.equal(ours.dominant_index, want)


@pytest.mark.parametrize("tokens", [64, 128, 192])
def test_divprune_packed_is_per_unit_when_an_image_is_one_unit(tiny, pixel_values, tokens):
    """scope=packed keeps int(round(ratio * len)) rows of an image's whole sequence
    (llava_arch.py:153, :369-375); on LLaVA-1.5 that sequence is its one unit of 576 rows, so at
    ratio tokens/576 it keeps ``tokens``: the per_unit selection, row for row."""
    packed = _select(tiny, pixel_values, "divprune", tokens, scope="packed")
    per_unit = _select(tiny, pixel_values, "divprune", tokens)
    assert official_num_kept(tokens / 576) == tokens == packed.dominant_index.shape[1]
    assert torch.equal(packed.dominant_index, per_unit.dominant_index)
    assert torch.equal(packed.tokens, per_unit.tokens)


@pytest.mark.parametrize("tokens", [64, 128, 192, 9])
def test_prumerge_plus_fixed_matches_official(eager, tokens):
    attention = full_width_cls_attention(eager["next_queries"], eager["next_keys"])[:, 1:]
    kept = fixed_kept_positions(attention, tokens)
    rows = merge_kept(eager["hidden"][:, 1:], attention, eager["next_keys"][:, 1:], kept)
    assert rows.shape[1] == tokens
    for b in range(kept.shape[0]):
        out, reference = reference_prumerge_plus_fixed(
            eager["hidden"][b], eager["next_attention"][b, :, 0], eager["next_keys"][b], tokens
        )
        assert (kept[b] + 1).tolist() == reference[:-1].tolist()
        torch.testing.assert_close(rows[b], out, rtol=1e-6, atol=1e-8)


def test_prumerge_plus_model_path_is_the_selection(tiny, pixel_values):
    ours = _select(tiny, pixel_values, "prumerge+", 64)
    backend, signals = _signals(tiny, pixel_values)
    with torch.no_grad():
        queries, keys = backend.next_layer_projections(signals.hidden)
    attention = full_width_cls_attention(queries, keys)[:, 1:]
    kept = fixed_kept_positions(attention, 64)
    assert torch.equal(ours.dominant_index, kept + 1)
    assert torch.equal(ours.tokens, merge_kept(signals.hidden[:, 1:], attention, keys[:, 1:], kept))


def test_prumerge_plus_adaptive_count_matches_official(eager):
    attention = full_width_cls_attention(eager["next_queries"], eager["next_keys"])[:, 1:]
    for b, count in enumerate(adaptive_count(attention)):
        try:
            out, _ = reference_prumerge_plus_adaptive(
                eager["hidden"][b], eager["next_attention"][b, :, 0], eager["next_keys"][b]
            )
        except ValueError:  # where the official code fails, the count says 0
            assert count == 0
            continue
        assert count == out.shape[0] > 1
