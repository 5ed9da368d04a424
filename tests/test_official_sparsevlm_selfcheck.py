"""Self-checks of tests/official_sparsevlm.py (the loop-based SparseVLM v1 reference).

The official functions below are pasted from github.com/Gumpest/SparseVLMs at
b72c5d62fa7004c2f1440c75975981bddf6c66c7 (v1) unless marked 535f8ba (March 2025); the
forward-loop block is wrapped into a function with the same variable names.
"""

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: F401  (used by the pasted code's module)

from official_sparsevlm import (
    MAR2025_RETAIN,
    V1_PRUNING_LAYERS,
    mar2025_visual_counts,
    official_cluster_and_merge,
    official_prune_counts,
    official_sparsevlm_layer,
    official_text_raters,
    official_v1_keep_count,
    official_visual_counts,
)

ein = pytest.importorskip("einops")


# ---------------------------------------------------------------- pasted official code
# llava/model/language_model/score.py:23-44 (b72c5d6)
def attn_postprocess_rank(self_attn_weights, v_token_start, v_token_num, text_token_start, t_token_idx, scale, bias):
    '''
    self_attn_weights: [B, H, L, L]
    '''
    self_attn_weights = self_attn_weights.mean(1) # B, L[Q], L[K]

    t_token_idx = t_token_idx[1] + text_token_start
    relation_vis_text = self_attn_weights[:, t_token_idx, v_token_start: v_token_start+v_token_num] # B, L2, L1

    rank = torch.linalg.matrix_rank(relation_vis_text.float()) # rank
    relation_vis_text = relation_vis_text.mean(1) # B, L1

    s_flag = True # layer needs sparsification or not
    if v_token_num - rank.item() != 0:
        mask = torch.zeros_like(relation_vis_text, dtype=bool)
        _, indices = torch.topk(relation_vis_text, min(int(rank.item() * scale + bias), v_token_num - 1), dim=1)
        mask[0][indices] = 1
    else:
        mask = torch.ones_like(relation_vis_text, dtype=bool)
        s_flag = False

    return mask, s_flag, relation_vis_text


# llava/model/language_model/score.py:5-40 (535f8ba, March 2025 dict version)
layer_dict = {2:0,6:1,15:2}     #

sparse_token_list_192 = [300,200,110]       # 2*576  4*300 10*200  16*110
sparse_token_list_128 = [303,110,36]
sparse_token_list_64 = [66,30,17]

sparse_token_dict = {
    192: sparse_token_list_192,
    128: sparse_token_list_128,
    64 : sparse_token_list_64
}

def attn_postprocess_topk(self_attn_weights, v_token_start, v_token_num, text_token_start, t_token_idx, layer_idx,retained_tokens):
    '''
    self_attn_weights: [B, H, L, L]
    '''
    self_attn_weights = self_attn_weights.mean(1) # B, L[Q], L[K]

    t_token_idx = t_token_idx[1] + text_token_start
    relation_vis_text = self_attn_weights[:, t_token_idx , v_token_start: v_token_start+v_token_num] # B, L2, L1

    relation_vis_text = relation_vis_text.mean(1) # B, L1

    relation_vis = relation_vis_text
    s_flag = True       # s_flag controls whether token merge is needed.

    sparse_token_list = sparse_token_dict[retained_tokens]

    if v_token_num != 0:
        mask = torch.zeros_like(relation_vis, dtype=bool)
        _, indices = torch.topk(relation_vis, min(sparse_token_list[layer_dict[layer_idx]], v_token_num - 1), dim=1)
        mask[0][indices] = 1
    else:
        mask = torch.ones_like(relation_vis_text, dtype=bool)
        s_flag = False
    return mask, s_flag, relation_vis_text


# llava/model/language_model/utils.py:25-50 (b72c5d6)
def batch_index_select(x, idx):

    if len(x.size()) == 4:
        B, H, N, C = x.size()
        N_new = idx.size(1)
        offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
        idx = idx + offset
        out = x.reshape(B*N, H, C)[idx.reshape(-1)].reshape(B, H, N_new, C)
        return out
    elif len(x.size()) == 3:
        # in this condition
        B, N, C = x.size()
        N_new = idx.size(1)
        offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
        idx = idx + offset
        out = x.reshape(B*N, C)[idx.reshape(-1)].reshape(B, N_new, C)
        return out
    elif len(x.size()) == 2:
        B, N = x.size()
        N_new = idx.size(1)
        offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
        idx = idx + offset
        out = x.reshape(B*N)[idx.reshape(-1)].reshape(B, N_new)
        return out
    else:
        raise NotImplementedError


# llava/model/language_model/utils.py:135-213 (b72c5d6)
def index_points(points, idx):
    """Sample features following the index.
    Returns:
        new_points:, indexed points data, [B, S, C]

    Args:
        points: input points data, [B, N, C]
        idx: sample index data, [B, S]
    """
    device = points.device
    B = points.shape[0]
    view_shape = list(idx.shape)
    view_shape[1:] = [1] * (len(view_shape) - 1)
    repeat_shape = list(idx.shape)
    repeat_shape[0] = 1
    batch_indices = torch.arange(B, dtype=torch.long).to(device).view(view_shape).repeat(repeat_shape)
    new_points = points[batch_indices, idx, :]
    return new_points


def cluster_and_merge(x, cluster_num):
    B, N, C = x.shape

    x1 = ein.rearrange(x, "b l r -> b l () r")
    x2 = ein.rearrange(x, "b l r -> b () l r")
    distance = (x1 - x2).norm(dim=-1, p=2)
    dist_matrix = distance / (C ** 0.5)
    # get local density
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    # add a little noise to ensure no tokens have the same density.
    density = density + torch.rand(
        density.shape, device=density.device, dtype=density.dtype) * 1e-6

    # get distance indicator
    mask = density[:, None, :] > density[:, :, None]
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)

    # select clustering center according to score
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)

    # assign tokens to the nearest center
    dist_matrix = index_points(dist_matrix, index_down)

    idx_cluster = dist_matrix.argmin(dim=1)

    # make sure cluster center merge to itself
    idx_batch = torch.arange(B, device=x.device)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num, device=x.device)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)

    # merge tokens
    B, N, C = x.shape
    device = dist_matrix.device
    idx_token = torch.arange(N)[None, :].repeat(B, 1).to(device)
    agg_weight = x.new_ones(B, N, 1)

    token_weight = x.new_ones(B, N, 1)

    idx_batch = torch.arange(B, device=x.device)[:, None]
    idx = idx_cluster + idx_batch * cluster_num

    all_weight = token_weight.new_zeros(B * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(B * N),
                            source=token_weight.reshape(B * N, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]        #

    # average token features
    x_merged = x.new_zeros(B * cluster_num, C)
    source = x * norm_weight
    x_merged.index_add_(dim=0, index=idx.reshape(B * N),
                        source=source.reshape(B * N, C).type(x.dtype))
    x_merged = x_merged.reshape(B, cluster_num, C)

    return x_merged


# modelling_sparse_llama.py:216-220 (b72c5d6)
def official_raters_block(hidden_states, v_token_start, text_token_start):
    v_t = hidden_states[:, v_token_start: text_token_start, :]
    t_t = hidden_states[:, text_token_start: , :]
    m_v_t = v_t @ t_t.transpose(1, 2) # [1, 576, 53]
    m_v_t = m_v_t.softmax(2).mean(1) # [1, 53]
    t_token_idx = torch.where(m_v_t > m_v_t.mean())
    return t_token_idx


# modelling_sparse_llama.py:235-293 (b72c5d6), body verbatim; `retained_tokens is not None`
# swaps in the 535f8ba rule (535f8ba MSL:267 and its extra `total_sparse_token_idx.shape[1]>0`
# at :281, always true there because k <= n_vis - 1).
def official_prune_block(layer_outputs, hidden_states, position_ids, v_token_start, v_token_num, text_token_start,
                         t_token_idx, image_shape, pre_prompt_length_list, scale=13.5, bias=0.0,
                         layer_idx=2, retained_tokens=None):
    B = hidden_states.shape[0]
    attn_logits = layer_outputs[2]

    if retained_tokens is None:
        pred_score_vis, s_flag, relation_vis_text = attn_postprocess_rank(attn_logits, v_token_start, v_token_num, \
            text_token_start, t_token_idx, scale=scale, bias=bias) # B, L_v
    else:
        pred_score_vis, s_flag, relation_vis_text = attn_postprocess_topk(attn_logits, v_token_start, v_token_num, text_token_start, t_token_idx, layer_idx,retained_tokens) # B, L_v

    policy = torch.ones(B, hidden_states.shape[1], dtype=hidden_states.dtype, device=hidden_states.device)
    policy[:, v_token_start:text_token_start] = pred_score_vis.type(dtype = hidden_states.dtype)

    for batch in range(len(pre_prompt_length_list)):
        # keep pre prompt
        prompt_length = pre_prompt_length_list[batch]
        policy[batch,:prompt_length,] = 1
        # keep question
        text_token_start = prompt_length + image_shape
        policy[batch, text_token_start:,] = 1

    # Recycle: Section 3.3
    if s_flag:
        total_sparse_token_idx = torch.where(policy == 0)[1].unsqueeze(0)
        total_sparse_token = batch_index_select(layer_outputs[0], total_sparse_token_idx)

        merge_token_idx_stage1 = torch.where(pred_score_vis==0)[1]
        merge_token_stage1 = relation_vis_text[0][merge_token_idx_stage1]
        merge_token_num_stage1 = int(merge_token_idx_stage1.shape[0] * 0.3 ) + 1 # Top 30%
        merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]

        merge_token_stage2 = total_sparse_token[:,merge_token_stage2_idx,:]
        cluster_num = int(merge_token_stage2.shape[1] / 10) + 1       # 1/10
        if (cluster_num == 0) :
            cluster_num = merge_token_stage2.shape[1]

        merge_sparse_token = cluster_and_merge(merge_token_stage2, cluster_num)

        select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)  # B, L_new
        select_token = batch_index_select(layer_outputs[0], select_token_idx)
        select_vis_token_num = pred_score_vis.sum()
        select_and_merge_token = torch.cat((select_token[:,:v_token_start+select_vis_token_num,:] ,
                merge_sparse_token,
                select_token[:,v_token_start+select_vis_token_num:,:])
                ,dim=1
        )

        layer_outputs = (select_and_merge_token, layer_outputs[1])  # B, L, C
        position_ids = position_ids[:, :len(select_token_idx[0])+cluster_num]
        prev_decision = policy
        # update
        v_token_num = pred_score_vis.sum() + cluster_num # B == 1
        # print(layer_idx, v_token_num)
        text_token_start = v_token_start + v_token_num
    else:
        select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)  # B, L_new
        layer_outputs = (batch_index_select(layer_outputs[0], select_token_idx), layer_outputs[1])  # B, L, C
        position_ids = position_ids[:, :len(select_token_idx[0])]
        prev_decision = policy

        # update
        v_token_num = pred_score_vis.sum() # B == 1
        # print(layer_idx, v_token_num)
        text_token_start = v_token_start + v_token_num
    return layer_outputs[0], position_ids, int(v_token_num), int(text_token_start), pred_score_vis


# ---------------------------------------------------------------- helpers
def _causal_attn(gen, heads, length):
    logits = torch.randn(1, heads, length, length, generator=gen, dtype=torch.float64)
    mask = torch.ones(length, length, dtype=torch.bool).triu(1)
    return logits.masked_fill(mask, float("-inf")).softmax(-1)


def _attn_with_scores(length, raters, v_start, scores, heads=2):
    """Attention whose rater rows give exactly `scores` on the visual block (head- and rater-mean)."""
    attn = torch.zeros(1, heads, length, length, dtype=torch.float64)
    for r in raters:
        for h in range(heads):
            attn[0, h, r, v_start:v_start + len(scores)] = torch.tensor(scores, dtype=torch.float64)
    return attn


def _run_both(seed, length=40, v_start=3, n_vis=24, dim=8, heads=4, retain=None, scale=None, bias=0.0, image_shape=None,
              layer_idx=2):
    gen = torch.Generator().manual_seed(seed)
    attn = _causal_attn(gen, heads, length)
    hidden = torch.randn(1, length, dim, generator=gen, dtype=torch.float64)
    t0 = v_start + n_vis
    rel = torch.tensor(sorted(torch.randperm(length - t0, generator=gen)[:5].tolist()))
    t_token_idx = (torch.zeros_like(rel), rel)
    torch.manual_seed(1000 + seed)
    out, pos, nv, tstart, pred = official_prune_block(
        (hidden, None, attn), hidden, torch.arange(length).unsqueeze(0), v_start, n_vis, t0, t_token_idx,
        image_shape or n_vis, [v_start], scale=scale if scale is not None else 13.5, bias=bias,
        layer_idx=layer_idx, retained_tokens=retain)
    n_del = n_vis - int(pred.sum())
    noise = None
    if n_del:
        n_rec = int(n_del * 0.3) + 1
        torch.manual_seed(1000 + seed)
        noise = torch.rand((1, n_rec), dtype=torch.float64) * 1e-6
    if retain is None:
        ref = official_sparsevlm_layer(attn, hidden, torch.arange(v_start, t0), t0 + rel, scale=scale, bias=bias,
                                       density_noise=noise)
    else:
        k = sparse_token_dict[retain][layer_dict[layer_idx]]
        ref = official_sparsevlm_layer(attn, hidden, torch.arange(v_start, t0), t0 + rel, retain=k,
                                       density_noise=noise)
    return (out, pos, nv, tstart, pred), ref


# ---------------------------------------------------------------- tests vs pasted official code
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale,bias", [(2.0, 0.0), (0.8, 0.0), (1.5, 3.0), (9.0, 6.0)])
def test_rank_rule_matches_official(seed, scale, bias):
    (out, pos, nv, tstart, pred), ref = _run_both(seed, scale=scale, bias=bias)
    v_start, n_vis = 3, 24
    assert ref.rank == 5  # 5 generic rater rows -> full row rank
    kept_official = (torch.nonzero(pred[0]).flatten() + v_start).tolist()
    assert ref.kept_positions.tolist() == kept_official
    assert ref.new_num_visual == nv
    assert ref.new_hidden.shape == out.shape
    torch.testing.assert_close(ref.new_hidden, out, rtol=1e-12, atol=1e-12)
    assert torch.equal(ref.new_position_ids, pos)  # renumbered 0..L'-1
    assert tstart == v_start + nv


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [192, 128, 64])
@pytest.mark.parametrize("layer_idx", [2, 6, 15])
def test_retain_rule_matches_official_mar2025(seed, budget, layer_idx):
    n_vis = 400
    (out, pos, nv, _, pred), ref = _run_both(seed, length=420, v_start=5, n_vis=n_vis, dim=4, heads=2,
                                             retain=budget, layer_idx=layer_idx, image_shape=576)
    k = min(MAR2025_RETAIN[budget][(2, 6, 15).index(layer_idx)], n_vis - 1)
    assert ref.keep_count == k == int(pred.sum())
    assert nv == ref.new_num_visual == official_prune_counts(n_vis, k)["new_visual"]
    torch.testing.assert_close(ref.new_hidden, out, rtol=1e-12, atol=1e-12)
    assert torch.equal(ref.new_position_ids, pos)


def test_no_pruning_when_rank_equals_visual_count():
    (out, pos, nv, _, pred), ref = _run_both(0, length=20, v_start=2, n_vis=4, scale=13.5)
    assert ref.rank == 4 and not ref.pruned and nv == 4 and bool(pred.all())
    torch.testing.assert_close(ref.new_hidden, out)


def test_two_layers_chain_with_rebased_raters():
    """Rater indices are relative to the text start, which moves after pruning (score.py:29, MSL:283)."""
    gen = torch.Generator().manual_seed(7)
    length, v_start, n_vis, dim = 60, 4, 40, 6
    hidden = torch.randn(1, length, dim, generator=gen, dtype=torch.float64)
    rel = torch.tensor([1, 4, 9])
    t_idx = (torch.zeros_like(rel), rel)
    attn1 = _causal_attn(gen, 2, length)
    torch.manual_seed(3)
    out1, pos1, nv1, ts1, pred1 = official_prune_block((hidden, None, attn1), hidden, torch.arange(length)[None],
                                                       v_start, n_vis, v_start + n_vis, t_idx, n_vis, [v_start],
                                                       scale=4.0)
    n_rec = int((n_vis - int(pred1.sum())) * 0.3) + 1
    torch.manual_seed(3)
    r1 = official_sparsevlm_layer(attn1, hidden, torch.arange(v_start, v_start + n_vis), v_start + n_vis + rel,
                                  scale=4.0, density_noise=torch.rand(1, n_rec, dtype=torch.float64) * 1e-6)
    torch.testing.assert_close(r1.new_hidden, out1, rtol=1e-12, atol=1e-12)
    # second pruning layer on the shortened sequence
    h2 = out1 + 0.1 * torch.randn(out1.shape, generator=gen, dtype=torch.float64)
    attn2 = _causal_attn(gen, 2, h2.shape[1])
    torch.manual_seed(4)
    out2, pos2, nv2, _, pred2 = official_prune_block((h2, None, attn2), h2, pos1, v_start, nv1, ts1, t_idx, n_vis,
                                                     [v_start], scale=2.0)
    n_rec2 = int((nv1 - int(pred2.sum())) * 0.3) + 1
    torch.manual_seed(4)
    r2 = official_sparsevlm_layer(attn2, h2, torch.arange(v_start, v_start + r1.new_num_visual),
                                  v_start + r1.new_num_visual + rel, scale=2.0,
                                  density_noise=torch.rand(1, n_rec2, dtype=torch.float64) * 1e-6)
    assert r2.new_num_visual == nv2
    torch.testing.assert_close(r2.new_hidden, out2, rtol=1e-12, atol=1e-12)
    assert torch.equal(r2.new_position_ids, pos2)


@pytest.mark.parametrize("seed", range(5))
def test_cluster_and_merge_matches_official(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 23
    x = torch.randn(1, n, 5, generator=gen, dtype=torch.float64)
    x[0, 3:8] = x[0, 3] + 0.01 * torch.randn(5, 5, generator=gen, dtype=torch.float64)
    cn = int(n / 10) + 1
    torch.manual_seed(seed)
    official = cluster_and_merge(x, cn)
    torch.manual_seed(seed)
    noise = torch.rand((1, n), dtype=torch.float64) * 1e-6
    merged, _, _ = official_cluster_and_merge(x[0], cn, noise)
    torch.testing.assert_close(merged, official[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_text_raters_match_official(seed):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, 50, 6, generator=gen, dtype=torch.float64)
    official = official_raters_block(emb, 4, 4 + 30)
    ours = official_text_raters(emb, 4, 30)
    assert ours.tolist() == official[1].tolist()


# ---------------------------------------------------------------- hand-made checks
def test_counts_and_tie_break_retain_mode():
    v_start, n_vis, length = 2, 20, 26
    raters = [23, 25]
    scores = [0.0] * n_vis
    for i in (3, 7, 11):
        scores[i] = 0.5
    scores[15] = 0.5  # four-way tie for 3 slots: earlier positions win -> 3, 7, 11
    scores[0] = 0.1
    attn = _attn_with_scores(length, raters, v_start, scores)
    hidden = torch.arange(length * 2, dtype=torch.float64).reshape(1, length, 2)
    r = official_sparsevlm_layer(attn, hidden, torch.arange(v_start, v_start + n_vis), torch.tensor(raters),
                                 retain=3, merge_eps=0.0)
    assert r.kept_positions.tolist() == [v_start + 3, v_start + 7, v_start + 11]
    # 17 deleted, int(17*0.3)+1 = 6 recycled, int(6/10)+1 = 1 cluster
    assert len(r.deleted_positions) == 17
    assert r.recycled_positions.tolist()[:2] == [v_start + 15, v_start + 0]  # by score
    assert r.recycled_positions.tolist()[2:] == [v_start + 1, v_start + 2, v_start + 4, v_start + 5]  # ties: earlier
    assert r.new_num_visual == 4
    torch.testing.assert_close(r.merged_hidden[0], hidden[0, r.recycled_positions].mean(0))
    expected_src = [0, 1, 5, 9, 13, -1, 22, 23, 24, 25]
    assert r.source_positions.tolist() == expected_src
    assert r.new_position_ids.tolist() == [list(range(len(expected_src)))]
    torch.testing.assert_close(r.new_hidden[0, 5], r.merged_hidden[0])


def test_recycled_tokens_are_cluster_averages():
    """Two tight, far-apart groups among the recycled tokens -> 2 merged tokens = group means."""
    v_start, n_vis, length, dim = 1, 40, 44, 3
    raters = [42, 43]
    scores = [1.0 - 0.01 * i for i in range(n_vis)]  # strictly decreasing: keep 0..4
    attn = _attn_with_scores(length, raters, v_start, scores)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, length, dim, generator=gen, dtype=torch.float64)
    # 35 deleted (local 5..39), int(10.5)+1 = 11 recycled (local 5..15), 2 clusters
    group_a = list(range(5, 11))
    group_b = list(range(11, 16))
    for i in group_a:
        hidden[0, v_start + i] = torch.tensor([10.0, 0, 0]) + 0.01 * torch.randn(3, generator=gen, dtype=torch.float64)
    for i in group_b:
        hidden[0, v_start + i] = torch.tensor([-10.0, 0, 0]) + 0.01 * torch.randn(3, generator=gen, dtype=torch.float64)
    # cluster_num=2 -> the kNN density uses the single nearest neighbour, so mutual nearest
    # neighbours get EXACTLY equal densities; the official 1e-6 noise (utils.py:166) is what
    # breaks such ties. Without it both members of a pair keep delta = dist_max:
    r_tied = official_sparsevlm_layer(attn, hidden, torch.arange(v_start, v_start + n_vis), torch.tensor(raters),
                                      retain=5, merge_eps=0.0)
    assert set(r_tied.center_positions.tolist()) <= {v_start + i for i in group_b}  # both centres in one group
    noise = torch.arange(11, dtype=torch.float64) * 1e-9
    r = official_sparsevlm_layer(attn, hidden, torch.arange(v_start, v_start + n_vis), torch.tensor(raters),
                                 retain=5, merge_eps=0.0, density_noise=noise)
    assert r.recycled_positions.tolist() == [v_start + i for i in range(5, 16)]
    assert r.merged_hidden.shape == (2, dim)
    means = {tuple(hidden[0, [v_start + i for i in g]].mean(0).tolist()) for g in (group_a, group_b)}
    got = {tuple(m.tolist()) for m in r.merged_hidden}
    for m in got:
        assert any(all(abs(a - b) < 1e-12 for a, b in zip(m, e)) for e in means)
    assert len(got) == 2
    for ci in range(2):
        members = r.recycled_positions[r.cluster_assignment == ci]
        torch.testing.assert_close(r.merged_hidden[ci], hidden[0, members].mean(0))
    # merged tokens sit right after the kept visual tokens, before the text
    assert r.source_positions.tolist()[:1 + 5 + 2] == [0, 1, 2, 3, 4, 5, -1, -1]
    # official normalisation divides by (n + 1e-6)
    r_eps = official_sparsevlm_layer(attn, hidden, torch.arange(v_start, v_start + n_vis), torch.tensor(raters),
                                     retain=5, density_noise=noise)
    for ci in range(2):
        n = int((r_eps.cluster_assignment == ci).sum())
        torch.testing.assert_close(r_eps.merged_hidden[ci], r.merged_hidden[ci] * n / (n + 1e-6), rtol=1e-14,
                                   atol=1e-14)


def test_rank_rule_uses_rater_block_rank():
    """Duplicated rater rows -> rank 1 -> k = int(1*scale + bias)."""
    v_start, n_vis, length = 2, 30, 36
    scores = [float(i % 7) + 0.001 * i for i in range(n_vis)]
    attn = _attn_with_scores(length, [33, 34, 35], v_start, scores)
    hidden = torch.randn(1, length, 4, dtype=torch.float64)
    r = official_sparsevlm_layer(attn, hidden, torch.arange(v_start, v_start + n_vis), torch.tensor([33, 34, 35]),
                                 scale=4.6, bias=2.0)
    assert r.rank == 1 and r.keep_count == 6  # int(4.6 + 2.0)
    assert official_v1_keep_count(1, 30, 4.6, 2.0) == 6
    assert official_v1_keep_count(3, 3, 13.5, 0.0) is None  # rank == n_vis: no pruning
    assert official_v1_keep_count(10, 50, 13.5, 0.0) == 49  # capped at n_vis - 1
    assert official_v1_keep_count(1, 50, 0.8, 0.0) == 0  # int() truncates: everything deleted


def test_mar2025_budget_is_layer_average():
    expect = {192: ((309, 204, 113), 6145 / 32), 128: ((312, 117, 39), 4116 / 32), 64: ((82, 32, 18), 2074 / 32)}
    for budget, (after, avg) in expect.items():
        counts = mar2025_visual_counts(budget)
        assert counts[:2] == [576, 576]
        assert (counts[2], counts[6], counts[15]) == after
        assert counts[31] == after[2]
        assert math.isclose(sum(counts) / 32, avg)
        assert abs(sum(counts) / 32 - budget) < 1.0


def test_v1_counts_with_constant_rank():
    # e.g. 12 raters, full row rank at each layer, MME setting scale=13.5
    counts = official_visual_counts(V1_PRUNING_LAYERS, lambda layer, n: official_v1_keep_count(min(12, n), n, 13.5, 0))
    assert counts[2] == 162 + 13  # 414 deleted -> 125 recycled -> 13 clusters
    assert counts[6] == 163 and counts[15] == 163 and counts[19] == 163  # one token deleted and re-added
    assert official_prune_counts(163, 162) == dict(kept=162, deleted=1, recycled=1, clusters=1, new_visual=163)
