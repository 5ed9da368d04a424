"""Plain layer-loop transcriptions of the official PDrop and SparseVLM prefills (batch 1): the
decoder's own layers run one by one on a shrinking sequence, cut where the official code cuts,
with the official position rule, so the in-LLM mechanism (``visionzip_eval.methods.llm_pruning``) can be
checked end to end: same cuts, same positions, same last-token hidden state.

PDrop (Cooperx521/PyramidDrop 6444f304, M = ``llava/model/modeling_llama_pdrop.py``): before
layer ``layer_list[s]`` runs, the sequence is ranked with that layer's own projections of its
input (M:1321-1342, ``official_pdrop.official_pdrop_stage_keep``) and cut (M:1405-1410); then
``position_ids = arange(L')`` (M:1445-1446). ``renumber=False`` keeps the kept tokens' original
positions instead (the project's ``positions=original``, FastV's rule).

SparseVLM (Gumpest/SparseVLMs b72c5d6 / 535f8ba, MSL = ``modelling_sparse_llama.py``): text
raters from the input embeddings once (MSL:215-220); pruning layer ``l`` runs on the whole
sequence, its attention map (recomputed as utils.py:111-132 does) scores the visual block and
its OUTPUT is cut and merged (MSL:251-283, ``official_sparsevlm.official_sparsevlm_layer``);
the new sequence is [prefix][kept visual][merged][text] with ``position_ids = arange(L')``
(MSL:278). The rope and layer calls are transformers' own (the official files are copies of
transformers 4.37's Llama); the mask is the plain causal one (batch 1, no padding: M:1240-1257,
utils.py:115-119).
"""

from __future__ import annotations

import torch
from official_pdrop import official_pdrop_stage_keep
from official_sparsevlm import official_sparsevlm_layer, official_text_raters


def _causal(length: int, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def _run_layer(decoder, layer, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    out = layer(
        hidden,
        attention_mask=_causal(hidden.shape[1], hidden.dtype),
        position_ids=positions[None],
        position_embeddings=decoder.rotary_emb(hidden, positions[None]),
    )
    return out[0] if isinstance(out, tuple) else out


def _rotated(decoder, layer, hidden: torch.Tensor, positions: torch.Tensor):
    """(H, L, d) queries and keys of ``layer`` on its input ``hidden`` (1, L, D), rope applied,
    grouped keys repeated (the official models have H = H_kv)."""
    attention = layer.self_attn
    d = attention.head_dim
    normed = layer.input_layernorm(hidden)
    q = attention.q_proj(normed).view(1, hidden.shape[1], -1, d).transpose(1, 2)
    k = attention.k_proj(normed).view(1, hidden.shape[1], -1, d).transpose(1, 2)
    cos, sin = decoder.rotary_emb(hidden, positions[None])
    cos, sin = cos[:, None], sin[:, None]

    def rotate(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], -1)

    q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q[0].double(), k[0].double()


def official_pdrop_prefill(decoder, embeds, image_start, image_len, layer_list, keep_counts, renumber=True):
    """The last position's final hidden state (after the norm) and, per stage, the ORIGINAL
    positions of the image tokens kept. ``keep_counts[s]``: image tokens kept at stage ``s``."""
    hidden = embeds
    positions = torch.arange(embeds.shape[1])
    origin = torch.arange(embeds.shape[1])
    image = list(range(image_start, image_start + image_len))
    kept_per_stage = []
    with torch.no_grad():
        for number, layer in enumerate(decoder.layers):
            if number in layer_list:
                count = keep_counts[layer_list.index(number)]
                q, k = _rotated(decoder, layer, hidden, positions)
                keep = official_pdrop_stage_keep(q[:, -1], k, image, count)
                hidden, origin, positions = hidden[:, keep], origin[keep], positions[keep]
                if renumber:
                    positions = torch.arange(len(keep))
                image = list(range(image_start, image_start + count))
                kept_per_stage.append(origin[image_start : image_start + count].tolist())
            hidden = _run_layer(decoder, layer, hidden, positions)
        return decoder.norm(hidden)[0, -1], kept_per_stage


def official_sparsevlm_prefill(decoder, embeds, image_start, image_len, pruning_layers, retain=None, scale_bias=None):
    """The last position's final hidden state and the visual count leaving every layer
    (MSL:331), v1 (``scale_bias``) or 535f8ba (``retain[i]`` top-k at ``pruning_layers[i]``)."""
    hidden = embeds
    positions = torch.arange(embeds.shape[1])
    raters = official_text_raters(embeds, image_start, image_len)
    visual, counts = image_len, []
    with torch.no_grad():
        for number, layer in enumerate(decoder.layers):
            before = hidden
            hidden = _run_layer(decoder, layer, hidden, positions)
            if number in pruning_layers and visual:
                q, k = _rotated(decoder, layer, before, positions)
                logits = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5 + _causal(q.shape[1], q.dtype)[0]
                attention = logits.softmax(-1)[None]
                block = torch.arange(image_start, image_start + visual)
                rows = image_start + visual + raters
                options = {"retain": retain[pruning_layers.index(number)]} if retain else {}
                if scale_bias:
                    options = {"scale": scale_bias[0], "bias": scale_bias[1]}
                result = official_sparsevlm_layer(attention, hidden, block, rows, **options)
                hidden = result.new_hidden.to(embeds.dtype)
                positions = result.new_position_ids[0]
                visual = result.new_num_visual
            counts.append(visual)
        return decoder.norm(hidden)[0, -1], counts
