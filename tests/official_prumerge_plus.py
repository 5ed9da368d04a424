"""Plain, loop-based transcription of the official LLaVA-PruMerge+ rule (LLaVA-1.5, CLIP ViT-L/14-336).

Paper: "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models",
arXiv 2403.15388. Official code: github.com/42Shawn/LLaVA-PruMerge, snapshot HEAD
097c04116a58465e4bcb58cec44a94018a68ff1a (Jun 28 2025). The only file involved,
``llava/model/multimodal_encoder/clip_encoder.py``, last changed in 5632f5ad25e0fd47fd6a588c6a139277b65b2a1f
(May 15 2024, which switched the default call to ``if_adaptive=True``). Every ``cl:NNN`` below
is a line of that file at HEAD. PruMerge+ is ``token_prune_merge_advanced_plus`` (cl:174-281),
called from ``forward`` as ``token_prune_merge_advanced_plus(images, if_adaptive=True,
reduction_ratio=1/8)`` (cl:300). (Plain PruMerge is ``token_prune_merge_advanced``, cl:85-171.)

!!! WHICH LAYER: FEATURES AND ATTENTION/KEYS COME FROM DIFFERENT LAYERS !!!
----------------------------------------------------------------------------
- Features: ``hidden_states[self.select_layer]`` with select_layer = -2 (cl:57, cl:74,
  cl:188), CLS dropped (``select_feature='patch'``, cl:58, cl:76). For the 24-layer CLIP-L
  that is the OUTPUT of encoder layer index 22.
- Queries/keys: forward hooks on ``encoder.layers[23].self_attn.k_proj`` / ``q_proj``
  (cl:28-32, cl:182-183, cl:192-193) - layer index 23 = the LAST layer, i.e. the layer that
  CONSUMES ``hidden_states[-2]`` (its q/k are q_proj/k_proj of layer_norm1(hidden_states[-2])).
So, unlike VisionZip/FasterVLM (attention of the layer whose output is the feature),
``cls_attention`` and ``keys`` here must come from layer L+1 = the next layer after the one
whose output is ``hidden``. This module just takes the three tensors; feeding it layer-L
attention/keys (what the project's TowerSignals capture today) is NOT the official rule.

Steps (B = 1 in official eval: llava/eval/model_vqa_loader.py:95 asserts batch_size == 1;
the adaptive branch cl:208-214 only works for B = 1 anyway)
---------------------------------------------------------------------------------------
1. Attention (cl:198-201): ``attn = softmax(q @ k^T * C**-0.5)`` with q, k the raw
   q_proj / k_proj outputs (bias included; transformers==4.31.0, pyproject.toml:17, multiplies
   by CLIP's scale only AFTER q_proj, so the hook sees the unscaled query), over the FULL
   1024-dim vectors - the heads are NOT split - and C = 1024 (the feature width, cl:189).
   ``cls_attn = attn[:, 0, 1:]``: CLS query row, CLS column dropped, not renormalised.
   Head combination, exactly: with per-head CLIP logits l_h = q_h.k_h / sqrt(d) (d = D/H = 64),
   q.k / sqrt(D) = sum_h l_h / sqrt(H). Since log p_h = l_h - const_h (per head), the official
   row is softmax_j( sum_h log p_h[j] / sqrt(H) ) computed from the per-head probabilities
   ``cls_attention`` (H, N) - see ``official_cls_attention``. (Equivalently softmax of
   4 x the head-MEAN logit for H = 16: a "sharpened" geometric mean of heads, NOT the mean
   of per-head probabilities.)
2. IQR outliers (cl:34-47, cl:204): ``outlier_dectection`` flattens ``cls_attn`` (the 576
   patch values, float32, numpy), Q1/Q3 = ``np.percentile(.., 25/75)`` (linear interpolation,
   same as ``torch.quantile`` default), upper = Q3 + 1.5 * (Q3 - Q1), ratio = #(values >
   upper, strict) / 576. No lower bound (commented out, cl:41).
3. Outliers (cl:205): ``topk(cls_attn, int(N * ratio))`` with N = 576 (cl:189) -> exactly the
   outlier count c (int(576 * (c / 576)) == c for every c), sorted by DESCENDING attention.
   The IQR threshold only fixes the COUNT; the set is the top-c by attention.
4. Spatial "plus" samples (cl:208-214, adaptive branch): ``step_length = int(1/ratio)``,
   ``arange(0, 575, int(step_length/3))`` - a 1-D stride over the raster-order (row-major
   24x24) patch indices starting at 0, end 575 hard-coded (so index 575 is never sampled).
   Samples already among the outliers are dropped (``x not in idx``, cl:212); the rest are
   appended AFTER the outliers in ascending order (cl:213). Count ~ 575 / floor(floor(576/c)/3)
   ~ 3c, e.g. c = 28 -> stride 6 -> 96 samples (minus overlaps).
5. Complement (cl:236-239, complement_idx cl:12-25): the not-kept patch positions, ascending.
6. Merge (cl:241-276): keys = ``k[:, 1:]`` (layer-23 k_proj outputs, full 1024-dim),
   L2-normalised (F.normalize, cl:241-242). For EVERY kept token i (outliers AND samples):
   the candidate pool is all OTHER kept tokens (in kept order) followed by all not-kept
   tokens (cl:255-265); cosine similarity of key_i with the pool (cl:266); the 32 most
   similar (``topk k=32``, cl:268); ``new_i = x_i + sum_j attn_j * x_j`` with attn_j the raw
   cls_attn of neighbour j - NOT normalised (``#/ torch.sum(weights)`` commented out,
   cl:274-275). Updates read the ORIGINAL x (cl:270, cl:275; results go to a separate
   buffer, cl:249/276). Neighbour sets overlap freely (no partition).
7. Extra token (cl:278-279): ``sum over not-kept j of attn_j * x_j`` (again unnormalised),
   appended LAST.
8. Output (cl:279-281): [merged kept tokens in kept order (outliers by descending attention,
   then samples ascending), extra token]; CLS is NOT output (``cls_token_last_layer``,
   cl:187, is unused). len = c + #samples + 1. These are pre-projector rows; the projector
   is applied after (llava/model/llava_arch.py:104). Official dtype: fp16 throughout
   (tower fp16, llava/model/builder.py:143; images fp16, model_vqa_loader.py:129) except the
   quartiles (float32 numpy). This reference computes in float64 and returns hidden.dtype.

Non-adaptive official branch (cl:216-227, "this is for training", reduction_ratio = 1/8):
top int(576/8) = 72 by attention + ``arange(4, 575, 8)`` (72 samples, offset stride/2) with NO
overlap removal (duplicates kept; then complement_idx silently drops the lowest-index
complement positions, one per duplicate) -> 145 tokens. Not what the released eval runs.

Returned ``kept``: one entry per output row; the patch rows carry their tower position
(patch index + 1, in [1, N)); the trailing extra token has no position and carries -1.

Edge cases that crash the official code and raise here: no outlier (ratio 0 ->
ZeroDivisionError at cl:209) and c >= 193 (int(step_length/3) == 0 -> arange step 0, cl:210).
"""

import math

import torch

NEIGHBOURS = 32  # cl:268
IQR_FACTOR = 1.5  # cl:42
OUTLIER_SHARE_FIXED = 0.25  # fixed budget: outliers : spatial samples = 1 : 3 (see _fixed doc)


def official_cls_attention(cls_attention):
    """(N,) the official ``attn[0, :]`` row (cl:198-199), float64, over all N keys incl. CLS,
    from the per-head CLS probabilities (H, N) of the SAME layer: softmax_j(sum_h log p_h[j] /
    sqrt(H)). Exact because the official logit q.k/sqrt(H*d) = sum_h (q_h.k_h/sqrt(d)) / sqrt(H)
    and log p_h differs from head h's logit by a per-head constant."""
    probs = cls_attention.to(torch.float64)
    heads = probs.shape[0]
    total = torch.zeros(probs.shape[1], dtype=torch.float64)
    for h in range(heads):
        total = total + torch.log(probs[h])
    return torch.softmax(total / math.sqrt(heads), dim=0)


def _iqr_outlier_count(patch_attn):
    """cl:34-47: count of patch attention values strictly above Q3 + 1.5 * IQR."""
    q1 = torch.quantile(patch_attn, 0.25)  # np.percentile(.., 25), linear interpolation
    q3 = torch.quantile(patch_attn, 0.75)
    upper = q3 + IQR_FACTOR * (q3 - q1)
    count = 0
    for value in patch_attn.tolist():
        if value > upper.item():
            count += 1
    return count


def _merge(patch, patch_attn, patch_keys, idx):
    """cl:229-281 for one image. ``idx``: kept patch indices (0-based, no CLS) in output order.
    Returns (len(idx) + 1, D) float64 rows: merged kept tokens then the extra token."""
    n_patches = patch.shape[0]
    kept_set = set(idx)
    compl = [j for j in range(n_patches) if j not in kept_set]  # complement_idx: ascending
    keys_norm = torch.nn.functional.normalize(patch_keys, p=2, dim=-1)  # cl:241-242
    rows = []
    for i, pos in enumerate(idx):
        pool = idx[:i] + idx[i + 1 :] + compl  # cl:255-265: other kept, then not kept
        sims = [float(torch.dot(keys_norm[pos], keys_norm[j])) for j in pool]
        top = torch.topk(torch.tensor(sims, dtype=torch.float64), k=NEIGHBOURS, largest=True).indices
        merged = patch[pos].clone()  # cl:275: x_i + weighted sum (no normalisation)
        for t in top.tolist():
            j = pool[t]
            merged = merged + patch_attn[j] * patch[j]
        rows.append(merged)
    extra = torch.zeros(patch.shape[1], dtype=torch.float64)  # cl:278
    for j in compl:
        extra = extra + patch_attn[j] * patch[j]
    rows.append(extra)
    return torch.stack(rows, dim=0)


def _prepare(hidden, cls_attention, keys):
    attn = official_cls_attention(cls_attention)
    patch_attn = attn[1:]  # cl:201: CLS column dropped, not renormalised
    patch = hidden[1:].to(torch.float64)  # cl:76: CLS dropped
    patch_keys = keys[1:].to(torch.float64)  # cl:231
    return patch, patch_attn, patch_keys


def _finish(rows, idx, hidden):
    kept = torch.tensor([p + 1 for p in idx] + [-1], dtype=torch.long)
    return rows.to(hidden.dtype), kept


def reference_prumerge_plus_adaptive(hidden, cls_attention, keys):
    """The official adaptive rule, exactly. hidden: (N, D) output of tower layer L (token 0 = CLS);
    cls_attention: (H, N) CLS-query attention probabilities per head; keys: (N, D) projected keys.
    OFFICIALLY cls_attention and keys are those of the layer AFTER the one whose output is
    ``hidden`` (layers[23] vs hidden_states[-2]); see the module docstring.
    Returns (out (K, D), kept (K,) long positions in [0, N), in output order); the last row is
    the extra merged token of all dropped tokens, whose ``kept`` entry is -1."""
    patch, patch_attn, patch_keys = _prepare(hidden, cls_attention, keys)
    n_patches = patch.shape[0]
    count = _iqr_outlier_count(patch_attn.to(torch.float32).to(torch.float64))
    if count == 0:
        raise ValueError("no IQR outlier: the official code divides by zero (cl:209)")
    ratio = count / n_patches  # cl:46
    left = int(n_patches * ratio)  # cl:205
    idx = torch.topk(patch_attn, left, largest=True, sorted=True).indices.tolist()
    step_length = int(1 / ratio)  # cl:209
    stride = int(step_length / 3)  # cl:210
    if stride == 0:
        raise ValueError("too many outliers: the official arange step would be 0 (cl:210)")
    outliers = set(idx)
    for x in range(0, n_patches - 1, stride):  # official: arange(0, 575, stride)
        if x not in outliers:  # cl:212
            idx.append(x)  # cl:213
    return _finish(_merge(patch, patch_attn, patch_keys, idx), idx, hidden)


def reference_prumerge_plus_fixed(hidden, cls_attention, keys, tokens):
    """The same rule with the output count fixed to ``tokens`` (64/128/192), extra token included.

    Fixing (our choice; the official code has no fixed-budget inference mode):
    - K = tokens - 1 kept tokens + the official extra token (so out has exactly ``tokens`` rows);
    - outliers: the top ``round(K / 4)`` patches by the official attention (replaces the IQR
      count; official also takes the top-c, step 3 of the module doc), descending attention;
    - spatial samples: the remaining K - round(K/4) (~3x the outliers, the proportion of the
      official adaptive stride floor(floor(576/c)/3)) taken by a 1-D raster-order stride over
      the patches NOT already outliers: remaining[(i * R) // m], i = 0..m-1 (R = #remaining).
      Like the official stride it starts at the first position and runs in ascending raster
      order; taking it over the complement avoids overlaps so the count is exact;
    - merge, extra token, order, kept: exactly as the adaptive rule.
    64 -> 16 outliers + 47 samples + 1; 128 -> 32 + 95 + 1; 192 -> 48 + 143 + 1."""
    patch, patch_attn, patch_keys = _prepare(hidden, cls_attention, keys)
    n_patches = patch.shape[0]
    kept_count = tokens - 1
    if not 1 <= kept_count <= n_patches:
        raise ValueError(f"tokens must be in [2, {n_patches + 1}], got {tokens}")
    n_out = min(kept_count, max(1, math.floor(kept_count * OUTLIER_SHARE_FIXED + 0.5)))
    idx = torch.topk(patch_attn, n_out, largest=True, sorted=True).indices.tolist()
    outliers = set(idx)
    remaining = [j for j in range(n_patches) if j not in outliers]
    samples = kept_count - n_out
    for i in range(samples):
        idx.append(remaining[(i * len(remaining)) // samples])
    return _finish(_merge(patch, patch_attn, patch_keys, idx), idx, hidden)
