"""Loop-based reference transcription of the official VisPruner selection rule (LLaVA-1.5).

Source: github.com/Theia-4869/VisPruner, commit aefa01adc7c7ce6334e880c88225e90cede760d1.
Abbreviations: ARCH = llava/model/llava_arch.py, CLIP = llava/model/multimodal_encoder/clip_encoder.py.

Layers. CLIP:37 takes features = hidden_states[select_layer] (select_layer = -2) and CLIP:39 takes
attentions[select_layer] (also -2).  HF CLIP hidden_states has 25 entries (embeddings + 24 layers),
attentions has 24, so hidden_states[-2] is the OUTPUT of encoder layer 22 (0-based) and attentions[-2]
is the self-attention softmax computed INSIDE that same layer 22.  => Attention and features come from
the SAME layer L (the one LLaVA reads); there is no layer mismatch.

Steps (all per image, B = 1 here):
 1. Features: patches only, CLS dropped (CLIP:40-41, select_feature='patch').  Pre-projector layer-L
    hidden states, cast to the model dtype (CLIP:68).
 2. Importance score: CLS query row, patch key columns only, `attn[:, :, 0, 1:]` (CLIP:43), i.e. the
    CLS->CLS column is dropped and NOT renormalised; then averaged over heads (ARCH:154).
 3. Counts: T_imp = int(T * important_ratio) (truncation, ARCH:150), T_div = T - T_imp (ARCH:151).
    important_ratio default 0.5 (argparse default, llava/eval/model_vqa_loader.py:152,
    model_vqa.py:109, model_vqa_science.py:119, model_vqa_mmbench.py:167; README.md:68).
 4. Important = first T_imp of argsort(score, descending) (ARCH:155-156); residual = the rest, KEPT IN
    DESCENDING-ATTENTION ORDER (ARCH:157).  That order matters for the even/odd split below.
 5. Duplicate removal (ToMe-style bipartite matching, ARCH:160-176) on L2-normalised layer-L
    features (x / ||x||, no eps, ARCH:160).  Loop while T_div > 0 (ARCH:161):
      R = len(residual); r = min(8, R - T_div); stop if r <= 0 (ARCH:162-165);
      A = residual[0::2], B = residual[1::2] (ARCH:168);
      score(a) = max_b cos(a, b) (ARCH:169-170);
      drop the r A-tokens with the highest score: keep argsort(score, desc)[r:] (ARCH:172);
      new residual = [kept A tokens IN THAT SCORE-DESCENDING ORDER] + [all B tokens in order] (ARCH:173-176).
    So each iteration removes 8 tokens (the last one removes the remainder < 8) and the loop ends with
    exactly T_div residual tokens.
 6. Selected = important + residual (ARCH:178-179; important only if T_div == 0, ARCH:180-181),
    scattered into a boolean mask (ARCH:182-183).
 7. Projector is applied to ALL 576 patches (ARCH:185), then the mask gathers them (ARCH:272,
    `image_features[index_masks]`).  A boolean mask gathers in ASCENDING SPATIAL POSITION order, so the
    LLM sees the kept tokens sorted by patch index (important/diverse interleaved).  The projector is
    per-token, so gathering pre- or post-projector is equivalent; this function returns the
    pre-projector rows of `hidden`.

Deviations / edge cases (documented, not reproduced):
 * torch.argsort is not stable; here ties are broken stably (lower index / earlier list position first).
 * If R is odd, `a` has ceil(R/2) rows but ARCH:174 builds the batch index with R // 2 - r columns,
   which raises a broadcasting IndexError in the official code (or silently drops one extra A token
   when R // 2 == r).  R is odd only when T_imp is odd (576 - T_imp odd); never for T in {64,128,192}
   with ratio 0.5 (or MME's 64/0.75).  Here the intended semantics (keep len(A) - r A tokens) is used.
 * If len(A) < r (only for T_div < 8 and R < 16) the official expand() gets a negative size; here all A
   tokens are dropped (what argsort(...)[r:] would give).
"""

import math  # noqa: F401  (kept for parity with other reference files)

import torch


OFFICIAL_IMPORTANT_RATIO = 0.5  # llava/eval/model_vqa_loader.py:152
MERGE_STEP = 8  # ARCH:163, `r = min(8, R - diverse_token_num)`


def _argsort_desc_stable(values):
    """Indices of `values` (python list of floats) sorted by value, descending, stable on ties."""
    return sorted(range(len(values)), key=lambda i: -values[i])


def reference_vispruner(hidden, cls_attention, keys, tokens, important_ratio=OFFICIAL_IMPORTANT_RATIO):
    """hidden: (N, D) float tensor, output of tower layer L (the layer LLaVA reads, -2), token 0 = CLS.
    cls_attention: (H, N) attention probabilities of the CLS query of the layer the official code uses
        (per head).  Official: the SAME layer L (attentions[-2]), see module docstring.
    keys: (N, D) projected keys of layer L -- NOT used by the official rule (kept for signature parity).
    tokens: number of visual tokens the LLM receives.
    Returns (out (tokens, D), kept (tokens,) long: positions in [0, N) of the rows of `out`, in output
    order).  Positions are in the CLS-included indexing (patch j <-> position j + 1); CLS is never kept.
    """
    del keys  # unused by the official code
    N, D = hidden.shape
    P = N - 1  # number of patches (576 for LLaVA-1.5)

    # Step 1: patch features only (CLIP:41).
    patches = hidden[1:]  # (P, D)

    # Step 2: CLS query row, patch columns (CLIP:43), mean over heads (ARCH:154).
    H = cls_attention.shape[0]
    score = []
    for j in range(P):
        s = 0.0
        for h in range(H):
            s += float(cls_attention[h, 1 + j])
        score.append(s / H)

    # Step 3: counts (ARCH:150-151).
    important_num = int(tokens * important_ratio)
    diverse_num = tokens - important_num

    # Step 4: important = top-T_imp by attention; residual keeps attention-descending order (ARCH:155-157).
    order = _argsort_desc_stable(score)
    important = order[:important_num]
    residual = order[important_num:]

    # Step 5: iterative duplicate removal (ARCH:160-176).
    norms = patches.norm(dim=-1, keepdim=True)
    normed = patches / norms  # (P, D), no eps (ARCH:160)
    while diverse_num > 0:
        R = len(residual)
        r = min(MERGE_STEP, R - diverse_num)
        if r <= 0:
            break
        a_ids = residual[0::2]
        b_ids = residual[1::2]
        b_feats = normed[b_ids]  # (|B|, D)
        a_score = []
        for ai in a_ids:
            sims = b_feats @ normed[ai]  # cosine similarity to every B token
            a_score.append(float(sims.max()))
        a_order = _argsort_desc_stable(a_score)
        keep_a = a_order[r:]  # drop the r most redundant A tokens (ARCH:172)
        residual = [a_ids[i] for i in keep_a] + list(b_ids)  # ARCH:173-176

    # Step 6: selected set (ARCH:178-183).
    if diverse_num > 0:
        selected = important + residual
    else:
        selected = important

    # Step 7: boolean-mask gather -> ascending spatial order (ARCH:182-183, 272).
    mask = [False] * P
    for j in selected:
        mask[j] = True
    kept_patch = [j for j in range(P) if mask[j]]
    kept = torch.tensor([j + 1 for j in kept_patch], dtype=torch.long, device=hidden.device)
    out = hidden[kept]
    return out, kept
