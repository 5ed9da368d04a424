"""Plain transcription of the official DivPrune selection rule (reference for tests).

Source: github.com/vbdi/divprune, commit 799e2d950aa01ba7860907f5a6d86061f885dca6.
Every file:line below is at that commit.

Where it runs (LLaVA-1.5, env LAYER_INDEX=0, SUBSET_RATIO=<ratio>):
  * LLaVA/llava/model/llava_arch.py:365-385, at the end of
    ``prepare_inputs_labels_for_multimodal``, i.e. BEFORE the LLM, on the
    already-assembled input-embedding sequence ``new_input_embeds``.
  * llava_arch.py:374  ``visual_tokens = new_input_embeds[0][SYS_TOKEN_LEN:SYS_TOKEN_LEN+img_feature_len]``
    with SYS_TOKEN_LEN = 35 hard-coded (llava_arch.py:366) and
    img_feature_len = image_features.shape[1] = 576 (llava_arch.py:372).
    Those rows are exactly the post-projector image features
    (encode_images = vision tower -> mm_projector, llava_arch.py:141-144,
    spliced in unchanged at llava_arch.py:288-295). The vision tower uses
    select_feature='patch', which drops CLS (clip_encoder.py:80-81), so CLS is
    never involved. Only batch element 0 is measured (llava_arch.py:374).
  * dtype: the model is loaded in float16 (LLaVA/llava/model/builder.py:46),
    so the official distance matrix and the loop run in fp16 on GPU. This
    reference computes in ``features.dtype`` (pass fp16 to mimic; use
    float32/float64 for deterministic tests).

Selection (LLaVA/llava/model/llava_arch.py):
  1. distance = 1 - cosine similarity:  norm = M / ||M||_2 (row-wise),
     cos = norm @ norm.T  (147-150);  D = 1.0 - cos  (155).
  2. number kept = int(round(ratio * 576)) (153)  -> see ``official_num_kept``.
  3. s = empty long tensor of that length (157); greedy loop i = 0..k-1 (158).
  4. i == 0: scores = second-smallest value of every COLUMN of the full D
     (torch.topk(D, 2, dim=0, largest=False).values[1, :], line 165), i.e. each
     token's distance to its nearest *other* token (the smallest is the ~0
     diagonal); first token = argmax of that (169).
  5. i > 0: rows of D for the already selected s[:i] (162); scores = column-wise
     min over those rows = min distance of every token to the selected set
     (167); next = torch.argmax(scores) (169) -> first index on ties.
     Already-selected tokens are NOT masked out; they only lose because their
     self-distance D[j, j] is ~0 (possible duplicates; see note).
  6. Order passed to the LLM: selected indices + 35 are concatenated with the
     text indices and sorted (377-379: ``keep_indexs = keep_indexs.sort().values``),
     then ``new_input_embeds[:, keep_indexs]`` (381). So kept visual tokens are
     in ascending original position order, not selection order.
"""

import math  # noqa: F401  (kept for parity with the brief; not needed)

import torch


def official_num_kept(ratio, image_feature_length=576):
    """llava_arch.py:153  threshold_terms = int(round(threshold_ratio*image_feature_length)).

    Python round() = round-half-to-even. Default ratio 0.098 (run_Divprune.sh:11,
    README) -> round(56.448) = 56 tokens. For budgets 64/128/192 pass ratio
    64/576, 128/576, 192/576 (any ratio in ((k-0.5)/576, (k+0.5)/576) gives k).
    """
    return int(round(ratio * image_feature_length))


def reference_divprune(features, tokens):
    """Official DivPrune (max-min diversity greedy) selection for one image.

    features: (N, D) float tensor -- the post-projector image features of ONE
        image (LLaVA-1.5: 576 x 4096, CLS already excluded), i.e. the rows of the
        LLM input embeddings that hold the image (llava_arch.py:374). Distances
        are computed in features.dtype (official: float16).
    tokens: number of tokens to keep (official: int(round(ratio * N)),
        see ``official_num_kept``).
    Returns kept (tokens,) long: positions in [0, N), sorted ascending, which is
        the order the official code passes them to the LLM (llava_arch.py:379).
    """
    assert features.dim() == 2
    n = features.shape[0]

    # llava_arch.py:147-150 pairwise_cosine_similarity, then :155  1.0 - cos
    norm_matrix = features / features.norm(dim=1, keepdim=True)
    cosine_similarity = torch.mm(norm_matrix, norm_matrix.t())
    dist = 1.0 - cosine_similarity  # (N, N), symmetric, diagonal ~ 0

    # llava_arch.py:157
    s = torch.empty(tokens, dtype=torch.long, device=features.device)

    # llava_arch.py:158-170
    for i in range(tokens):
        if i == 0:
            # :160, :165 -- per column j, the 2nd smallest entry of dist[:, j]
            # (the smallest being the self-distance dist[j, j] ~ 0).
            scores = torch.empty(n, dtype=dist.dtype, device=dist.device)
            for j in range(n):
                column = dist[:, j]
                scores[j] = torch.topk(column, 2, largest=False).values[1]
        else:
            # :162 rows of the selected tokens; :167 column-wise min
            selected_rows = dist[s[:i]]  # (i, N)
            scores = torch.empty(n, dtype=dist.dtype, device=dist.device)
            for j in range(n):
                scores[j] = torch.min(selected_rows[:, j])
        # :169-170 argmax -> first index of the maximum on ties; no masking of
        # already-selected tokens (official behaviour).
        s[i] = torch.argmax(scores)

    # llava_arch.py:377-381 -- indices are sorted before gathering the embeddings
    kept = s.sort().values
    return kept
