"""Self-checks of the FastV reference transcription in ``official_fastv.py``.

The ``_official_*`` functions below are copied from pkunlp-icler/FastV at commit
d1659729b5bf1be225e99ee15783deeea80f63b1 (only wrapped in a function; the body lines are
verbatim apart from indentation and the inputs they read; two edits: ML:785 drops
``device=inputs_embeds.device`` and LM:124 reads ``last_attention`` instead of
``self.last_attention``):
  * ``_official_ml_inplace``  <- src/transformers/src/transformers/models/llama/modeling_llama.py:738-750  (ML)
  * ``_official_ml_mask``     <- same file :775-787 (masking variant, the 2D mask before expansion)
  * ``_official_hf``          <- src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py:1074-1086
  * ``_official_lmms``        <- src/FastV/lmms-eval/fastv_kvcache.py:124-127  (LM)
"""

import pytest
import torch
from official_fastv import (
    equivalent_tokens,
    keep_count_hf,
    keep_count_lmms,
    kept_for_equivalent_budget,
    official_fastv_keep,
)


# ----------------------------------------------------------------------------- helpers
def _uniform_causal(num_layers, heads, length):
    """Causal attention where every query spreads its mass uniformly over visible keys."""
    tri = torch.tril(torch.ones(length, length, dtype=torch.float64))
    probs = tri / tri.sum(-1, keepdim=True)
    return [probs.expand(1, heads, length, length).clone() for _ in range(num_layers)]


def _random_causal(num_layers, heads, length, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    out = []
    for _ in range(num_layers):
        logits = torch.randn(1, heads, length, length, generator=g, dtype=torch.float64) * 3
        out.append(torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1))
    return out


def _set_last_row(attn, head, values):
    """Overwrite the last query row of one head with ``values`` (a dict position -> mass), renormalised."""
    length = attn.shape[-1]
    row = torch.full((length,), 1e-3, dtype=torch.float64)
    for pos, v in values.items():
        row[pos] = v
    attn[0, head, -1] = row / row.sum()


# ----------------------------------------------------------------------------- copied official code
def _official_ml_inplace(layer_outputs, SYS_LENGTH, IMAGE_TOKEN_LENGTH, ATTENTION_RANK, seq_length_with_past, device="cpu"):
    last_layer_attention = layer_outputs[1]
    # compute average attention over different head
    last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
    # generate new attention mask based on the average attention, sample the top ATTENTION_RANK tokens with highest attention
    last_layer_attention_avg_last_tok = last_layer_attention_avg[-1]
    # get the attention in image token
    last_layer_attention_avg_last_tok_image = last_layer_attention_avg_last_tok[SYS_LENGTH:SYS_LENGTH+IMAGE_TOKEN_LENGTH]
    # get the indexs of the top ATTENTION_RANK tokens
    top_attention_rank_index = last_layer_attention_avg_last_tok_image.topk(ATTENTION_RANK).indices + SYS_LENGTH
    # keep index
    keep_indexs = torch.cat( (torch.arange(SYS_LENGTH,device=device), top_attention_rank_index, torch.arange(SYS_LENGTH+IMAGE_TOKEN_LENGTH,seq_length_with_past,device=device)))
    # sort index
    keep_indexs = keep_indexs.sort().values
    return keep_indexs


def _official_ml_mask(layer_outputs, SYS_LENGTH, IMAGE_TOKEN_LENGTH, ATTENTION_RANK, batch_size, seq_length_with_past):
    last_layer_attention = layer_outputs[1]
    # compute average attention over different head
    last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
    # generate new attention mask based on the average attention, sample the top ATTENTION_RANK tokens with highest attention
    last_layer_attention_avg_last_tok = last_layer_attention_avg[-1]
    # get the attention in image token
    last_layer_attention_avg_last_tok_image = last_layer_attention_avg_last_tok[SYS_LENGTH:SYS_LENGTH+IMAGE_TOKEN_LENGTH]
    # get the indexs of the top ATTENTION_RANK tokens
    top_attention_rank_index = last_layer_attention_avg_last_tok_image.topk(ATTENTION_RANK).indices + SYS_LENGTH
    # generate new attention mask
    gen_attention_mask = torch.ones((batch_size, seq_length_with_past), dtype=torch.bool)
    gen_attention_mask[:,SYS_LENGTH:SYS_LENGTH+IMAGE_TOKEN_LENGTH] = False
    gen_attention_mask[:,top_attention_rank_index] = True
    return gen_attention_mask


def _official_hf(layer_outputs, FASTV_image_token_start_index, FASTV_image_token_length, FASTV_r, seq_length_with_past, device="cpu"):
    last_layer_attention = layer_outputs[1]
    # compute average attention over different head
    last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
    # generate new attention mask based on the average attention, sample the top ATTENTION_RANK tokens with highest attention
    last_layer_attention_avg_last_tok = last_layer_attention_avg[-1]
    # get the attention in image token
    last_layer_attention_avg_last_tok_image = last_layer_attention_avg_last_tok[FASTV_image_token_start_index:FASTV_image_token_start_index+FASTV_image_token_length]
    # get the indexs of the top ATTENTION_RANK tokens
    top_attention_rank_index = last_layer_attention_avg_last_tok_image.topk(round(FASTV_image_token_length*(1-FASTV_r))).indices + FASTV_image_token_start_index
    # keep index
    keep_indexs = torch.cat( (torch.arange(FASTV_image_token_start_index,device=device), top_attention_rank_index, torch.arange(FASTV_image_token_start_index+FASTV_image_token_length,seq_length_with_past,device=device)))
    # sort index
    keep_indexs = keep_indexs.sort().values
    return keep_indexs


def _official_lmms(last_attention, ratio, seq_length, device="cpu"):
    image_attention_score = last_attention.mean(dim=1)[0][-1][35:611]
    top_attention_rank_index = image_attention_score.topk(int(576 * ratio)).indices + 35
    keep_indexs = torch.cat((torch.arange(35,device=device), top_attention_rank_index, torch.arange(611,seq_length,device=device)))
    keep_indexs = keep_indexs.sort().values
    return keep_indexs


# ----------------------------------------------------------------------------- hand-made cases
def test_most_attended_image_token_is_kept():
    att = _uniform_causal(num_layers=3, heads=2, length=12)  # image = positions 3..8
    for h in range(2):
        _set_last_row(att[1], h, {6: 0.5})
    kept = official_fastv_keep(att, image_start=3, image_len=6, keep=1, k=2)
    assert kept.tolist() == [0, 1, 2, 6, 9, 10, 11]
    assert kept.dtype == torch.long


def test_scores_come_from_layer_k_minus_1_not_k():
    att = _uniform_causal(num_layers=4, heads=2, length=10)  # image = 2..7
    for h in range(2):
        _set_last_row(att[1], h, {4: 0.6})  # layer k-1 (k=2) prefers 4
        _set_last_row(att[2], h, {7: 0.6})  # layer k prefers 7
        _set_last_row(att[0], h, {2: 0.6})  # layer 0 prefers 2
    assert official_fastv_keep(att, 2, 6, keep=1, k=2).tolist() == [0, 1, 4, 8, 9]
    assert official_fastv_keep(att, 2, 6, keep=1, k=3).tolist() == [0, 1, 7, 8, 9]
    assert official_fastv_keep(att, 2, 6, keep=1, k=1).tolist() == [0, 1, 2, 8, 9]


def test_only_the_last_query_row_matters():
    att = _uniform_causal(num_layers=2, heads=1, length=9)  # image = 1..5
    att[1][0, 0, 6] = 0.0
    att[1][0, 0, 6, 2] = 1.0  # row 6 (not last) puts all mass on image position 2
    _set_last_row(att[1], 0, {5: 0.4})
    assert official_fastv_keep(att, 1, 5, keep=1, k=2).tolist() == [0, 5, 6, 7, 8]


def test_heads_are_averaged_not_maxed():
    att = _uniform_causal(num_layers=2, heads=2, length=8)  # image = 1..4
    # head 0: a=pos1 0.6, b=pos2 0.3 ; head 1: a 0.0, b 0.5  -> mean a=0.3 < b=0.4 (max would pick a)
    att[1][0, 0, -1] = torch.tensor([0.05, 0.6, 0.3, 0.0, 0.0, 0.0, 0.0, 0.05], dtype=torch.float64)
    att[1][0, 1, -1] = torch.tensor([0.25, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.25], dtype=torch.float64)
    assert official_fastv_keep(att, 1, 4, keep=1, k=2).tolist() == [0, 2, 5, 6, 7]


@pytest.mark.parametrize("keep", [0, 1, 3, 6])
def test_counts_and_text_always_kept(keep):
    att = _random_causal(num_layers=3, heads=4, length=15, seed=keep)
    kept = official_fastv_keep(att, image_start=4, image_len=6, keep=keep, k=2)
    assert len(kept) == 15 - 6 + keep
    assert set(range(4)) | set(range(10, 15)) <= set(kept.tolist())
    assert torch.equal(kept, kept.sort().values)
    assert len(set(kept.tolist())) == len(kept)


def test_ties_break_to_earlier_position():
    att = _uniform_causal(num_layers=2, heads=3, length=10)  # last row uniform -> all image scores tie
    assert official_fastv_keep(att, 2, 6, keep=3, k=2).tolist() == [0, 1, 2, 3, 4, 8, 9]


def test_rejects_bad_arguments():
    att = _uniform_causal(num_layers=2, heads=1, length=8)
    with pytest.raises(ValueError):
        official_fastv_keep(att, 1, 4, keep=2, k=0)
    with pytest.raises(ValueError):
        official_fastv_keep(att, 1, 4, keep=5, k=2)
    with pytest.raises(ValueError):
        official_fastv_keep(att, 5, 4, keep=1, k=2)
    with pytest.raises(ValueError):
        official_fastv_keep(att, 1, 4, keep=1, k=3)


def test_count_helpers_and_budget_mapping():
    assert keep_count_hf(576, 0.75) == 144  # demo-hf.py:17
    assert keep_count_hf(576, 0.5) == 288
    assert keep_count_hf(576, 0.778) == 128  # LightCompress fastv.yml:20
    assert keep_count_lmms(0.5) == 288  # fastv_kvcache.py:120,125
    assert keep_count_lmms(0.25) == 144
    assert int(equivalent_tokens(2, 144)) == 171  # SparseVLMs issue #12 arithmetic
    assert equivalent_tokens(2, 576) == 576
    for budget, expected in [(192, 166.4), (128, 98.13), (64, 29.87)]:
        r = kept_for_equivalent_budget(budget, k=2)
        assert r == pytest.approx(expected, abs=0.01)
        assert equivalent_tokens(2, r) == pytest.approx(budget)


# ----------------------------------------------------------------------------- vs copied official code
@pytest.mark.parametrize("seed", range(6))
def test_matches_official_modeling_llama_on_random_inputs(seed):
    g = torch.Generator().manual_seed(100 + seed)
    length = int(torch.randint(20, 60, (1,), generator=g))
    image_start = int(torch.randint(1, 8, (1,), generator=g))
    image_len = int(torch.randint(4, length - image_start - 2, (1,), generator=g))
    keep = int(torch.randint(0, image_len + 1, (1,), generator=g))
    k = int(torch.randint(1, 4, (1,), generator=g))
    att = _random_causal(num_layers=4, heads=5, length=length, seed=seed)

    ours = official_fastv_keep(att, image_start, image_len, keep, k=k)
    layer_outputs = (None, att[k - 1])  # what the loop holds when idx == k
    official = _official_ml_inplace(layer_outputs, image_start, image_len, keep, length)
    assert torch.equal(ours, official)

    mask = _official_ml_mask(layer_outputs, image_start, image_len, keep, 1, length)
    assert torch.equal(ours, mask[0].nonzero().flatten())


@pytest.mark.parametrize("drop_ratio", [0.5, 0.75, 0.778, 0.889, 0.667])
def test_matches_official_hf_fastv_forward(drop_ratio):
    length, start, img = 40, 5, 24
    att = _random_causal(num_layers=3, heads=4, length=length, seed=7)
    official = _official_hf((None, att[2]), start, img, drop_ratio, length)
    ours = official_fastv_keep(att, start, img, keep_count_hf(img, drop_ratio), k=3)
    assert torch.equal(ours, official)


def test_matches_official_lmms_eval_port():
    length = 35 + 576 + 12
    att = _random_causal(num_layers=3, heads=2, length=length, seed=3)
    for ratio in (0.5, 0.25, 1 / 9):
        official = _official_lmms(att[2], ratio, length)  # self.last_attention = layer K-1 = 2 (K=3)
        ours = official_fastv_keep(att, 35, 576, keep_count_lmms(ratio), k=3)
        assert torch.equal(ours, official)
