"""LLaVA-PruMerge+ (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models", arXiv 2403.15388; official code 42Shawn/LLaVA-PruMerge, HEAD 097c041, every
``cl:N`` a line of ``llava/model/multimodal_encoder/clip_encoder.py``, PruMerge+ being
``token_prune_merge_advanced_plus``, cl:174-281, called with ``if_adaptive=True`` at cl:300).

The official rule on LLaVA-1.5, per image:
- features: ``hidden_states[-2]`` patches (cl:57, cl:76, cl:188); queries and keys: hooks on the
  **last** encoder layer's ``q_proj`` / ``k_proj`` (cl:28-32, cl:182-183), i.e. the layer that
  reads ``hidden_states[-2]``, one layer after the features (here: ``next_layer_projections``);
- attention ``softmax(q k^T / sqrt(D))`` over the full width, heads not split (cl:198-201); the
  CLS row over the patch columns, not renormalised;
- outliers: the count of patch attentions above Q3 + 1.5 IQR (``np.percentile``, cl:34-47,
  cl:204), taken as the top-``c`` by attention, in descending order (cl:205);
- "plus": a raster stride ``int(int(1 / ratio) / 3)`` over ``arange(0, 575)`` (cl:208-214), the
  positions not already outliers appended in ascending order;
- merge: every kept token adds its 32 key-nearest other patches (cosine of the normalised keys,
  any patch but itself) weighted by their raw attention: ``x_i + sum attn_j x_j`` (cl:241-276,
  the normalisation is commented out at cl:274), reading the original features;
- one more token, ``sum attn_j x_j`` over the patches not kept, goes last (cl:278-279); CLS is
  not passed on.

The count is adaptive there (about 4c + 1 per image). At a fixed budget T here: T - 1 kept
patches plus the extra token; the outliers are the top ``round((T - 1) / 4)`` by attention
(the official adaptive rule's 1 : 3 outlier-to-sample proportion, replacing the IQR count),
the samples a uniform raster stride over the other patches, ``remaining[i * R // m]``, so the
count is exact (64 -> 16 + 47 + 1, 128 -> 32 + 95 + 1, 192 -> 48 + 143 + 1).
``adaptive_count`` gives the official adaptive count of an image, for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from visionzip_eval.backends.base import TowerSignals, VLMBackend
from visionzip_eval.methods.base import FixedCountReducer, check_patch_budget, require_cls_token
from visionzip_eval.methods.registry import register_method
from visionzip_eval.selection import Selection, gather_rows, work_dtype

NEIGHBOURS = 32  # cl:268
IQR_FACTOR = 1.5  # cl:42
OUTLIER_SHARE = 0.25  # outliers : samples = 1 : 3 at a fixed budget


def full_width_cls_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, N) ``softmax(q_cls k^T / sqrt(D))`` over the full width, float32 (cl:198-201)."""
    dtype = work_dtype(keys)
    logits = torch.einsum("bd,bnd->bn", queries[:, 0].to(dtype), keys.to(dtype)) * keys.shape[-1] ** -0.5
    return logits.softmax(dim=-1)


def iqr_outliers(patch_attention: torch.Tensor) -> torch.Tensor:
    """(B,) how many patch attentions lie strictly above Q3 + 1.5 IQR (cl:34-47)."""
    values = patch_attention.float()  # the official quartiles are numpy float32 (cl:34-47)
    q1 = torch.quantile(values, 0.25, dim=1, keepdim=True)
    q3 = torch.quantile(values, 0.75, dim=1, keepdim=True)
    return (values > q3 + IQR_FACTOR * (q3 - q1)).sum(dim=1)


def adaptive_count(patch_attention: torch.Tensor) -> list[int]:
    """Per image, the official adaptive output count: c outliers, the stride samples not among
    them, and the extra token (cl:204-214); 0 where the official code fails (no outlier, or so
    many that the stride is 0)."""
    patches = patch_attention.shape[1]
    counts = []
    for row, c in zip(patch_attention, iqr_outliers(patch_attention).tolist()):
        stride = int(int(1 / (c / patches)) / 3) if c else 0
        if stride == 0:
            counts.append(0)
            continue
        outliers = set(row.argsort(descending=True, stable=True)[:c].tolist())
        samples = sum(1 for x in range(0, patches - 1, stride) if x not in outliers)
        counts.append(c + samples + 1)
    return counts


def fixed_kept_positions(patch_attention: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, tokens - 1) patch positions kept at a fixed budget, in output order: the outliers by
    descending attention, then the stride samples ascending."""
    batch, patches = patch_attention.shape
    kept = tokens - 1
    outliers = min(kept, max(1, math.floor(kept * OUTLIER_SHARE + 0.5)))
    order = patch_attention.argsort(dim=1, descending=True, stable=True)
    top = order[:, :outliers]
    remaining = order[:, outliers:].sort(dim=1).values  # (B, R) ascending
    samples = kept - outliers
    stride = torch.arange(samples, device=patch_attention.device) * remaining.shape[1] // max(samples, 1)
    return torch.cat([top, remaining[:, stride]], dim=1)


def merge_kept(
    patches: torch.Tensor, patch_attention: torch.Tensor, patch_keys: torch.Tensor, kept: torch.Tensor
) -> torch.Tensor:
    """(B, K + 1, D): each kept patch plus its ``NEIGHBOURS`` key-nearest other patches weighted by
    raw attention, then the attention-weighted sum of the patches not kept (cl:241-279)."""
    dtype = work_dtype(patches)
    x = patches.to(dtype)
    attention = patch_attention.to(dtype)
    unit = F.normalize(patch_keys.to(dtype), dim=-1)
    similarity = gather_rows(unit, kept) @ unit.transpose(1, 2)  # (B, K, P)
    similarity.scatter_(2, kept.unsqueeze(-1), float("-inf"))  # a token is not its own neighbour
    neighbours = similarity.topk(NEIGHBOURS, dim=-1).indices  # (B, K, 32)
    weights = attention.gather(1, neighbours.flatten(1)).view_as(neighbours)
    rows = x.gather(1, neighbours.flatten(1).unsqueeze(-1).expand(-1, -1, x.shape[-1])).view(*neighbours.shape, -1)
    merged = gather_rows(x, kept) + (weights.unsqueeze(-1) * rows).sum(dim=2)
    dropped = torch.ones_like(attention, dtype=torch.bool).scatter_(1, kept, False)
    extra = ((attention * dropped).unsqueeze(-1) * x).sum(dim=1, keepdim=True)
    return torch.cat([merged, extra], dim=1).to(patches.dtype)


@register_method(
    "prumerge+",
    display="PruMerge+",
    paper="arXiv 2403.15388",
    code="github.com/42Shawn/LLaVA-PruMerge",
)
@dataclass
class PruMergePlus(FixedCountReducer):
    """[CLS]-attention outliers plus spatially uniform samples, each merged with its 32
    key-nearest patches weighted by attention, plus one token for everything dropped.

    Fixed budget: ``tokens - 1`` kept patches (a quarter outliers) and the extra token."""

    needs_attention: ClassVar[bool] = False  # its signal is the next layer's, computed from hidden

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens < 2:
            raise ValueError(
                f"PruMerge+ passes at least one kept token and the extra token: tokens >= 2, got {self.tokens}"
            )

    def check(self, backend: VLMBackend) -> None:
        require_cls_token(self, backend)
        check_patch_budget(self.tokens - 1, backend)
        rows, cols = backend.patch_grid
        if rows * cols <= NEIGHBOURS:
            raise ValueError(
                f"PruMerge+ merges {NEIGHBOURS} neighbours: the tower needs more than {NEIGHBOURS} patches"
            )

    def signals(self, signals: TowerSignals, backend: VLMBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch attention (B, P), patch keys (B, P, D)) of the layer after layer L."""
        projections = backend.next_layer_projections(signals.hidden)
        if projections is None:
            raise ValueError(
                "PruMerge+ reads the attention of the tower layer after the feature layer, and this "
                "model's feature layer is its last"
            )
        queries, keys = projections
        offset = backend.patch_offset
        return full_width_cls_attention(queries, keys)[:, offset:], keys[:, offset:]

    def reduce(self, signals: TowerSignals, backend: VLMBackend) -> Selection:
        patches = backend.patch_features(signals)
        attention, keys = self.signals(signals, backend)
        kept = fixed_kept_positions(attention, self.tokens)
        return Selection(tokens=merge_kept(patches, attention, keys, kept), dominant_index=kept + backend.patch_offset)
