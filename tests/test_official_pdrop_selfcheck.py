"""Self-checks of the PyramidDrop reference (tests/official_pdrop.py) on hand-made tensors,
and against the official rank & drop body pasted below (Cooperx521/PyramidDrop
6444f304aee4b7edcb022839fb9e8cd07859704a, llava/model/modeling_llama_pdrop.py, "M")."""

import math

import pytest
import torch
from official_pdrop import (
    BUDGETS,
    LLAVA15_LAYER_LIST,
    LLAVA15_RATIO_LIST,
    lambda_for_average,
    official_pdrop_average,
    official_pdrop_counts,
    official_pdrop_layer_counts,
    official_pdrop_stage_keep,
    official_pdrop_stage_keep_from_attention,
)
from torch import nn

# --------------------------------------------------------------------------------------------
# Official code, pasted (M = llava/model/modeling_llama_pdrop.py @ 6444f304). Adaptations, marked
# "# adapted": ``self``/``self_attn`` attributes become arguments (transformers 5 attention
# modules have no ``num_heads``), batch size 1, inference branch only (M:1389-1392).
# --------------------------------------------------------------------------------------------


def rotate_half(x):  # M:205-209
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim=1):  # M:212-237
    cos = cos[position_ids].unsqueeze(unsqueeze_dim)
    sin = sin[position_ids].unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


class LlamaRotaryEmbedding(nn.Module):  # M:124-157 (transformers 4.37.2 API)
    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        inv_freq = 1.0 / (
            self.base ** (torch.arange(0, self.dim, 2).float().to(device) / self.dim)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._set_cos_sin_cache(
            seq_len=max_position_embeddings,
            device=self.inv_freq.device,
            dtype=torch.get_default_dtype(),
        )

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        t = torch.arange(
            self.max_seq_len_cached, device=device, dtype=self.inv_freq.dtype
        )
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)

    def forward(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=x.dtype)
        return (
            self.cos_cached[:seq_len].to(dtype=x.dtype),
            self.sin_cached[:seq_len].to(dtype=x.dtype),
        )


def official_rank_drop_one(
    query_states,
    key_states,
    eager_attention_mask,
    image_index,
    image_tokens,
    keep_length,
    prompt_len,
):
    """M:1366-1410 for one sample (inference). query_states/key_states: (H, L, d) rotated;
    eager_attention_mask: (1, L, L). Returns the index list the official torch.cat gathers."""
    cur_key_states = key_states
    cur_query_states = query_states
    cur_eager_attention_mask = eager_attention_mask
    head_dim = query_states.shape[-1]  # adapted: self_attn.head_dim

    prompt_total_len = prompt_len + image_tokens  # M:1390
    text_query_states = cur_query_states[:, prompt_total_len - 1, :].unsqueeze(
        1
    )  # M:1391
    text_eager_attention_mask = cur_eager_attention_mask[
        :, prompt_total_len - 1, :
    ].unsqueeze(1)  # M:1392

    # calculate attention map  (M:1395-1401)
    attn_weights = torch.matmul(
        text_query_states, cur_key_states.transpose(1, 2)
    ) / math.sqrt(head_dim)
    attn_weights = attn_weights + text_eager_attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(
        query_states.dtype
    )
    attention_avg_head = torch.mean(attn_weights, dim=0)  # ave across heads
    attention_avg_head = attention_avg_head[:, image_index : image_index + image_tokens]
    attention_avg_text = torch.mean(attention_avg_head, dim=0)

    # rank and drop by attention score  (M:1405-1410)
    top_rank_index = attention_avg_text.topk(keep_length).indices
    top_rank_index = top_rank_index + image_index
    top_rank_index = top_rank_index.sort().values
    start_index = image_index + image_tokens
    seq_len = key_states.shape[1]
    # adapted: the official code concatenates feature rows in this order; return their indices
    return torch.cat(
        [
            torch.arange(0, image_index),
            top_rank_index,
            torch.arange(start_index, seq_len),
        ]
    )


def official_query_keys(
    layer, features, position_ids, num_heads, num_key_value_heads, head_dim, rope_theta
):
    """M:1321-1342: the stage layer's (``self.layers[rank_layer]``) rotated q/k from ``features``
    (the output of layer rank_layer - 1). Adapted: attributes passed in; 4.37 rotary class above."""
    hidden_states = features.clone().detach()
    self_attn = layer.self_attn
    hidden_states = layer.input_layernorm(hidden_states)
    bsz, q_len, _ = hidden_states.size()
    query_states = self_attn.q_proj(hidden_states)
    key_states = self_attn.k_proj(hidden_states)
    value_states = self_attn.v_proj(hidden_states)
    query_states = query_states.view(bsz, q_len, num_heads, head_dim).transpose(1, 2)
    key_states = key_states.view(bsz, q_len, num_key_value_heads, head_dim).transpose(
        1, 2
    )
    value_states = value_states.view(
        bsz, q_len, num_key_value_heads, head_dim
    ).transpose(1, 2)
    kv_seq_len = key_states.shape[-2]
    rotary_emb = LlamaRotaryEmbedding(
        head_dim, base=rope_theta
    )  # adapted: 4.37 self_attn.rotary_emb
    cos, sin = rotary_emb(value_states, seq_len=kv_seq_len)
    query_states, key_states = apply_rotary_pos_emb(
        query_states, key_states, cos, sin, position_ids
    )
    return query_states, key_states


def _causal_row_mask(seq_len, dtype=torch.float64):
    """M:1346-1348: ``_prepare_4d_causal_attention_mask`` (transformers 4.37.2) of an all-ones 2D
    mask, (1, 1, L, L): 0 where key j <= query i, ``finfo(dtype).min`` above the diagonal (its
    ``_make_causal_mask``; the expanded all-ones padding mask adds 0). Built by hand because the
    deprecated helper in transformers 5 cannot build a float64 mask."""
    mask = torch.full((seq_len, seq_len), torch.finfo(dtype).min, dtype=dtype)
    cond = torch.arange(seq_len)
    mask.masked_fill_(cond < (cond + 1).view(seq_len, 1), 0)
    return mask[None, None]


# --------------------------------------------------------------------------------------------
# Counts and budgets
# --------------------------------------------------------------------------------------------


def test_llava15_counts_and_average():
    assert official_pdrop_counts(576, LLAVA15_LAYER_LIST, LLAVA15_RATIO_LIST) == [
        576,
        288,
        144,
        72,
    ]
    assert official_pdrop_counts(576, LLAVA15_LAYER_LIST, 0.5) == [576, 288, 144, 72]
    per_layer = official_pdrop_layer_counts(576, LLAVA15_LAYER_LIST, 0.5)
    assert len(per_layer) == 32
    assert per_layer[7] == 576 and per_layer[8] == 288 and per_layer[15] == 288
    assert per_layer[16] == 144 and per_layer[24] == 72 and per_layer[31] == 72
    assert official_pdrop_average(576, LLAVA15_LAYER_LIST, 0.5) == 270.0
    # 13B (40 layers) with the same scripts: the last stage is 16 layers long
    assert (
        official_pdrop_average(576, LLAVA15_LAYER_LIST, 0.5, num_layers=40)
        == (8 * (576 + 288 + 144) + 16 * 72) / 40
    )


def test_counts_truncate_from_original_count():
    # int(n0 * r_k), not int(prev * lambda): 0.19 -> 109.44, 20.79, 3.95
    assert official_pdrop_counts(576, (2, 8, 16), 0.19) == [576, 109, 20, 3]
    assert official_pdrop_counts(576, (2, 8, 16), [0.19, 0.0361, 0.006859]) == [
        576,
        109,
        20,
        3,
    ]
    assert official_pdrop_counts(10, (1,), [0.39]) == [10, 3]  # 3.9 truncates to 3


@pytest.mark.parametrize("target", [192, 128, 64])
def test_budget_table(target):
    layer_list, lam, counts, average = BUDGETS[target]
    assert official_pdrop_counts(576, layer_list, lam) == list(counts)
    assert official_pdrop_average(576, layer_list, lam) == pytest.approx(average)
    assert abs(average - target) < 1.5
    assert lambda_for_average(target, layer_list) == pytest.approx(lam, abs=0.01)


def test_low_budgets_unreachable_with_8_16_24():
    assert (
        official_pdrop_average(576, LLAVA15_LAYER_LIST, 0.0) == 144.0
    )  # floor for any lambda
    with pytest.raises(ValueError):
        lambda_for_average(128, LLAVA15_LAYER_LIST)
    lam = lambda_for_average(192, LLAVA15_LAYER_LIST)
    assert 0.25 < lam < 0.26


# --------------------------------------------------------------------------------------------
# The stage cut on hand-made tensors
# --------------------------------------------------------------------------------------------


def _onehot_query_keys(seq_len, head_dim, logits_per_head):
    """q = e_0 * sqrt(d), k[:, j] = e_0 * logit: q.k/sqrt(d) == logit exactly."""
    heads = len(logits_per_head)
    q = torch.zeros(heads, head_dim, dtype=torch.float64)
    q[:, 0] = math.sqrt(head_dim)
    k = torch.zeros(heads, seq_len, head_dim, dtype=torch.float64)
    for h, logits in enumerate(logits_per_head):
        for j, value in logits.items():
            k[h, j, 0] = value
    return q, k


def test_highest_attended_image_token_kept():
    # sequence: 2 text, 5 image (2..6), 2 text; query = last token (8)
    q, k = _onehot_query_keys(9, 4, [{4: 3.0, 6: 1.0}, {4: 2.5, 6: 2.0}])
    image = torch.arange(2, 7)
    assert official_pdrop_stage_keep(q, k, image, 1).tolist() == [0, 1, 4, 7, 8]
    assert official_pdrop_stage_keep(q, k, image, 2).tolist() == [0, 1, 4, 6, 7, 8]
    assert official_pdrop_stage_keep(q, k, image, 0).tolist() == [0, 1, 7, 8]
    assert official_pdrop_stage_keep(q, k, image, 5).tolist() == list(range(9))


def test_head_mean_of_probabilities_not_of_logits():
    # token 3: head0 logit 10, head1 -10 (mean logit 0); token 4: logit 2 in both heads.
    # mean of softmax probabilities favours 3 (~0.5 vs ~0.33); mean of logits would favour 4.
    q, k = _onehot_query_keys(8, 2, [{3: 10.0, 4: 2.0}, {3: -10.0, 4: 2.0}])
    assert official_pdrop_stage_keep(q, k, torch.arange(2, 6), 1).tolist() == [
        0,
        1,
        3,
        6,
        7,
    ]


def test_ties_earlier_position_wins():
    q, k = _onehot_query_keys(7, 2, [{2: 1.0, 3: 1.0, 4: 1.0}])
    assert official_pdrop_stage_keep(q, k, torch.arange(1, 6), 2).tolist() == [
        0,
        2,
        3,
        6,
    ]


def test_causal_mask_and_query_position():
    # query at position 5: keys 6.. are invisible; image tokens 1..4
    q, k = _onehot_query_keys(8, 2, [{2: 1.0, 3: 4.0, 7: 50.0}])
    assert official_pdrop_stage_keep(
        q, k, torch.arange(1, 5), 1, query_position=5
    ).tolist() == [0, 3, 5, 6, 7]


def test_attention_map_variant_matches_qk_variant():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        heads, seq_len, dim = 3, 17, 8
        q_all = torch.randn(heads, seq_len, dim, generator=g, dtype=torch.float64)
        k = torch.randn(heads, seq_len, dim, generator=g, dtype=torch.float64)
        logits = (
            q_all @ k.transpose(1, 2) / math.sqrt(dim) + _causal_row_mask(seq_len)[0]
        )
        att = torch.softmax(logits, dim=-1).unsqueeze(0)  # (1, H, L, L) like HF eager
        image = torch.arange(3, 13)
        for keep in (0, 1, 4, 10):
            a = official_pdrop_stage_keep(q_all[:, -1], k, image, keep)
            b = official_pdrop_stage_keep_from_attention(att, image, keep)
            assert a.tolist() == b.tolist()


# --------------------------------------------------------------------------------------------
# Against the pasted official body
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_matches_official_snippet_random(seed):
    g = torch.Generator().manual_seed(seed)
    heads, dim = 4, 8
    image_index, image_tokens, tail = 5, 24, 7
    prompt_len = image_index + tail  # text ids only (A:429: placeholder excluded)
    seq_len = prompt_len + image_tokens
    q = torch.randn(heads, seq_len, dim, generator=g, dtype=torch.float64)
    k = torch.randn(heads, seq_len, dim, generator=g, dtype=torch.float64)
    mask = _causal_row_mask(seq_len)[0]  # eager_attention_mask[i]: (1, L, L)
    image = torch.arange(image_index, image_index + image_tokens)
    for keep in (1, 6, 12, 23, 24):
        official = official_rank_drop_one(
            q, k, mask, image_index, image_tokens, keep, prompt_len
        )
        ours = official_pdrop_stage_keep(q[:, seq_len - 1], k, image, keep)
        assert official.tolist() == ours.tolist()


def test_official_stage_scores_are_the_stage_layers_eager_attention():
    """M:1321-1342 + 1394-1410 on a tiny float64 Llama: the official scores for a cut at
    rank_layer = 1 (after layer 0) equal HF eager ``attentions[1]`` (layer 1, the first layer
    of the new stage), last row - and the reference fed either way agrees."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaModel(config).double().eval()
    head_dim = config.hidden_size // config.num_attention_heads
    rope_theta = (
        getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    )
    image_index, image_tokens, tail = 3, 20, 6
    seq_len = image_index + image_tokens + tail
    embeds = torch.randn(1, seq_len, config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        out = model(
            inputs_embeds=embeds, output_hidden_states=True, output_attentions=True
        )
        features = out.hidden_states[1]  # output of layer 0 = input of layer 1
        position_ids = torch.arange(seq_len).unsqueeze(0)
        q, k = official_query_keys(
            model.layers[1],
            features,
            position_ids,
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim,
            rope_theta,
        )
    mask = _causal_row_mask(seq_len)[0]
    image = torch.arange(image_index, image_index + image_tokens)
    for keep in (1, 5, 10):
        official = official_rank_drop_one(
            q[0], k[0], mask, image_index, image_tokens, keep, seq_len - image_tokens
        )
        from_attention = official_pdrop_stage_keep_from_attention(
            out.attentions[1], image, keep
        )
        from_qk = official_pdrop_stage_keep(q[0, :, -1], k[0], image, keep)
        assert official.tolist() == from_attention.tolist() == from_qk.tolist()
