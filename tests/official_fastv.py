"""Plain transcription of the official FastV token-selection rule (reference for tests).

Source: github.com/pkunlp-icler/FastV, commit d1659729b5bf1be225e99ee15783deeea80f63b1
(2025-01-04).  File abbreviations used below (all at that commit):

  ML  = src/transformers/src/transformers/models/llama/modeling_llama.py   (the paper's
        LLaVA-1.5 code path; patched transformers used with src/LLaVA)
  HF  = src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py
        (``fastv_forward`` for llava-hf, transformers 4.39.0.dev0; driven by demo-hf.py)
  LM  = src/FastV/lmms-eval/fastv_kvcache.py  (contributed KV-cache port for lmms-eval)
  AOK = src/FastV/inference/eval/inference_aokvqa.py,  OCR = .../inference_ocrvqa.py

Which attention, which row, which reduction (identical in ML, HF, LM)
-------------------------------------------------------------------
* The pruning step runs at the top of the decoder loop when ``idx == K`` (ML:736, HF:1072,
  LM:122) and reads ``layer_outputs[1]`` (ML:738, HF:1074) -- the attention probabilities
  returned by the PREVIOUS iteration, i.e. by decoder layer K-1 (0-based).  So with the
  default K=2 the scores come from the 2nd layer (0-based index 1) and layers 0..K-1 see
  every token; the first layer that sees the pruned sequence is layer K.  In HF's
  ``output_attentions`` tuple that is ``attentions[K-1]``.  HF forces
  ``output_attentions=True`` only for layer K-1 (HF:1105-1108); ML relies on the caller
  passing ``output_attentions=True`` (AOK:284, OCR:263); LM re-runs layer K-1 a second
  time with ``output_attentions=True`` just to get the map (LM:133-142).
* Probabilities are the eager ones: scores/sqrt(d) + additive causal mask (ML:333-346),
  softmax over the LAST dim = over all (causally visible) keys of the full sequence, in
  fp32 then cast back to the model dtype (ML:349; HF:380).  The official runs are fp16
  (src/LLaVA/llava/model/builder.py:43; AOK:193 loads 4-bit with fp16 compute,
  builder.py:34-38), so official scores are fp16 -- this reference uses float64.
* ``torch.mean(last_layer_attention, dim=1)[0]`` (ML:740, HF:1076, LM:124): MEAN over
  heads (sum would rank identically), batch element 0 only.
* ``[-1]`` (ML:742, HF:1078, LM:124): ONE query row, the last token of the whole current
  sequence (in prefill: the last prompt token, e.g. ':' of "ASSISTANT:"; under
  ``use_cache=False`` generation: the newest token).  Not an average over all queries --
  the paper's wording ("average attention received") differs; the code is what ran.
* Only the image window ``[SYS_LENGTH, SYS_LENGTH+IMAGE_TOKEN_LENGTH)`` is ranked
  (ML:744); ``.topk(ATTENTION_RANK).indices + SYS_LENGTH`` (ML:746).  Every non-image
  token is always kept: ``cat(arange(SYS), top, arange(SYS+IMG, L))`` then ``.sort()``
  (ML:748-750; HF:1084-1086; LM:126-127).  So kept tokens stay in original order.
* Ties: ``torch.topk`` gives no tie order guarantee (CPU/CUDA may differ); with fp16
  scores exact ties are possible.  THIS REFERENCE breaks ties by EARLIER position.
* SYS_LENGTH / IMAGE_TOKEN_LENGTH are constants, not detected: scripts pass 36 / 576
  (eval_aokvqa_latency_fastv_inplace.sh:17-18, eval_ocrvqa_fastv_token_mask.sh:16-17);
  LM hard-codes 35 / 576 (LM:124-126); demo-hf.py:18-19 uses start 5 for the plain
  "USER: <image>" prompt.  (FastV issue #51 asks why 36 and not 35.)  Here the caller
  passes ``image_start`` / ``image_len`` explicitly.

How many are kept
-----------------
* ML: the count itself, ``ATTENTION_RANK`` = ``--fast-v-attention-rank`` (ML:720, 746);
  scripts use 72/144/288/432 = (1-R)*576 (comment at eval_aokvqa_latency_fastv_inplace.sh:7;
  the R list in the comment at eval_ocrvqa_fastv_token_mask.sh:7 is off by one step).
* HF: ``round(FASTV_image_token_length*(1-FASTV_r))`` with r = DROP ratio (HF:1048, 1082);
  Python round (half-to-even).  demo-hf.py:16-17: K=3, r=0.75 -> 144.
* LM: ``int(576 * ratio)`` with ratio = KEEP ratio, K=3, ratio=0.5 hard-coded (LM:119-125).
* ModelTC/LightCompress (9701d035) llmc/compression/token_reduction/fastv.py:67 copies HF:
  ``round(image_token_length * (1 - rate))``; configs/.../FastV/fastv.yml:19-20 uses
  pruning_loc=3, rate=0.778 -> round(127.87) = 128 kept AFTER layer 3 (prefill only,
  ``prefill_wrapper``; scores from block pruning_loc-1, fastv.py:120-126).
  See ``keep_count_*`` helpers below.

Positions, masks: "inplace" vs masking variant
-----------------------------------------------
* Inplace (ML:730-760, ``fast_v_inplace=True``, real speed-up): hidden states gathered
  ``hidden_states[:, keep_indexs, :]`` (ML:754); ``position_ids = keep_indexs`` -> kept
  tokens KEEP THEIR ORIGINAL RoPE positions, with gaps (ML:756; HF:1058/1093; LM:131;
  LightCompress fastv.py:89).  The mask is rebuilt as a plain causal mask over the
  compacted length, padding ignored (``_prepare_decoder_attention_mask(None, ...)``,
  ML:758-760; HF:1095-1097).  Layers > K reuse it (no branch for idx > K).  K must be
  >= 1 (ML:724-725; K=0 would read an undefined ``layer_outputs``).
* Masking (ML:764-808, default ``fast_v_inplace=False``; README:97 "masks out the
  discarded tokens (no speed up)"): nothing is removed and positions are untouched;
  from layer K on a key-padding mask hides the non-selected image tokens from every
  query (ML:785-792, reused for idx > K at ML:807-808).  The visible set equals the
  inplace keep set, so for kept tokens both variants are the same computation.  Layers
  < K get an all-ones mask, ignoring the caller's padding mask (ML:765-771).  K=0 keeps a
  RANDOM subset of ATTENTION_RANK image tokens (ML:794-804).

Decoding
--------
* ML inplace: "KV-Cache not supported" (ML:729, AOK:171); AOK runs ``use_cache=False``,
  ``max_new_tokens=1`` (AOK:281-282), so only the prefill matters.  Without a cache every
  generation step re-runs the whole sequence and RE-SELECTS with the newest token's row.
* ML masking: OCR runs ``use_cache=True, output_attentions=True`` (OCR:261-263); at each
  decode step idx==K re-selects from the new token's 1xL row and re-masks all cached
  image keys (nothing is evicted) -> re-pruned every step.
* HF: ``use_cache=False`` (demo-hf.py:52) -> re-pruned every step; ``use_cache=True`` ->
  pruned once in prefill (``hidden_states.shape[1] != 1``, HF:1034), decode uses the
  plain causal mask (HF:1065-1066) over the pruned cache: "static" pruning, which README
  :194 says diverges from "the original fastv method, where image tokens were subject to
  re-pruning during each forward pass".  LM and LightCompress: prefill only (LM:122).

Budget mapping used by SparseVLM / VisionZip ("FastV at 192/128/64")
--------------------------------------------------------------------
* SparseVLMs (Gumpest/SparseVLMs, snapshot 26a5f488) contains no FastV code in any
  stored commit; its token counts are "equivalent" counts = visual tokens averaged over
  all decoder layers: modelling_sparse_llama.py:359 + 368 (``sum(num_token) /
  num_layers``), score.py:11 comment "2*576 4*300 10*200 16*110"; authors' formula
  ``T = {(L1-L0)*T0 + (L2-L1)*T1}/L2`` (SparseVLMs issues #4, #10).  VisionZip authors
  (VisionZip issue #22): "the table reports the average number of tokens across all
  decoder layers.  Some of the reported results follow the SparseVLM."
* So "FastV at 64" is NOT 64 kept after layer K.  For LLaVA-1.5-7B (32 layers, 576 image
  tokens), B = (K*576 + (32-K)*R)/32.  The K SparseVLM used is not published; with the
  default K=2: R = (32B - 1152)/30 -> B=192: R~166.4, 128: R~98.1, 64: R~29.9 (~30).
  (SparseVLMs issue #12 uses the same formula: K=2, R=144 -> 171.)  Other works
  (LightCompress, later papers) instead set R = budget, kept after layer K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

OFFICIAL_COMMIT = "d1659729b5bf1be225e99ee15783deeea80f63b1"


def official_fastv_keep(
    attentions: Sequence[torch.Tensor] | torch.Tensor,
    image_start: int,
    image_len: int,
    keep: int,
    k: int = 2,
) -> torch.LongTensor:
    """Sorted positions (into the length-L prefill) of every token entering layer ``k``.

    ``attentions[i]`` is layer i's eager attention probabilities, shape (B, H, L, L)
    (HF ``output_attentions=True`` of the FULL unpruned prefill); batch element 0 is used,
    as in ML:740.  Score of image token j = mean over heads of attentions[k-1][0, :, L-1, j]
    (float64).  The ``keep`` highest-scoring image tokens survive, ties -> earlier position.
    All positions outside [image_start, image_start + image_len) always survive.
    """
    k = int(k)
    if k < 1:
        raise ValueError("FastV needs k >= 1: the scores come from layer k-1 (ML:724-725, 738)")
    if k > len(attentions):
        raise ValueError(f"need attentions of layer k-1={k - 1}, got {len(attentions)} layers")
    attn = attentions[k - 1]
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected (B, H, L, L) full-prefill attentions, got {tuple(attn.shape)}")
    attn = attn[0].to(torch.float64)  # (H, L, L); official: torch.mean(..., dim=1)[0]
    num_heads, seq_len = attn.shape[0], attn.shape[-1]
    image_start, image_len, keep = int(image_start), int(image_len), int(keep)
    if image_start < 0 or image_len < 0 or image_start + image_len > seq_len:
        raise ValueError(f"image window [{image_start}, {image_start + image_len}) outside length {seq_len}")
    if not 0 <= keep <= image_len:
        raise ValueError(f"keep={keep} must be in [0, {image_len}] (torch.topk would fail)")

    last = seq_len - 1  # ``[-1]``: the last token of the whole sequence is the only query
    scores = []
    for j in range(image_len):
        total = 0.0
        for h in range(num_heads):
            total += float(attn[h, last, image_start + j])
        scores.append(total / num_heads)  # mean over heads

    order = sorted(range(image_len), key=lambda j: (-scores[j], j))  # ties: earlier position
    kept = list(range(image_start))
    kept += [image_start + j for j in order[:keep]]
    kept += list(range(image_start + image_len, seq_len))
    kept.sort()
    return torch.tensor(kept, dtype=torch.long)


def keep_count_hf(image_len: int, drop_ratio: float) -> int:
    """HF:1048/1082 and LightCompress fastv.py:67: ``round(image_len * (1 - r))``, r = drop ratio."""
    return round(image_len * (1 - drop_ratio))


def keep_count_lmms(keep_ratio: float, image_len: int = 576) -> int:
    """LM:125: ``int(576 * ratio)``, ratio = keep ratio (truncation)."""
    return int(image_len * keep_ratio)


def equivalent_tokens(k: int, kept: float, num_layers: int = 32, image_len: int = 576) -> float:
    """SparseVLM/VisionZip "equivalent" count: visual tokens averaged over all decoder layers."""
    return (k * image_len + (num_layers - k) * kept) / num_layers


def kept_for_equivalent_budget(budget: float, k: int = 2, num_layers: int = 32, image_len: int = 576) -> float:
    """Inverse of ``equivalent_tokens`` (unrounded; how SparseVLM rounded it is unpublished)."""
    kept = (num_layers * budget - k * image_len) / (num_layers - k)
    if kept < 0 or math.isnan(kept):
        raise ValueError(f"budget {budget} is below what K={k} full layers already cost")
    return kept
