"""VisionZip token selection as pure tensor functions (no model code).

Inputs come from one layer L of the vision tower (the one the VLM reads, LLaVA's -2):

- ``hidden``: (B, N, D) hidden states output by layer L, token 0 = CLS (towers with one);
- ``cls_attention``: (B, H, N) per-head attention scores of layer L: the attention
  probabilities of the CLS query (``cls_attention_row``), or, for towers without a CLS token
  (SigLIP), the mean attention each token receives from all queries (``received_attention``);
- ``keys``: (B, N, d) the layer's keys averaged over heads.

Everything is batched (no loop over images); scores, similarities and the merge run in
float32 whatever the input dtype, and the tokens come back in the input's dtype and device.
See ../shared/VISIONZIP.md for the specification this follows step by step.

``visionzip_select_reference`` is the other precision (``selection_precision="reference"``):
the official code's arithmetic, operation for operation in the model's dtype (fp16 for the
paper's runs), from layer L's projected queries and keys. In fp16 the CLS attention is rounded
(logits, probabilities, their sum over heads), so near the top-k boundary patches that float32
tells apart tie or swap, and the official ``topk`` then picks among the ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

MergeRule = Literal["reference", "average"]
# float32: scores and similarities in float32 (the default); reference: the official code's
# arithmetic in the input's dtype, its fp16 ties and all (visionzip_select_reference)
SelectionPrecision = Literal["float32", "reference"]
SELECTION_PRECISIONS = ("float32", "reference")


@dataclass
class Selection:
    """The result of a token reduction, pre-projector.

    ``tokens``: (B, K, D), the rows the LLM will receive (after the projector).
    ``dominant_index``: (B, dominant) positions in [0, N) of the kept tokens, ascending.
    ``contextual_index``: (B, contextual) positions of the contextual targets, target order.
    ``slot``: (B, N) for every tower token, the output row it went into (``-1``: dropped).
    """

    tokens: torch.Tensor
    dominant_index: torch.Tensor | None = None
    contextual_index: torch.Tensor | None = None
    slot: torch.Tensor | None = None


def cls_attention_row(
    query_cls: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention of the CLS query over all N tokens, per head, in float32 (float64 for
    float64 inputs).

    ``query_cls``: (B, D) projected query of token 0; ``keys``: (B, N, D) projected keys
    (bias included, unscaled). Returns (B, H, N). This is the only row of the layer's
    attention map VisionZip needs: O(N*D) instead of the full (N, N) map per head.
    """
    batch, tokens, dim = keys.shape
    head_dim = dim // num_heads
    scale = head_dim**-0.5 if scale is None else scale
    q = query_cls.to(work_dtype(query_cls)).reshape(batch, num_heads, 1, head_dim)
    k = keys.to(work_dtype(keys)).reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)).squeeze(2) * scale
    return logits.softmax(dim=-1)


def received_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_heads: int,
    scale: float | None = None,
    max_elements: int = 1 << 24,
) -> torch.Tensor:
    """Mean attention each token receives from all N queries, per head, in float32.

    ``queries``, ``keys``: (B, N, D) projected queries and keys of one layer (bias included,
    unscaled). Returns (B, H, N): column means of each head's (N, N) softmax map, the score
    VisionZip uses for towers without a CLS token. The map is never held whole: queries go in
    chunks so that one chunk's probabilities hold at most ``max_elements`` floats.
    """
    batch, tokens, dim = keys.shape
    head_dim = dim // num_heads
    scale = head_dim**-0.5 if scale is None else scale
    k = keys.float().reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)  # (B, H, N, d)
    q = queries.float().reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)
    chunk = max(1, max_elements // max(1, batch * num_heads * tokens))
    total = torch.zeros(batch, num_heads, tokens, dtype=torch.float32, device=keys.device)
    for start in range(0, tokens, chunk):
        logits = (q[:, :, start : start + chunk] @ k.transpose(-1, -2)) * scale  # (B, H, c, N)
        total += logits.softmax(dim=-1).sum(dim=2)
    return total / tokens


def head_mean_keys(keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, D) projected keys -> (B, N, D / H) averaged over heads (VisionZip's merge metric)."""
    batch, tokens, dim = keys.shape
    return keys.reshape(batch, tokens, num_heads, dim // num_heads).mean(dim=2)


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """Scores and similarities run in float32, or float64 where the input is (exact tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, D) rows at ``index`` (B, K) -> (B, K, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def grid_for(tokens: int, rows: int, cols: int) -> tuple[int, int]:
    """The most nearly square (h, w) with h * w == tokens that fits a rows x cols grid."""
    best = None
    for h in range(1, int(tokens**0.5) + 1):
        if tokens % h == 0:
            for gh, gw in ((h, tokens // h), (tokens // h, h)):
                if gh <= rows and gw <= cols and (best is None or abs(gh - gw) < abs(best[0] - best[1])):
                    best = (gh, gw)
    if best is None:
        raise ValueError(f"{tokens} tokens cannot be pooled from a {rows}x{cols} patch grid")
    return best


def select_dominant(
    scores: torch.Tensor, dominant: int, cls_token: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions into dominant (CLS + top ``dominant - 1`` patches) and the rest.

    ``scores``: (B, N) per-token score; with ``cls_token`` column 0 (CLS) is always kept and
    never ranked, without it (SigLIP) the top ``dominant`` tokens are kept.
    Returns ``(dominant_index (B, dominant), rest_index (B, N - dominant))``, both ascending.
    """
    if cls_token:
        top = scores[:, 1:].topk(dominant - 1, dim=1).indices + 1
    else:
        top = scores.topk(dominant, dim=1).indices
    return split_positions(top, scores.shape[1], cls_token)


def split_positions(top: torch.Tensor, tokens: int, cls_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``top`` (B, k) chosen positions in [0, tokens) (any order; CLS, position 0, is added with
    ``cls_token``) -> ``(dominant_index, rest_index)``, both ascending."""
    batch = top.shape[0]
    dominant = top.shape[1] + int(cls_token)
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=top.device)
    keep[:, 0] = cls_token
    keep.scatter_(1, top, True)
    # nonzero() walks row-major, so each row's positions come out ascending.
    dominant_index = keep.nonzero()[:, 1].reshape(batch, dominant)
    rest_index = (~keep).nonzero()[:, 1].reshape(batch, tokens - dominant)
    return dominant_index, rest_index


def contextual_targets(remaining: int, contextual: int, device=None) -> torch.Tensor:
    """Uniformly strided target positions within the list of remaining tokens."""
    step = max(1, remaining // contextual)
    return torch.arange(0, remaining, step, device=device)[:contextual]


def merge_contextual(
    hidden: torch.Tensor,
    metric: torch.Tensor,
    contextual: int,
    merge: MergeRule = "reference",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge R remaining tokens into ``contextual`` tokens.

    ``hidden``: (B, R, D), ``metric``: (B, R, d), both in positional order.
    Targets sit at strided positions; every other token joins the target whose metric is
    most cosine-similar. ``merge="reference"`` gives target + mean(members) (the reference
    code); ``"average"`` gives mean(target and members) (the paper's prose).
    Returns ``(tokens (B, C, D), target_pos (C,), member_slot (B, R))`` where ``member_slot``
    holds, per remaining token, the index of the contextual token it went into.
    """
    batch, remaining, dim = hidden.shape
    device = hidden.device
    target_pos = contextual_targets(remaining, contextual, device)
    is_target = torch.zeros(remaining, dtype=torch.bool, device=device)
    is_target[target_pos] = True
    member_pos = (~is_target).nonzero().squeeze(1)

    unit = F.normalize(metric.float(), dim=-1)
    similarity = unit[:, member_pos] @ unit[:, target_pos].transpose(1, 2)  # (B, M, C)
    assign = similarity.argmax(dim=-1)  # (B, M)

    members = hidden[:, member_pos].float()
    sums = torch.zeros(batch, contextual, dim, dtype=torch.float32, device=device)
    sums.scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, dim), members)
    counts = torch.zeros(batch, contextual, dtype=torch.float32, device=device)
    counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
    targets = hidden[:, target_pos].float()
    if merge == "reference":
        merged = targets + sums / counts.clamp(min=1).unsqueeze(-1)
    elif merge == "average":
        merged = (targets + sums) / (counts + 1).unsqueeze(-1)
    else:
        raise ValueError(f"unknown merge rule {merge!r}: use 'reference' or 'average'")

    member_slot = torch.empty(batch, remaining, dtype=torch.long, device=device)
    member_slot[:, target_pos] = torch.arange(contextual, device=device)
    member_slot[:, member_pos] = assign
    return merged.to(hidden.dtype), target_pos, member_slot


def visionzip_select(
    hidden: torch.Tensor,
    cls_attention: torch.Tensor,
    metric: torch.Tensor,
    dominant: int,
    contextual: int,
    merge: MergeRule = "reference",
    cls_token: bool = True,
) -> Selection:
    """The whole VisionZip reduction of one layer's outputs: (B, N, D) -> (B, dominant + contextual, D).

    Output rows: the dominant tokens (CLS first, positional order), then the contextual
    tokens (target order). ``cls_token=False`` (SigLIP): no token is kept unconditionally, the
    ``dominant`` best-scored tokens are.
    """
    tokens = hidden.shape[1]
    check_fits(dominant, contextual, tokens)
    scores = cls_attention.float().sum(dim=1)  # (B, N): attention scores summed over heads
    dominant_index, rest_index = select_dominant(scores, dominant, cls_token)
    contextual_tokens, target_pos, member_slot = merge_contextual(
        gather_rows(hidden, rest_index), gather_rows(metric, rest_index), contextual, merge
    )
    return _assemble(hidden, dominant_index, rest_index, contextual_tokens, target_pos, member_slot)


def check_fits(dominant: int, contextual: int, tokens: int) -> None:
    if dominant + contextual > tokens:
        raise ValueError(
            f"dominant + contextual = {dominant + contextual} exceeds the {tokens} tokens available"
        )


def _assemble(hidden, dominant_index, rest_index, contextual_tokens, target_pos, member_slot) -> Selection:
    """The Selection: dominant rows (positional order), then the contextual tokens."""
    batch, tokens, _ = hidden.shape
    dominant = dominant_index.shape[1]
    slot = torch.empty(batch, tokens, dtype=torch.long, device=hidden.device)
    slot.scatter_(1, dominant_index, torch.arange(dominant, device=hidden.device).expand(batch, -1))
    slot.scatter_(1, rest_index, member_slot + dominant)
    return Selection(
        tokens=torch.cat([gather_rows(hidden, dominant_index), contextual_tokens.to(hidden.dtype)], dim=1),
        dominant_index=dominant_index,
        contextual_index=rest_index[:, target_pos],
        slot=slot,
    )


# -- selection_precision="reference": the official arithmetic, in the input's dtype ------------


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, D) -> (B * H, N, D / H), contiguous: the layout CLIP's eager attention multiplies."""
    batch, tokens, dim = x.shape
    return x.view(batch, tokens, num_heads, dim // num_heads).transpose(1, 2).contiguous().view(
        batch * num_heads, tokens, dim // num_heads
    )


def reference_cls_scores(
    queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    """(B, N - 1) the patches' dominant-token scores as the official code computes them, in the
    input's dtype: the layer's whole attention map (scaled queries times keys, one batched
    matmul, softmax), the CLS query's row, summed over heads. ``queries``, ``keys``: (B, N, D)
    projected (bias included, unscaled). The full map is computed (not the CLS row alone) so
    that the matmul is the same call, hence the same rounding, as the official one."""
    batch, tokens, _ = keys.shape
    weights = torch.bmm(_heads(queries * scale, num_heads), _heads(keys, num_heads).transpose(1, 2))
    weights = weights.softmax(dim=-1).view(batch, num_heads, tokens, tokens)
    return weights[:, :, 0, 1:].sum(dim=1)


def reference_cls_head_mean(
    queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    """(B, N - 1) the CLS row's attention over the patches, averaged over heads, in the input's
    dtype: the eager CLIP map (softmax in the module dtype) and its head mean as FasterVLM
    (llava_arch.py:145) and VisPruner (ARCH:154) take them in their fp16 runs."""
    batch, tokens, _ = keys.shape
    weights = torch.bmm(_heads(queries * scale, num_heads), _heads(keys, num_heads).transpose(1, 2))
    weights = weights.softmax(dim=-1).view(batch, num_heads, tokens, tokens)
    return weights[:, :, 0, 1:].mean(dim=1)


def reference_head_mean_keys(keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, D) -> (B, N, D / H) the keys averaged over heads as the official code does (over the
    head axis of the (B, H, N, D / H) layout), in the input's dtype."""
    batch, tokens, dim = keys.shape
    return _heads(keys, num_heads).view(batch, num_heads, tokens, dim // num_heads).mean(1)


def visionzip_select_reference(
    hidden: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_heads: int,
    scale: float,
    dominant: int,
    contextual: int,
) -> Selection:
    """VisionZip with the official code's arithmetic (``selection_precision="reference"``), for
    towers with a CLS token, in the dtype of the inputs: ``hidden`` (B, N, D) layer L's output,
    ``queries`` / ``keys`` (B, N, D) its projected queries and keys. Nothing is upcast: the CLS
    attention is summed over heads in that dtype and ranked by ``torch.topk`` (ties go as topk
    sends them, as in the official code); the keys are averaged over heads, normalised and
    compared in that dtype (argmax: the first of equal similarities); members are summed by a
    batched matmul with the one-hot assignment, divided by their count and added to the target
    (``merge="reference"``). Same rows, indices and slots as ``visionzip_select``."""
    batch, tokens, _ = hidden.shape
    check_fits(dominant, contextual, tokens)
    scores = reference_cls_scores(queries, keys, num_heads, scale)
    top = scores.topk(dominant - 1, dim=1).indices + 1
    dominant_index, rest_index = split_positions(top, tokens, cls_token=True)

    metric = gather_rows(reference_head_mean_keys(keys, num_heads), rest_index)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    remaining = rest_index.shape[1]
    target_pos = contextual_targets(remaining, contextual, hidden.device)
    is_target = torch.zeros(remaining, dtype=torch.bool, device=hidden.device)
    is_target[target_pos] = True
    member_pos = (~is_target).nonzero().squeeze(1)
    similarity = torch.bmm(metric[:, member_pos], metric[:, target_pos].transpose(1, 2))  # (B, M, C)
    assign = similarity.argmax(dim=2)
    one_hot = torch.zeros(batch, member_pos.numel(), contextual, dtype=hidden.dtype, device=hidden.device)
    one_hot.scatter_(2, assign.unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    rest = gather_rows(hidden, rest_index)
    merged = rest[:, target_pos] + torch.bmm(one_hot.transpose(1, 2), rest[:, member_pos]) / counts

    member_slot = torch.empty(batch, remaining, dtype=torch.long, device=hidden.device)
    member_slot[:, target_pos] = torch.arange(contextual, device=hidden.device)
    member_slot[:, member_pos] = assign
    return _assemble(hidden, dominant_index, rest_index, merged, target_pos, member_slot)
