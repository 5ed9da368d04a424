"""Plain, loop-based transcription of the official SparseVLM v1 pruning layer (LLaVA-1.5).

Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
arXiv 2410.04417 (v1, Oct 2024). Official code: github.com/Gumpest/SparseVLMs.

Which commit
------------
All citations below are for b72c5d62fa7004c2f1440c75975981bddf6c66c7 (2024-10-22, the last
commit before 2025; "v1"). Its code is byte-identical to the first code commit 91fb6d9
("init sparsevlm", 2024-10-05): ``git diff --stat 91fb6d9 b72c5d6`` touches README.md only.
This is the code of the time when VisionZip (arXiv 2412.04467, Dec 2024) compared against it.
Paths are relative to ``llava/model/language_model/`` unless given in full:
``modelling_sparse_llama.py`` (MSL), ``score.py``, ``utils.py``.

Later history (NOT v1): 535f8baef705733d3758dea6e3fb2ad367b0f869 (2025-03-03, "new version of
SparseVLMs", merged as PR #19 on 2025-03-06) replaced the rank rule by a fixed per-layer DICT;
9e1f649ef6a78878e2b10d1d6f49ecd7f4d84094 (2025-12-11, "sparsevlm+", PR #30 "v2.0") is the
current HEAD line. ModelTC/LightCompress ``llmc/compression/token_reduction/sparsevlm.py``
(c90989681a61ae3cd8fe78cf0ac17f7558898781) reimplements the MARCH-2025 dict version.

1. Pruning layers and the budget
--------------------------------
v1: ``pruning_loc=[2, 6, 15, 19]`` (MSL:87), 0-based LLaMA decoder layer indices.
v1 has NO per-layer count dict. The count is adaptive and set per run by two floats
``scale``/``bias`` (MSL:129-130, defaults 13.5/0.0; CLI llava/eval/model_vqa_loader.py:157-158,
passed to ``generate`` at :105-107). The budget <-> (scale, bias) mapping exists only as the
three README examples / scripts (README.md:74-86; scripts/v1_5/eval/mme.sh:12-13,
pope.sh:13-14, textvqa.sh:12-13):
    192 tokens: scale=13.5, bias=0  (MME)      128 tokens: scale=9, bias=6  (POPE)
    64 tokens:  scale=0.8,  bias=0  (TextVQA)
i.e. the authors tuned scale/bias per benchmark; nothing guarantees these give 192/128/64 on
another benchmark.

What "SparseVLM N tokens" means: the only token counter in the code is MSL:331-336:
after EVERY decoder layer (32 of them) ``num_token.append(v_token_num)`` (the number of visual
tokens leaving that layer, recycled tokens included, 576 for layers 0-1), then
``num_token_pool += sum(num_token)/num_layers`` and it prints the running mean over samples
("equal token number"). So the budget is the LAYER-AVERAGED visual-token count over all 32
layers (averaged over the benchmark), NOT the count after the first or the last pruning layer.
The March-2025 dict confirms this reading: its comment (535f8ba score.py:7) is
"2*576  4*300  10*200  16*110" = a 32-layer weighted average ~= 191.

March-2025 dict (535f8ba score.py:5-15; pruning_loc=[2, 6, 15] at 535f8ba MSL:69; identical
in LightCompress sparsevlm.py:525-528), KEPT top-k visual tokens per pruning layer
(before the recycled cluster tokens are added):
    192: [300, 200, 110]    128: [303, 110, 36]    64: [66, 30, 17]
With recycling (below) the visual counts leaving layers 2/6/15 become 309/204/113,
312/117/39 and 82/32/18, layer averages 192.03, 128.63, 64.81 (``official_visual_counts``).
At 535f8ba the topk rule is ``k = min(dict[budget][layer], n_vis - 1)`` (535f8ba
score.py:33-36), pruning whenever n_vis != 0. At 535f8ba the pruning layer's output comes
from a FlashAttention2 module the builder attaches (535f8ba builder.py:115-121) and the map is
recomputed beside it as the same full causal softmax of that layer's rotated q/k (535f8ba
MSL:564-578); everything after the top-k (recycling, renumbering) is unchanged (535f8ba
MSL:279-323). ``official_sparsevlm_layer(..., retain=k)`` implements this rule.

2. Text raters (MSL:215-220), computed ONCE per prompt, before layer 0
--------------------------------------------------------------------
``hidden_states`` there is ``inputs_embeds`` (projector outputs for the image, word
embeddings elsewhere; fp16). ``v_t`` = the 576 image rows [v_start, v_start+576),
``t_t`` = ALL rows after the image to the end of the prompt (question + " ASSISTANT:"
template; the system/"USER:" prefix before the image is never a rater). ``m_v_t = (v_t @
t_t^T).softmax(over text).mean(over image)`` -> one value per text token; raters are the text
tokens with ``m > m.mean()`` (strict). The indices are stored RELATIVE to the text start
(``t_token_idx[1]``) and re-based on the current text start at each pruning layer
(score.py:29); text tokens are never pruned, so they stay valid. ``v_start`` is the number of
tokens before ``<image>`` (llava/model/llava_arch.py:428-429, ``pre_prompt_length_list``).
See ``official_text_raters``.

3. Attention used at a pruning layer (MSL:224-238, score.py:23-33)
------------------------------------------------------------------
Only in prefill (MSL:224: ``hidden_states.shape[1] != 1`` and an image present). The pruning
layer runs on the FULL current sequence (policy=None, MSL:225-233) and returns its own
attention probabilities (``attn_logits``, MSL:235 / decoder layer MSL:747 / SDPA class
MSL:633-642, 660): ``softmax(q k^T / sqrt(d) + causal)`` computed by utils.py:111-132 from
that layer's input (after input_layernorm, RoPE with the current position ids, all 32 heads,
fp16 softmax in the query dtype). This equals HF eager ``output_attentions=True`` of layer l
up to dtype. score.py:27 averages over heads (mean), score.py:29-30 takes rows = raters,
columns = the current visual block -> ``relation`` (n_raters, n_vis). The visual score is
``relation.mean(rows)`` (score.py:33). Pruning acts on the layer's OUTPUT
(``layer_outputs[0]``, MSL:254/269): the pruning layer itself still processes (and caches)
every token; the reduction takes effect from layer l+1.
Inputs here: ``attn`` = HF ``attentions[l]`` (1, H, L, L); ``hidden`` = HF
``hidden_states[l+1]`` (output of layer l), (1, L, D).

4. Kept count (score.py:32-42)
------------------------------
``rank = torch.linalg.matrix_rank(relation.float())`` (fp32, default tolerance
sigma_max * max(m, n) * eps_fp32) of the head-averaged (n_raters x n_vis) rater-row block.
If ``n_vis - rank == 0`` nothing is pruned (s_flag False). Otherwise the top
``k = min(int(rank * scale + bias), n_vis - 1)`` visual tokens by score are KEPT (python
``int`` = truncation). Note: rank*scale is the number RETAINED, not deleted, and at least one
token is always deleted. rank <= n_raters, so in practice k = int(n_raters*scale+bias) at
every pruning layer; after layer 2 later layers remove only a handful of tokens.

5. Recycling (MSL:251-283, utils.py:155-213)
--------------------------------------------
Deleted = visual tokens not in the top-k, ascending position (MSL:253, 256). The top
``int(n_deleted * 0.3) + 1`` of them by the SAME visual score (MSL:257-259, order = score
descending) are recycled; the rest are dropped. ``cluster_num = int(n_recycled / 10) + 1``
(MSL:262). ``cluster_and_merge`` (utils.py:155-213) = TCFormer DPC-kNN on the recycled
tokens' hidden states (layer OUTPUT): d_ij = ||x_i - x_j||_2 / sqrt(D); density_i =
exp(-mean_{j in kNN(i)} d_ij^2) over the cluster_num nearest j (self, d_ii=0,
included) + U(0,1)*1e-6 noise
(utils.py:166, random tie-breaker); delta_i = min d_ij over j with density_j > density_i,
or max_ij d_ij if none; centres = top cluster_num of delta*density; every token joins its
nearest centre (first centre on ties), centres join themselves; merged token c =
sum_{i in c} x_i / (n_c + 1e-6) (plain average; the 1e-6 vanishes in fp16). Merged tokens
are ordered by centre score (descending).

6. New sequence, positions, mask, cache, decoding
-------------------------------------------------
New order (MSL:268-275): [prefix][kept visual, original order][merged tokens][text].
``v_token_num`` becomes kept + cluster_num (MSL:281) - the merged tokens count as visual
tokens for the next pruning layer (can be kept, deleted or re-merged). ``position_ids =
position_ids[:, :L']`` (MSL:278/287): positions are RENUMBERED 0..L'-1 (position_ids is
arange(L) in prefill, MSL:164-169); kept tokens do NOT keep original position ids, text
tokens shift down, merged tokens get the slots right after the kept visual tokens. Mask:
batch 1 without padding -> ``_prepare_4d_causal_attention_mask_for_sdpa`` returns None and
every layer uses a plain causal mask over its (shortened) sequence (utils.py:115-119); a
non-None 4D mask would fail the size check (MSL:619-623) after pruning. KV cache: layer l
caches what it processed, so the pruning layer caches the pre-pruning sequence and later
layers the shortened one. Decoding: no pruning (MSL:224); the new token's RoPE position at
layer l is overwritten by that layer's cache length (MSL:603-604), i.e. it continues the
renumbered positions of that layer (differs between layers). Batch size 1 only
(model_vqa_loader.py:73; ``rank.item()``, ``mask[0]``, ``torch.where(policy==0)[1]``).
Only SDPA is supported (MSL:675); in eval the softmax never uses ``policy`` (MSL:633-642).

Quirks: if only one token is deleted (e.g. k = n_vis - 1) it is "recycled" alone, i.e. moved
to the end of the visual block (divided by 1 + 1e-6); the count does not drop. LightCompress
differs from the official code here: it keeps ORIGINAL position ids for kept tokens and gives
each merged token its centre's position (LightCompress sparsevlm.py:296-336), and it recomputes
the attention map from q/k in a hook (:148-205); the official code renumbers.

Ties: official ``torch.topk`` tie order is unspecified; here every top-k breaks ties by the
EARLIER index (visual position; for centres, the index in the recycled list). Density ties are
broken by the optional ``density_noise`` (pass the official ``torch.rand(...)*1e-6`` to
reproduce a run); without it exact ties are left as ties (neither "higher"). Exact ties are
common: with cluster_num <= 2 the density uses one neighbour, so mutual nearest neighbours tie.
In the official fp16 run the 1e-6 noise is below half an fp16 ulp for any density >= 2**-8,
so it is lost in the addition and those ties stay (strict ``>``): both members of a pair get
delta = dist_max. Pass ``density_noise=None`` to mimic that.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch

V1_COMMIT = "b72c5d62fa7004c2f1440c75975981bddf6c66c7"
MAR2025_COMMIT = "535f8baef705733d3758dea6e3fb2ad367b0f869"

V1_PRUNING_LAYERS = (2, 6, 15, 19)  # MSL:87
# README.md:74-86, scripts/v1_5/eval/{mme,pope,textvqa}.sh
V1_SCALE_BIAS = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}

MAR2025_PRUNING_LAYERS = (2, 6, 15)  # 535f8ba MSL:69
MAR2025_RETAIN = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}  # 535f8ba score.py:7-15

RECYCLE_FRACTION = 0.3  # MSL:258
CLUSTER_DIVISOR = 10  # MSL:262
MERGE_EPS = 1e-6  # utils.py:203


def official_text_raters(inputs_embeds: torch.Tensor, v_start: int, n_vis: int) -> torch.LongTensor:
    """Text raters, MSL:215-220. inputs_embeds: (1, L, D) layer-0 input (embeddings).

    Returns indices RELATIVE to the text start ``v_start + n_vis`` (ascending). At a pruning
    layer whose visual block is [v_start, v_start + n_vis_now) the rater rows are
    ``v_start + n_vis_now + rel``.
    """
    x = inputs_embeds[0].to(torch.float64)
    t0 = v_start + n_vis
    n_text = x.shape[0] - t0
    m = [0.0] * n_text
    for i in range(n_vis):
        logits = [float(torch.dot(x[v_start + i], x[t0 + j])) for j in range(n_text)]
        top = max(logits)
        e = [math.exp(v - top) for v in logits]
        s = sum(e)
        for j in range(n_text):
            m[j] += e[j] / s
    m = [v / n_vis for v in m]
    mean = sum(m) / n_text
    return torch.tensor([j for j in range(n_text) if m[j] > mean], dtype=torch.long)


def official_v1_keep_count(rank: int, n_vis: int, scale: float, bias: float) -> Optional[int]:
    """score.py:36-42: None = no pruning (rank == n_vis); else number of visual tokens KEPT."""
    if n_vis - rank == 0:
        return None
    return min(int(rank * scale + bias), n_vis - 1)


def official_prune_counts(n_vis: int, k: int) -> dict:
    """Counts at one pruning layer that keeps k of n_vis (MSL:256-262, 281)."""
    deleted = n_vis - k
    recycled = int(deleted * RECYCLE_FRACTION) + 1
    clusters = int(recycled / CLUSTER_DIVISOR) + 1
    return dict(kept=k, deleted=deleted, recycled=recycled, clusters=clusters, new_visual=k + clusters)


def official_visual_counts(
    pruning_layers: Sequence[int],
    keep_fn: Callable[[int, int], Optional[int]],
    n_vis0: int = 576,
    num_layers: int = 32,
) -> list:
    """What MSL:331 appends after each of the ``num_layers`` layers (visual tokens leaving it).

    keep_fn(layer_idx, n_vis) -> k kept, or None for "no pruning". The budget label is
    ``sum(result) / num_layers`` (MSL:335).
    """
    n = n_vis0
    out = []
    for layer in range(num_layers):
        if layer in pruning_layers:
            k = keep_fn(layer, n)
            if k is not None:
                n = official_prune_counts(n, k)["new_visual"]
        out.append(n)
    return out


def mar2025_visual_counts(budget: int, n_vis0: int = 576, num_layers: int = 32) -> list:
    """Per-layer counts for the March-2025 dict (535f8ba score.py:33-36)."""
    layers = MAR2025_PRUNING_LAYERS
    retain = MAR2025_RETAIN[budget]
    return official_visual_counts(
        layers, lambda layer, n: min(retain[layers.index(layer)], n - 1) if n != 0 else None, n_vis0, num_layers
    )


class SparseVLMLayerResult(NamedTuple):
    pruned: bool
    rank: Optional[int]  # v1 rank (None in retain mode)
    keep_count: int  # visual tokens kept by the top-k (before merged tokens are added)
    visual_scores: torch.Tensor  # (n_vis,) float64 head-mean, rater-mean attention
    kept_positions: torch.LongTensor  # kept visual positions in the INPUT sequence, ascending
    deleted_positions: torch.LongTensor  # ascending
    recycled_positions: torch.LongTensor  # deleted tokens that are merged, score-descending order
    cluster_assignment: torch.LongTensor  # merged-token index of each recycled token (same order)
    center_positions: torch.LongTensor  # input position of each merged token's DPC centre
    merged_hidden: torch.Tensor  # (n_clusters, D)
    source_positions: torch.LongTensor  # (L',) input position per output slot, -1 = merged token
    new_hidden: torch.Tensor  # (1, L', D)
    new_position_ids: torch.LongTensor  # (1, L') = arange(L') (renumbered, MSL:278)
    new_num_visual: int  # kept + clusters (MSL:281)


def _topk_earlier_wins(values: Sequence[float], k: int) -> list:
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return order[:k]


def official_cluster_and_merge(x: torch.Tensor, cluster_num: int, density_noise=None, eps: float = MERGE_EPS):
    """Loop transcription of utils.py:155-213 for one sample. x: (N, D).

    Returns (merged (cluster_num, D), centres (cluster_num,) indices into x in merged order,
    assignment (N,) merged index per token).
    """
    x = x.to(torch.float64)
    n, c = x.shape
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            d[i][j] = math.sqrt(sum(float(v) ** 2 for v in (x[i] - x[j]).tolist())) / math.sqrt(c)
    density = []
    for i in range(n):
        nearest = sorted(d[i])[:cluster_num]
        density.append(math.exp(-sum(v * v for v in nearest) / cluster_num))
    if density_noise is not None:
        noise = torch.as_tensor(density_noise, dtype=torch.float64).reshape(-1).tolist()
        density = [density[i] + noise[i] for i in range(n)]
    dist_max = max(max(row) for row in d)
    delta = []
    for i in range(n):
        best = dist_max
        for j in range(n):
            if density[j] > density[i] and d[i][j] < best:
                best = d[i][j]
        delta.append(best)
    score = [delta[i] * density[i] for i in range(n)]
    centres = _topk_earlier_wins(score, cluster_num)
    assign = []
    for t in range(n):
        best_c, best_d = 0, None
        for ci, cidx in enumerate(centres):
            if best_d is None or d[cidx][t] < best_d:
                best_c, best_d = ci, d[cidx][t]
        assign.append(best_c)
    for ci, cidx in enumerate(centres):
        assign[cidx] = ci
    merged = torch.zeros(cluster_num, c, dtype=torch.float64)
    for ci in range(cluster_num):
        members = [t for t in range(n) if assign[t] == ci]
        w = 1.0 / (len(members) + eps)
        for t in members:
            merged[ci] += x[t] * w
    return merged, torch.tensor(centres, dtype=torch.long), torch.tensor(assign, dtype=torch.long)


def official_sparsevlm_layer(
    attn: torch.Tensor,
    hidden: torch.Tensor,
    image_positions: torch.LongTensor,
    rater_positions: torch.LongTensor,
    retain: Optional[int] = None,
    *,
    scale: Optional[float] = None,
    bias: float = 0.0,
    density_noise=None,
    merge_eps: float = MERGE_EPS,
) -> SparseVLMLayerResult:
    """One official SparseVLM pruning layer (prefill, batch 1).

    attn: (1, H, L, L) this layer's attention probabilities (HF eager ``attentions[l]``).
    hidden: (1, L, D) this layer's OUTPUT (HF ``hidden_states[l+1]``).
    image_positions: the current visual block, must be contiguous ascending
        [v_start, v_start+n_vis) (prefix before it, text after it).
    rater_positions: absolute rows of the text raters = text_start + ``official_text_raters``.
    retain: March-2025 dict rule ``k = min(retain, n_vis-1)``. If None, the v1 rank rule with
        ``scale``/``bias`` (score.py:32-42) is used.
    density_noise: optional (n_recycled,) values added to the DPC densities (official:
        ``torch.rand(...) * 1e-6``, utils.py:166); default none.
    """
    assert attn.dim() == 4 and attn.shape[0] == 1 and hidden.shape[0] == 1, "batch 1 only (official)"
    img = [int(p) for p in image_positions.tolist()]
    n_vis = len(img)
    v_start = img[0] if n_vis else 0
    assert img == list(range(v_start, v_start + n_vis)), "official code needs a contiguous visual block"
    raters = [int(r) for r in rater_positions.tolist()]
    n_heads = attn.shape[1]
    seq_len = hidden.shape[1]

    # head mean (score.py:27), rater rows x visual columns (score.py:30)
    rel = torch.zeros(len(raters), n_vis, dtype=torch.float64)
    for a, r in enumerate(raters):
        for b, col in enumerate(img):
            s = 0.0
            for h in range(n_heads):
                s += float(attn[0, h, r, col])
            rel[a, b] = s / n_heads
    scores = [float(sum(rel[a, b] for a in range(len(raters))) / len(raters)) for b in range(n_vis)]

    rank = None
    if retain is None:
        assert scale is not None, "give retain (March-2025 dict) or scale/bias (v1)"
        rank = int(torch.linalg.matrix_rank(rel.to(torch.float32)).item())  # score.py:32
        k = official_v1_keep_count(rank, n_vis, scale, bias)
    else:
        k = min(retain, n_vis - 1) if n_vis != 0 else None
    visual_scores = torch.tensor(scores, dtype=torch.float64)

    if k is None:  # s_flag False: keep everything
        src = list(range(seq_len))
        return SparseVLMLayerResult(
            False, rank, n_vis, visual_scores, torch.tensor(img, dtype=torch.long),
            torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
            hidden.new_zeros(0, hidden.shape[2]), torch.tensor(src, dtype=torch.long),
            hidden.clone(), torch.arange(seq_len).unsqueeze(0), n_vis,
        )

    kept_local = sorted(_topk_earlier_wins(scores, k))
    kept_set = set(kept_local)
    deleted_local = [i for i in range(n_vis) if i not in kept_set]
    cnt = official_prune_counts(n_vis, k)
    rec_idx = _topk_earlier_wins([scores[i] for i in deleted_local], cnt["recycled"])
    recycled_local = [deleted_local[j] for j in rec_idx]
    x = torch.stack([hidden[0, v_start + i].to(torch.float64) for i in recycled_local])
    merged, centres, assign = official_cluster_and_merge(x, cnt["clusters"], density_noise, merge_eps)

    kept_pos = [v_start + i for i in kept_local]
    src = list(range(v_start)) + kept_pos + [-1] * cnt["clusters"] + list(range(v_start + n_vis, seq_len))
    rows = []
    mi = 0
    for p in src:
        if p >= 0:
            rows.append(hidden[0, p].to(torch.float64))
        else:
            rows.append(merged[mi])
            mi += 1
    new_hidden = torch.stack(rows).unsqueeze(0)
    recycled_pos = [v_start + i for i in recycled_local]
    return SparseVLMLayerResult(
        True, rank, k, visual_scores, torch.tensor(kept_pos, dtype=torch.long),
        torch.tensor([v_start + i for i in deleted_local], dtype=torch.long),
        torch.tensor(recycled_pos, dtype=torch.long), assign,
        torch.tensor([recycled_pos[int(c)] for c in centres], dtype=torch.long), merged,
        torch.tensor(src, dtype=torch.long), new_hidden, torch.arange(len(src)).unsqueeze(0),
        k + cnt["clusters"],
    )
