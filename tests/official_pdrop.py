"""Plain, loop-based transcription of the official PyramidDrop (PDrop) rank & drop rule.

Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", arXiv 2410.17247 (CVPR 2025). Official code: github.com/Cooperx521/PyramidDrop,
snapshot HEAD 6444f304aee4b7edcb022839fb9e8cd07859704a (Mar 6 2025, README-only commits on top
of the code). All ``file:line`` below are for that commit; ``M`` =
``llava/model/modeling_llama_pdrop.py`` (the transformers-4.37.2 Llama copy, pyproject.toml:17),
``A`` = ``llava/model/llava_arch.py``, ``E`` = ``llava/eval/model_vqa_loader.py``.
Cross-check: ModelTC/LightCompress 9701d035b0aac5df97a2ebaadb30bcf0707616f5
``llmc/compression/token_reduction/pyramiddrop.py`` (LC) reimplements the same rule.

Settings for LLaVA-1.5 (7B and 13B scripts alike)
-------------------------------------------------
- ``--layer_list '[8,16,24]'`` and ``--image_token_ratio_list "[0.5,0.25,0.125]"``
  (scripts/v1_5/pdrop_eval/textvqa.sh:9-10, every other pdrop_eval/*.sh; README.md:75-76:
  "we obtain 50%, 25%, 12.5% after layer8, layer16, layer24 ... 4 stages, and lambda = 0.5").
- The loader prepends 1.0: E:94-96 ``layer_list = eval(...)``; ``image_token_ratio_list =
  eval(...)``; ``.insert(0, 1.0)`` -> ratios r = [1.0, 0.5, 0.25, 0.125]. The ratio list is
  passed literally; lambda is only the paper's name for the geometric structure
  (r_k = lambda**k). Nothing in the code computes lambda**k.

Where a stage boundary sits, and which attention ranks the tokens
-----------------------------------------------------------------
- M:1187-1223: after decoder layer ``layer_idx`` has run, ``rank_layer = layer_idx + 1``; if
  ``rank_layer in layer_list`` the sequence is ranked and cut. With [8,16,24] the cuts happen
  after layers 7, 15, 23 (0-based): layers 0-7 see 576 image tokens, 8-15 see 288, 16-23 see
  144, 24-31 see 72 (13B: 24-39 see 72).
- M:1321-1342: the scores are RECOMPUTED from the current hidden states (the output of layer
  rank_layer-1 = the input of layer ``rank_layer``) with the projections of the NEXT layer,
  ``self.layers[rank_layer]`` (0-based; i.e. the first layer of the new stage): its
  ``input_layernorm`` (M:1323), ``q_proj``/``k_proj`` (M:1331-1332), RoPE applied with the
  current ``position_ids`` (M:1340-1342; rotary BEFORE the dot product, as in the layer
  itself). This is exactly the attention map layer ``rank_layer`` would compute on the unpruned
  stage input; it is NOT the previous layer's ``output_attentions`` map. Layer ``rank_layer``
  then runs on the pruned sequence. (LC:392-403 hooks the same layer: a forward pre-hook on
  block ``layer_list[k]``, LC:102-132.)
- Query (inference): ONE row, the last instruction token: M:1390-1392
  ``prompt_total_len = self.prompt_len[i] + image_tokens[i]``; query = position
  ``prompt_total_len - 1``. ``prompt_len`` = number of text ids (placeholder excluded, A:425-429)
  and ``image_tokens[i]`` = the current image count, so with one image and right padding this
  is the LAST token of the prompt (for the vicuna_v1 template, the ':' of "ASSISTANT:").
  Training (M:1371-1387) instead uses every token immediately before an answer span
  (labels != -100 preceded by -100) and averages over them (M:1401); not used at inference.
- Logits: M:1395 ``q @ k^T / sqrt(head_dim)`` per head (no GQA handling: key_states keep
  ``num_key_value_heads``; fine for Vicuna, H = H_kv = 32 / 40).
- Mask: M:1346-1348 + M:1396, the causal 4D mask; for the last query row every key of the
  current sequence is visible.
- Softmax: M:1397 over ALL keys of the current sequence (BOS, system text, image tokens,
  instruction) in float32, cast back to the model dtype (fp16 in the eval runs,
  builder.py:44). The image columns are NOT renormalised.
- Heads: M:1399 plain MEAN over heads (of probabilities), then M:1400 slice the image columns
  ``[image_index, image_index + image_tokens[i])`` (image tokens assumed contiguous, first
  image only: A:417-421), M:1401 mean over the query rows (one row at inference).
- Selection: M:1405 ``topk(keep_length[i])``, M:1406 ``+ image_index``, M:1407 ascending sort;
  M:1409-1410 new sequence = ``[:image_index] + kept image rows + [image_index+image_tokens:]``.
  Every text token survives; kept image tokens stay in their ORIGINAL ORDER.

How many are kept
-----------------
M:1306-1307: ``image_tokens = int(n0 * r[stage])`` (count in the current sequence) and
``keep_length = int(n0 * r[stage + 1])`` where ``n0`` = the ORIGINAL image count
(A:474, 576 for LLaVA-1.5). ``int`` truncates; each count is computed from n0 and the
cumulative ratio, not from the previous stage's count. [8,16,24] x [.5,.25,.125] ->
576 / 288 / 144 / 72. ``official_pdrop_counts`` below.

Positions, mask, KV cache, decoding
-----------------------------------
- Positions are RENUMBERED, not preserved: M:1445-1446 ``position_ids[i, :cur_len] =
  arange(0, cur_len)`` after every cut (``position_ids`` is never None there: M:1151-1156
  builds it, and HF generate passes ``cumsum(mask)-1``, M:1626-1632). So the kept tokens get
  contiguous positions 0..L'-1 and the next stage's scores (M:1342) use those renumbered
  positions too. (LC:286-289 does the same.)
- Mask: rebuilt from the shortened 2D mask (M:1412, 1438-1439) and re-prepared (M:1240-1257);
  for batch 1 without padding SDPA/flash get ``None`` -> plain causal attention. Runs use SDPA
  (transformers 4.37 default, no attn_implementation set in builder.py:27-47 unless
  use_flash_attn). The eager path would fail the mask-size check (M:422-426) after a cut.
- KV cache: no special handling. Each layer caches the keys/values of the sequence it saw, so
  layers of stage k hold L0 - n0 + n_k cached entries (DynamicCache, per layer).
- Decoding (q_len == 1, M:1224 / M:1259-1268): nothing is ranked or dropped; at each boundary
  the decode token's position id is lowered by ``int(n0*r[k]) - int(n0*r[k+1])`` so that in
  stage k it equals L0 - n0 + n_k + t, consistent with the renumbered prefill. The decode
  token attends every cached entry of that layer (SDPA, mask None). (LC:68-69 skips decoding
  WITHOUT this position shift: a difference of LC from the official code.)

Budget "192/128/64 tokens" (PDrop paper Table 2; VisionZip arXiv 2412.04467 Table 1)
------------------------------------------------------------------------------------
The number is the AVERAGE number of visual tokens per LLM layer in prefill,
sum_l n(l) / num_layers (issue Cooperx521/PyramidDrop#22, user summary of the author's answer in
#10; author in #29, 2025-11-11: keep the lambda, lambda^2, ... structure and solve
"average = target" for lambda, example lambda = 0.19 with layer_list 2, 8, 16 for 64). It is
NOT a per-stage count: with [8,16,24] the average is >= 576*8/32 = 144 for any lambda, so 128
and 64 are unreachable there (issue #10). The repo ships no 192/128/64 scripts, and the
VisionZip repo (HEAD 3151f6df4fca36a4cd1c985e5956e725b1f9ad02) contains no PDrop code or
config (``git grep -i pdrop`` is empty). ``official_pdrop_average`` / ``lambda_for_average``
compute the mapping; see ``BUDGETS``.

Ties
----
``torch.topk`` tie order is unspecified (and scores are fp16 in the official runs, so exact
ties are plausible). This reference breaks ties deterministically: higher score first, then
the EARLIER position. It computes in float64 (no fp16 rounding), so near-ties may resolve
differently from an official fp16 run.
"""

import math

import torch

OFFICIAL_COMMIT = "6444f304aee4b7edcb022839fb9e8cd07859704a"

# scripts/v1_5/pdrop_eval/*.sh (e.g. textvqa.sh:9-10): the LLaVA-1.5 setting (lambda = 0.5).
LLAVA15_LAYER_LIST = (8, 16, 24)
LLAVA15_RATIO_LIST = (0.5, 0.25, 0.125)
LLAVA15_IMAGE_TOKENS = 576
LLAVA15_7B_LAYERS = 32

# Average-token budgets with the author's suggested 3-cut layout [2, 8, 16] (issue #29); the
# 64 entry is the author's own lambda = 0.19, the others solve the same equation (continuous,
# rounded to 2 decimals). Values: (layer_list, lambda, per-stage counts, average over 32 layers).
# NOT the paper's published settings: neither the repo nor the paper text found gives the
# layer_list/lambda behind its Table 2 (192/128/64); the 192 and 128 rows are derived here.
BUDGETS = {
    192: ((2, 8, 16), 0.56, (576, 322, 180, 101), 191.875),
    128: ((2, 8, 16), 0.42, (576, 241, 101, 42), 127.4375),
    64: ((2, 8, 16), 0.19, (576, 109, 20, 3), 62.9375),
}


def _ratio_list(layer_list, ratio):
    """The ``image_token_ratio_list`` without the leading 1.0: a float lambda becomes
    [lambda, lambda**2, ...] (the paper's structure); a sequence is used literally (as E:95)."""
    if isinstance(ratio, (int, float)):
        return [float(ratio) ** (k + 1) for k in range(len(layer_list))]
    ratios = [float(r) for r in ratio]
    if len(ratios) != len(layer_list):
        raise ValueError("need one ratio per entry of layer_list")
    return ratios


def official_pdrop_counts(image_len, layer_list, ratio):
    """Image-token count in each stage: [n0, int(n0*r1), int(n0*r2), ...] (M:1306-1307, with
    r0 = 1.0 prepended as E:96). ``ratio``: lambda (float) or the literal ratio list."""
    ratios = [1.0] + _ratio_list(layer_list, ratio)
    return [int(image_len * r) for r in ratios]


def official_pdrop_layer_counts(
    image_len, layer_list, ratio, num_layers=LLAVA15_7B_LAYERS
):
    """Visual tokens seen by each decoder layer in prefill (cut after layer rank_layer-1,
    M:1222-1223: layers [0, l1) see n0, [l1, l2) see n1, ...)."""
    counts = official_pdrop_counts(image_len, layer_list, ratio)
    bounds = [0] + list(layer_list) + [num_layers]
    out = []
    for stage, count in enumerate(counts):
        for _ in range(bounds[stage], bounds[stage + 1]):
            out.append(count)
    return out


def official_pdrop_average(image_len, layer_list, ratio, num_layers=LLAVA15_7B_LAYERS):
    """Average visual-token count over all LLM layers (the "192/128/64" budget convention)."""
    per_layer = official_pdrop_layer_counts(image_len, layer_list, ratio, num_layers)
    return sum(per_layer) / num_layers


def lambda_for_average(
    target, layer_list, image_len=LLAVA15_IMAGE_TOKENS, num_layers=LLAVA15_7B_LAYERS
):
    """lambda solving the continuous equation sum_k (l_{k+1}-l_k) * n0 * lambda**k / L = target
    (the author's recipe in issue #29); bisection. Truncation (int) makes the realised average a
    little lower; check with ``official_pdrop_average``."""
    bounds = [0] + list(layer_list) + [num_layers]

    def avg(lam):
        return (
            sum(
                (bounds[k + 1] - bounds[k]) * image_len * lam**k
                for k in range(len(bounds) - 1)
            )
            / num_layers
        )

    if target < avg(0.0) or target > avg(1.0):
        raise ValueError(
            f"target {target} unreachable with layer_list {list(layer_list)}"
        )
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if avg(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _rank_and_keep(scores, image_positions, keep, seq_len):
    """Top-``keep`` image positions by score (ties: earlier position), plus every non-image
    position; ascending (M:1405-1410)."""
    image_positions = [int(p) for p in image_positions]
    if keep < 0:
        raise ValueError("keep must be >= 0")
    keep = min(keep, len(image_positions))
    order = sorted(
        range(len(image_positions)), key=lambda j: (-scores[j], image_positions[j])
    )
    kept = {image_positions[j] for j in order[:keep]}
    image_set = set(image_positions)
    survivors = [p for p in range(seq_len) if p not in image_set or p in kept]
    return torch.tensor(survivors, dtype=torch.long)


def official_pdrop_stage_keep(
    query_last, keys, image_positions, keep, query_position=None
):
    """One PDrop stage cut (inference), from the stage layer's rotated query/keys.

    query_last: (H, d) query of the last instruction token, computed by layer ``rank_layer``
        (the first layer of the NEW stage) from ``input_layernorm`` of its input, RoPE applied
        with the current (renumbered) positions (M:1321-1342, 1391).
    keys: (H, L, d) keys of the same layer for all L tokens of the current sequence, RoPE applied.
    image_positions: positions (into the current sequence) of its image tokens (contiguous in the
        official code: M:1400 slices ``[image_index, image_index + image_tokens)``).
    keep: number of image tokens to keep, ``int(n0 * r[stage + 1])`` (official_pdrop_counts).
    query_position: position of the query row (default L - 1, the last prompt token); keys after
        it are masked (causal mask, M:1396).

    Returns the sorted positions of every token that survives: all non-image tokens plus the
    ``keep`` image tokens with the highest head-mean softmax probability (M:1395-1407).
    Computed in float64 with plain loops; ties -> earlier position.
    """
    q = query_last.detach().to(torch.float64).cpu()
    k = keys.detach().to(torch.float64).cpu()
    num_heads, head_dim = q.shape
    seq_len = k.shape[1]
    if k.shape[0] != num_heads or k.shape[2] != head_dim:
        raise ValueError("keys must be (H, L, d) matching query_last (H, d)")
    qpos = seq_len - 1 if query_position is None else int(query_position)
    scale = 1.0 / math.sqrt(head_dim)

    # head-summed softmax probabilities per key position (mean = sum / H)
    prob_sum = [0.0] * seq_len
    for h in range(num_heads):
        logits = []
        for j in range(qpos + 1):  # causal: keys 0..qpos visible
            dot = 0.0
            for c in range(head_dim):
                dot += float(q[h, c]) * float(k[h, j, c])
            logits.append(dot * scale)
        peak = max(logits)
        exps = [math.exp(x - peak) for x in logits]
        total = sum(exps)
        for j in range(qpos + 1):
            prob_sum[j] += exps[j] / total  # masked keys (j > qpos) get probability 0
    scores = [prob_sum[int(p)] / num_heads for p in image_positions]
    return _rank_and_keep(scores, image_positions, keep, seq_len)


def official_pdrop_stage_keep_from_attention(
    attention, image_positions, keep, query_position=-1
):
    """Same cut from an attention-probability map of the stage layer, e.g. HF eager
    ``output_attentions=True`` of layer ``rank_layer`` (0-based) run on the UNPRUNED input of
    that stage: (1, H, L, L) or (H, L, L). Uses row ``query_position`` (default last), mean over
    heads, image columns only. Note: in a full unpruned HF forward, ``attentions[rank_layer]`` is
    the official map only for the FIRST cut; later cuts see the already-pruned, renumbered
    sequence."""
    att = attention.detach().to(torch.float64).cpu()
    if att.dim() == 4:
        if att.shape[0] != 1:
            raise ValueError("batch of one expected")
        att = att[0]
    num_heads, seq_len, _ = att.shape
    row = query_position % seq_len
    scores = []
    for p in image_positions:
        s = 0.0
        for h in range(num_heads):
            s += float(att[h, row, int(p)])
        scores.append(s / num_heads)
    return _rank_and_keep(scores, image_positions, keep, seq_len)
