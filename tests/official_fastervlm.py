"""Plain, loop-based transcription of the official FasterVLM selection rule (LLaVA-1.5).

Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning",
arXiv 2412.01818 v1. Official code: github.com/Theia-4869/FasterVLM.
Files under ``llava/model`` are byte-identical from the first commit
417444347a23d0c1d100610d35d6281a493f82bf through fe7ff7ff2a6e90b64043e2169093ba425baf9374
(Dec 3 2024, arXiv v1 date) and c994e9e488b0fe5942c0ea8c8f41953a38a570c8 (Dec 15 2024);
line numbers below are for c994e9e488b0fe5942c0ea8c8f41953a38a570c8. The newest snapshot,
f5d5f12037e105a51865ecb4b28a73cd86eb4921 (HEAD, Jun 2025), only reorders/renames
``encode_images`` (llava_arch.py:140-157 there) and drops the index sort; the selection is
the same.

Which layer
-----------
Features AND attention come from the SAME tower layer: ``mm_vision_select_layer`` (-2 for
LLaVA-1.5).

- clip_encoder.py:37  ``image_features = image_forward_outs.hidden_states[self.select_layer]``
- clip_encoder.py:38  ``image_attentions = image_forward_outs.attentions[self.select_layer]``

With HF CLIP (24 layers) ``hidden_states[-2]`` is the OUTPUT of encoder layer index 22 and
``attentions[-2]`` is the softmax map computed INSIDE that same layer 22 (its queries/keys
come from layer_norm1 of that layer's input, hidden_states[-3]). It is NOT the attention that
the next layer (23) computes on hidden_states[-2]. So ``cls_attention`` must be the
attention of the layer whose output is ``hidden``.

Steps (all citations: c994e9e, path relative to the repo root)
------------------------------------------------------------
1. Query row / columns: llava/model/multimodal_encoder/clip_encoder.py:39-41 - with the
   default ``mm_vision_select_feature='patch'`` (clip_encoder.py:15) the features are
   ``hidden[:, 1:]`` (CLS dropped) and the scores are ``attentions[:, :, 0, 1:]``: the CLS
   query row (row 0), per head, restricted to the 576 patch columns. The CLS column is simply
   dropped; the remaining probabilities are NOT renormalised.
2. Softmax: the probabilities are HF CLIPAttention's ``output_attentions`` map
   (softmax(q k^T * d^-0.5) over all N=577 keys incl. CLS), requested with
   ``output_attentions=True`` at clip_encoder.py:55/60. Tower runs in fp16
   (llava/model/builder.py:43, :159; pixel values fp16 in llava/eval/model_vqa_loader.py:115);
   with the pinned transformers==4.37.2 (pyproject.toml:17) CLIP's softmax runs in the
   module dtype (fp16). Maps cast to images.dtype (fp16) at clip_encoder.py:62.
3. Head combination: llava/model/llava_arch.py:145 ``image_attentions.mean(dim=1)`` - MEAN
   over the 16 heads (a ``max`` variant is commented out at :144). Mean vs sum gives the
   same ranking. Official result is an fp16 tensor (rounded mean); here the mean is taken
   in float32 (see "Ties" below).
4. Selection: llava_arch.py:156 ``torch.topk(image_attentions, k=visual_token_num, dim=1)[1]``
   - top-k over the 576 patch scores, k = the integer passed as ``--visual-token-num``
   (llava/eval/model_vqa_loader.py:154, llava_llama.py:52/61). No CLS is kept, no extra
   token, no merging/recycling of the dropped tokens. k is used as-is (64 -> 64 tokens).
5. Budget <-> ratio: no code converts a ratio; README.md:84-98 (c994e9e) computes the integer
   by hand: 576*(1-0.75)=144, 576*(1-0.9)=57.6 -> 58, 576*(1-0.95)=28.8 -> 29 (i.e. rounded,
   equivalently ceil for these ratios). Scripts take the integer (scripts/v1_5/eval/
   textvqa.sh:5,13).
6. Order: llava_arch.py:157 sorts the indices ascending, but it is irrelevant: :160-161 build
   a boolean mask (scatter), and :253 ``image_feature[index_mask]`` gathers in ORIGINAL
   positional (raster) order. (HEAD removed the sort; order unchanged.)
7. Which features: the projector is applied to ALL 576 patch features of layer -2
   (llava_arch.py:163) and the mask selects rows afterwards (:250-255). The projector is
   token-wise, so this equals gathering the pre-projector layer -2 patch rows first, which is
   what this reference returns (``out`` = rows of ``hidden``, pre-projector).

Ties: ``torch.topk`` tie order is unspecified (CUDA, fp16 scores make exact ties
plausible). This reference breaks ties deterministically: higher score first, then lower
position. Scores here are float32 head means (not rounded to fp16), so near-ties may resolve
differently from the official fp16 run.
"""

import torch


def reference_fastervlm(hidden, cls_attention, keys, tokens):
    """hidden: (N, D) float tensor, output of tower layer L (the layer LLaVA reads, -2), token 0 = CLS.
    cls_attention: (H, N) attention probabilities of the CLS query of the layer the official code uses (per head).
    keys: (N, D) projected keys of layer L (unused if the method does not need them).
    tokens: number of visual tokens to pass to the LLM.
    Returns (out (tokens, D), kept (tokens,) long: positions in [0, N) of the rows of `out`).

    The official layer is the same layer L (attentions[-2] with hidden_states[-2]), i.e. the
    CLS-row softmax computed inside the layer whose output is ``hidden``. ``keys`` is unused.
    """
    del keys  # FasterVLM needs only the [CLS] attention row.
    n = hidden.shape[0]
    heads = cls_attention.shape[0]
    assert cls_attention.shape[1] == n, "cls_attention must cover all N tokens (CLS included)"
    tokens = int(tokens)
    if not 1 <= tokens <= n - 1:
        # official torch.topk(k > 576) raises; k must not exceed the patch count
        raise ValueError(f"tokens must be in [1, {n - 1}], got {tokens}")

    # Step 1+3: score of patch j (positions 1..N-1; column 0 = CLS self-attention is dropped,
    # no renormalisation) = mean over heads of the CLS-query probability.
    score = {}
    for j in range(1, n):
        total = torch.zeros((), dtype=torch.float32)
        for h in range(heads):
            total = total + cls_attention[h, j].float()
        score[j] = float(total / heads)

    # Step 4: top-`tokens` patches by score (ties: lower position first).
    ranked = sorted(range(1, n), key=lambda j: (-score[j], j))
    chosen = ranked[:tokens]

    # Step 6: boolean-mask gather keeps the original positional order.
    kept = sorted(chosen)

    # Step 7: the rows of layer L (pre-projector); CLS (position 0) is never kept.
    out = torch.stack([hidden[j] for j in kept])
    return out, torch.tensor(kept, dtype=torch.long)
