"""VisionZip's ``selection_precision``: ``float32`` (the default) against ``reference``, the
official code's arithmetic in the model's dtype.

The official code (dvlab-research/VisionZip at 3151f6d, ``visionzip/utils.py`` and
``visionzip/clip_encoder.py``) runs the whole tower in the model's dtype (fp16 for the paper's
LLaVA-1.5 runs): layer L's attention map is ``softmax(bmm(q * scale, k^T))`` in fp16, the CLS row
is summed over heads in fp16 and ranked by ``topk``. In fp16 that sum is rounded to ~3e-5 (its
ulp near 0.04), so patches that float32 tells apart tie, and ``topk`` picks among the ties.
``official_*`` below transcribe those lines (cited) so that ``reference`` is checked against them
bit for bit, and the tie test pins a case where the two precisions keep different patches.
"""

import pytest
import torch
from torch import nn

from visionzip_eval.backends import backend_for
from visionzip_eval.methods import MethodSpec, get_method
from visionzip_eval.methods.visionzip import VisionZip
from visionzip_eval.selection import (
    cls_attention_row,
    head_mean_keys,
    reference_cls_scores,
    visionzip_select,
    visionzip_select_reference,
)


# -- transcription of the official code ---------------------------------------------------------
def official_attention(queries, keys, num_heads, scale):
    """``CLIPAttention_forward`` (visionzip/utils.py lines 19-33, 61, 89) from the projections it
    computes: ``queries`` = ``self.q_proj(hidden_states)``, ``keys`` = ``self.k_proj(...)``.
    Returns ``(attn_weights_reshaped (B, H, N, N), raw_key_states.mean(1) (B, N, d))``."""
    bsz, tgt_len, embed_dim = queries.size()
    head_dim = embed_dim // num_heads

    def _shape(tensor, seq_len, bsz):  # CLIPAttention._shape (transformers 4.3x)
        return tensor.view(bsz, seq_len, num_heads, head_dim).transpose(1, 2).contiguous()

    query_states = queries * scale
    key_states = _shape(keys, -1, bsz)
    raw_key_states = key_states.clone()
    proj_shape = (bsz * num_heads, -1, head_dim)
    query_states = _shape(query_states, tgt_len, bsz).view(*proj_shape)
    key_states = key_states.view(*proj_shape)
    src_len = key_states.size(1)
    attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights_reshaped = attn_weights.view(bsz, num_heads, tgt_len, src_len)
    return attn_weights_reshaped, raw_key_states.mean(1)


def official_visionzip(hidden_states, attn_weights, metric, dominant_num, contextual_num):
    """``CLIPVisionTower_VisionZip.forward`` (visionzip/clip_encoder.py lines 43-83), batched
    branch, from layer L's outputs; ``dominant_num`` = dominant - 1 (visionzip/main.py line 7).
    Returns ``(hidden_states_save, all_indices)``."""
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype,
                                         device=topk_indices.device), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool, device=metric.device).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(
        hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step, device=metric_normalized.device)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(metric_normalized.shape[1],
                                                                    device=metric_normalized.device), target_indices), :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num,
                                 dtype=hidden_states_filtered.dtype, device=metric_normalized.device)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1],
                                                                         device=hidden_states_filtered.device), target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    hidden_states_save = torch.cat([dominant_tokens, contextual_tokens], dim=1)
    return hidden_states_save, all_indices


def official_from_projections(hidden, queries, keys, num_heads, scale, dominant, contextual):
    attn_weights, metric = official_attention(queries, keys, num_heads, scale)
    return official_visionzip(hidden, attn_weights, metric, dominant - 1, contextual)


# -- signals --------------------------------------------------------------------------------------
# LLaVA-1.5's layer L: 577 tokens, 16 heads of 64 (scale 1/8); hidden width kept small
N, HEADS, HEAD_DIM = 577, 16, 64


def random_projections(seed, dtype=torch.float16, batch=1, width=32):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, N, HEADS * HEAD_DIM, generator=g).to(dtype)
    keys = torch.randn(batch, N, HEADS * HEAD_DIM, generator=g).to(dtype)
    hidden = torch.randn(batch, N, width, generator=g).to(dtype)
    return hidden, queries, keys


def float32_select(hidden, queries, keys, dominant, contextual):
    """The default path, as the VisionZip method runs it from captured signals."""
    attention = cls_attention_row(queries[:, 0], keys, HEADS, HEAD_DIM**-0.5)
    return visionzip_select(hidden, attention, head_mean_keys(keys, HEADS), dominant, contextual)


def assert_same_as_official(selection, official):
    tokens, all_indices = official
    assert torch.equal(selection.dominant_index, all_indices.sort(dim=1).values)
    assert selection.tokens.dtype == tokens.dtype
    assert torch.equal(selection.tokens, tokens)  # bit for bit, the merged rows included


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dominant, contextual", [(54, 10), (108, 20), (162, 30), (2, 1), (567, 10)])
def test_reference_is_the_official_computation(dtype, dominant, contextual):
    hidden, queries, keys = random_projections(dominant + contextual, dtype, batch=2)
    ours = visionzip_select_reference(hidden, queries, keys, HEADS, HEAD_DIM**-0.5, dominant, contextual)
    assert_same_as_official(ours, official_from_projections(hidden, queries, keys, HEADS, HEAD_DIM**-0.5, dominant, contextual))
    assert ours.tokens.shape == (2, dominant + contextual, hidden.shape[-1])


def test_fp16_tie_at_the_boundary_changes_the_kept_patch():
    """LLaVA-1.5 shapes, 54 = CLS + 53 patches. Patches 124 and 170 (positions, CLS = 0) compete
    for the last slot: float32 ranks 170 higher (0.0408320 > 0.0408180), in fp16 both sums round
    to 0.0408325 (one ulp there is 3.05e-5) and the official topk keeps 124."""
    hidden, queries, keys = random_projections(4)
    f32 = float32_select(hidden, queries, keys, 54, 10)
    ref = visionzip_select_reference(hidden, queries, keys, HEADS, HEAD_DIM**-0.5, 54, 10)

    exact = cls_attention_row(queries[:, 0].float(), keys.float(), HEADS, HEAD_DIM**-0.5).sum(1)[0]
    fp16 = reference_cls_scores(queries, keys, HEADS, HEAD_DIM**-0.5)[0]  # patch j at fp16[j - 1]
    assert exact[170] > exact[124] and exact[170] - exact[124] < 3.05e-5
    assert fp16[170 - 1] == fp16[124 - 1] == torch.tensor(0.04083251953125, dtype=torch.float16)

    kept32, kept16 = set(f32.dominant_index[0].tolist()), set(ref.dominant_index[0].tolist())
    assert kept32 - kept16 == {170} and kept16 - kept32 == {124}
    # the official code keeps what reference keeps, ties included
    assert_same_as_official(ref, official_from_projections(hidden, queries, keys, HEADS, HEAD_DIM**-0.5, 54, 10))
    # the patch one precision keeps whole, the other merges into a contextual token (rows 54..63)
    assert f32.slot[0, 124] >= 54 and ref.slot[0, 170] >= 54


def test_without_ties_the_precisions_agree_on_the_dominant_patches():
    hidden, queries, keys = random_projections(0)
    f32 = float32_select(hidden, queries, keys, 54, 10)
    ref = visionzip_select_reference(hidden, queries, keys, HEADS, HEAD_DIM**-0.5, 54, 10)
    assert torch.equal(f32.dominant_index, ref.dominant_index)


@pytest.fixture(scope="module")
def tiny_fp16():
    """The tiny LLaVA-1.5 in fp16 with an eager tower, as the official code runs it."""
    from visionzip_eval.backends.llava_hf import build_tiny_llava

    model, processor = build_tiny_llava(seed=0, attn_implementation="eager")
    return model.half(), processor


def test_reference_on_the_model_is_the_official_computation(tiny_fp16):
    """Model path: VisionZip(selection_precision=reference) on real photos equals the official
    code applied to the same layer-L inputs (its q_proj / k_proj on that layer's normed input)."""
    from visionzip_eval.testing import sample_images

    model, processor = tiny_fp16
    pixel_values = processor.image_processor(list(sample_images().values()), return_tensors="pt")["pixel_values"].half()
    backend = backend_for(model)
    layer = backend.layers[backend.layer_index]
    seen = {}
    handle = layer.layer_norm1.register_forward_hook(lambda module, args, output: seen.update(normed=output))
    try:
        with torch.no_grad():
            hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
            queries, keys = layer.self_attn.q_proj(seen["normed"]), layer.self_attn.k_proj(seen["normed"])
    finally:
        handle.remove()
    attn = layer.self_attn
    differ = 0
    for dominant, contextual in ((54, 10), (108, 20), (162, 30)):
        with torch.no_grad():
            ours = get_method("visionzip", f"{dominant}+{contextual}", selection_precision="reference").select(model, pixel_values)
            default = get_method("visionzip", f"{dominant}+{contextual}").select(model, pixel_values)
        official = official_from_projections(hidden, queries, keys, attn.num_heads, attn.scale, dominant, contextual)
        assert_same_as_official(ours, official)
        differ += int((ours.dominant_index != default.dominant_index).any(dim=1).sum())
    assert differ > 0  # on these photos fp16 ranking keeps other patches than float32 somewhere


def test_option_parsing_defaults_and_refusals():
    assert VisionZip().selection_precision == "float32"
    spec = MethodSpec.parse("visionzip,selection_precision=reference")
    assert spec.label == "visionzip,selection_precision=reference"
    assert spec.build(64).selection_precision == "reference"
    assert MethodSpec.parse("visionzip", selection_precision="float32").label == "visionzip"
    with pytest.raises(ValueError, match=r"option selection_precision must be 'float32'/'reference', got 'fp16'") as bad:
        MethodSpec.parse("visionzip", selection_precision="fp16")
    assert "\n" not in str(bad.value)
    with pytest.raises(ValueError, match="drop merge=average or use selection_precision=float32"):
        get_method("visionzip", 64, merge="average", selection_precision="reference")


def test_reference_refuses_a_tower_without_cls():
    class NoCls:
        cls_token = False
        tower_tokens = 729
        name = "SigLIP"

    with pytest.raises(ValueError, match="has no CLS token: use selection_precision=float32"):
        get_method("visionzip", 64, selection_precision="reference").check(NoCls())
    get_method("visionzip", 64).check(NoCls())  # float32 ranks by received attention there
