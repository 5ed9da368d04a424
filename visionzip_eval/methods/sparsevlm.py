"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference", arXiv 2410.04417), as the VisionZip paper compares it.

Official code Gumpest/SparseVLMs, transcribed in ``tests/official_sparsevlm.py``; MSL =
``llava/model/language_model/modelling_sparse_llama.py`` at v1 b72c5d62 unless marked 535f8ba:
- text raters, once per prompt, from the input embeddings: each visual row's softmax over the
  text rows after the image, averaged over visual rows; raters score above the mean (MSL:215-220);
- at a pruning layer l the score of a visual token is layer l's own attention map, heads
  averaged, rater rows averaged (score.py:27-33); pruning acts on layer l's output (MSL:254);
- the top-k visual tokens are kept (score.py:33-42); of the deleted ones, the best
  ``int(0.3 n) + 1`` are recycled into ``int(n_recycled / 10) + 1`` tokens by density-peak
  clustering of their hidden states (TCFormer DPC-kNN, utils.py:155-213: k = the cluster count,
  self included) and averaged (sum / (n + 1e-6)); the rest are dropped (MSL:251-283);
- positions: the new sequence is [prefix][kept visual][merged][text], renumbered 0..L'-1, and a
  decode token continues each layer's own count (MSL:268-278, MSL:603-604): ``positions=renumber``
  (default); ``original`` keeps the kept tokens' positions and gives a merged token its cluster
  centre's (LightCompress, and SparseVLM v2.0 9e1f649).

Two official versions choose k, option ``version``:
- ``v1`` (b72c5d6, the version behind the VisionZip paper's Table 1): layers 2/6/15/19
  (MSL:87), ``k = min(int(rank * scale + bias), n - 1)`` with ``rank`` the float32 matrix rank of
  the raters' (n_raters, n) attention block, no pruning where ``rank == n`` (score.py:32-42);
  scale/bias per budget from the README (74-86): 192 -> 13.5/0, 128 -> 9/6, 64 -> 0.8/0, other
  budgets refused. The rule fixes no exact count (``count`` is not read): runs record the
  per-layer average they reached (``visual_tokens_after_pruning``).
- ``v2`` (default; 535f8ba, March 2025): layers 2/6/15 keeping the published 300/200/110,
  303/110/36, 66/30/17 at 192/128/64 (535f8ba score.py:5-15). Those counts are defined by
  SparseVLM's own accounting (the pruning layer counts as pruned); here the budget is counted
  as for FastV and PDrop (the pruning layer sees every token), so the published shape is scaled
  until ``count`` reaches the budget (``average``: the mean over layers; ``kept``: what leaves
  the last pruning layer). Other budgets use a geometric schedule (k_i = V * lambda^i).

Deviations, on purpose: no 1e-6 density noise (ties go to the earlier token, deterministically);
batches work (the official code is batch 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from visionzip_eval.methods.llm_pruning import LayerView, Prune
from visionzip_eval.methods.base import top_positions
from visionzip_eval.methods.base import check_choice
from visionzip_eval.methods.in_llm import (
    POSITIONS,
    REFERENCE_LAYERS,
    InLLMReducer,
    scaled_layers,
    solve_increasing,
)
from visionzip_eval.methods.registry import register_method

# 535f8ba score.py:5-15: top-k kept at layers 2 / 6 / 15 of a 32-layer LLaVA-1.5 (576 tokens)
PUBLISHED_SCHEDULE = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
VERSION_LAYERS = {"v1": "2,6,15,19", "v2": "2,6,15"}  # b72c5d6 MSL:87, 535f8ba MSL:69
V1_SCALE_BIAS = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}  # b72c5d6 README.md:74-86
RECYCLE_SHARE, CLUSTER_DIVISOR, MERGE_EPS = 0.3, 10, 1e-6  # MSL:258, MSL:262, utils.py:203


def recycled_counts(deleted: int) -> tuple[int, int]:
    """(tokens recycled, merged tokens they become) when ``deleted`` tokens are deleted."""
    recycled = int(deleted * RECYCLE_SHARE) + 1
    return recycled, int(recycled / CLUSTER_DIVISOR) + 1


def density_peak_merge(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TCFormer DPC-kNN as SparseVLM's ``cluster_and_merge`` (utils.py:155-213) on one row's
    tokens ``x`` (N, D): (merged (clusters, D), centres (clusters,) indices into x), merged
    tokens in centre-score order."""
    work = x.double() if x.dtype == torch.float64 else x.float()
    n, dim = work.shape
    distance = torch.cdist(work, work) / math.sqrt(dim)
    nearest = distance.topk(min(clusters, n), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1))
    higher = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(higher, distance, distance.max()).min(dim=-1).values
    centres = (delta * density).argsort(descending=True, stable=True)[:clusters]
    assign = distance[centres].argmin(dim=0)
    assign[centres] = torch.arange(len(centres), device=x.device)
    sums = torch.zeros(len(centres), dim, dtype=work.dtype, device=x.device).index_add_(0, assign, work)
    sizes = torch.bincount(assign, minlength=len(centres)).to(work.dtype)
    return (sums / (sizes[:, None] + MERGE_EPS)).to(x.dtype), centres


@register_method(
    "sparsevlm", kind="in-llm", display="SparseVLM", paper="arXiv 2410.04417", code="github.com/Gumpest/SparseVLMs"
)
@dataclass
class SparseVLM(InLLMReducer):
    """Text raters score the visual tokens at layers 2/6/15(/19); the best survive, part of the rest is merged."""

    version: Literal["v1", "v2"] = "v2"
    positions: Literal["renumber", "original"] = "renumber"
    layers: str = ""  # empty: the version's (v1 2,6,15,19; v2 2,6,15)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "version", self.version, tuple(VERSION_LAYERS))
        check_choice(self.name, "positions", self.positions, POSITIONS)
        scaled_layers(self.stage_layers, REFERENCE_LAYERS, self.name)  # validates
        if self.version == "v1" and self.tokens not in V1_SCALE_BIAS:
            raise ValueError(
                f"sparsevlm: version=v1 sets its counts by a rank rule tuned for 192/128/64 only "
                f"(README scale/bias), got {self.tokens}: use version=v2"
            )

    @property
    def stage_layers(self) -> str:
        return self.layers or VERSION_LAYERS[self.version]

    # -- the schedule ------------------------------------------------------------------------
    def _stages(self, num_layers: int) -> list[int]:
        """Layers whose output is pruned, i.e. pruning happens before the next one."""
        return [min(layer + 1, num_layers - 1) for layer in scaled_layers(self.stage_layers, num_layers, self.name)]

    @staticmethod
    def leaving(visual: float, kept: list[float]) -> list[float]:
        """Visual tokens after each pruning layer: the kept ones plus the merged ones."""
        out, current = [], visual
        for k in kept:
            k = min(k, current - 1)
            current = k + recycled_counts(int(round(current - k)))[1]
            out.append(current)
        return out

    def plan(self, num_layers: int, visual: float, budget: float) -> dict[int, float]:
        """Pruning layer -> top-k kept there (merged tokens come on top)."""
        stages = sorted(set(self._stages(num_layers)))
        if self.version == "v1":  # k is set at run time by the rank rule
            return {layer: visual for layer in stages}
        published = PUBLISHED_SCHEDULE.get(round(budget * 576 / visual)) if visual else None
        if published and len(stages) != len(published):
            published = None

        def schedule(lam: float) -> list[float]:
            if published:  # the published shape, scaled (lambda 1: every token)
                return [visual * min(1.0, lam * k / published[-1]) for k in published]
            return [visual * lam ** (i + 1) for i in range(len(stages))]

        def reached(lam: float) -> float:
            after = self.leaving(visual, schedule(lam))
            if self.count == "kept":
                return after[-1]
            return self.layer_average(dict(zip(stages, after)), num_layers, visual)

        if reached(0.0) > budget + 1e-9:
            raise ValueError(
                f"sparsevlm: {'an average of ' if self.count == 'average' else ''}{budget:g} visual tokens over "
                f"{num_layers} LLM layers is out of reach (at least {reached(0.0):g} with these layers): "
                "choose earlier layers, or count=kept"
            )
        return dict(zip(stages, schedule(solve_increasing(reached, budget))))

    def _exact_last(self, view: LayerView, current: torch.Tensor) -> torch.Tensor:
        """(B,) top-k at the last pruning layer so that kept + merged is exactly the budget."""
        out = []
        for row in range(len(current)):
            target = round(float(view.entering[row]) * self.tokens / self._full_tokens)
            k = min(target, int(current[row]) - 1)
            while k > 0 and k + recycled_counts(int(current[row]) - k)[1] > target:
                k -= 1
            out.append(max(k, 0))
        return torch.tensor(out, device=current.device)

    def _rank_rule(self, probs, raters, visual, current) -> torch.Tensor:
        """(B,) v1's kept count (score.py:32-42): ``min(int(rank * scale + bias), n - 1)`` with
        ``rank`` the float32 matrix rank of the raters' rows over the visual columns; ``n``
        (nothing pruned) where the rank is full."""
        scale, bias = V1_SCALE_BIAS[self.tokens]
        out = []
        for row in range(len(current)):
            n = int(current[row])
            block = probs[row, : int(raters[row])][:, visual[row]].float()
            rank = int(torch.linalg.matrix_rank(block)) if n and int(raters[row]) else n
            out.append(n if rank == n else min(int(rank * scale + bias), n - 1))
        return torch.tensor(out, device=current.device)

    # -- one pruning layer ---------------------------------------------------------------------
    @staticmethod
    def raters(view: LayerView) -> torch.Tensor:
        """(B, L) bool over the original positions: the text raters (MSL:215-220)."""
        embeddings, visual = view.prompt_embeddings, view.prompt_visual
        batch, length = visual.shape
        positions = torch.arange(length, device=visual.device)
        out = torch.zeros_like(visual)
        for row in range(batch):
            last_visual = int(positions[visual[row]].max())
            text = positions[(positions > last_visual)]
            if len(text) == 0:
                continue
            work = embeddings[row].float() if embeddings.dtype != torch.float64 else embeddings[row]
            relevance = (work[visual[row]] @ work[text].T).softmax(dim=-1).mean(dim=0)
            out[row, text[relevance > relevance.mean()]] = True
        return out

    def select(self, view: LayerView) -> Prune:
        batch, rows, device = view.hidden.shape[0], view.hidden.shape[1], view.hidden.device
        raters = torch.gather(self.raters(view), 1, view.index) & view.valid  # over current rows
        counts = raters.sum(1).clamp(min=1)
        width = int(counts.max())
        order = torch.where(raters, torch.arange(rows, device=device), rows).sort(dim=1).values[:, :width]
        order = torch.where(order < rows, order, order[:, :1].clamp(max=rows - 1))  # pad: repeat one
        weight = (torch.arange(width, device=device)[None, :] < raters.sum(1, keepdim=True)).float()
        probs = view.attention(order, source="previous").mean(dim=1)  # (B, R, P)
        scores = (probs * weight[..., None]).sum(1) / counts[:, None]
        visual = view.visual
        current = visual.sum(1)
        if self.version == "v1":
            kept = self._rank_rule(probs, raters.sum(1), visual, current)
        else:
            kept = torch.minimum(self.kept_at(view), current - 1).clamp(min=0)
            if self.count == "kept" and view.layer == max(self.prune_layers(view.num_layers)):
                kept = self._exact_last(view, current)
        keep = self.keep_top(scores, visual, kept)
        merged = []
        for row in range(batch):
            deleted = torch.nonzero(visual[row] & ~keep[row]).flatten()
            if len(deleted) == 0:
                merged.append(None)
                continue
            recycled, clusters = recycled_counts(len(deleted))
            best = deleted[top_positions(scores[row, deleted][None], min(recycled, len(deleted)))[0]]
            best = best[scores[row, best].float().argsort(descending=True, stable=True)]  # score order
            tokens, centres = density_peak_merge(view.hidden[row, best], min(clusters, len(best)))
            merged.append((tokens, view.index[row, best[centres]]))
        width = max((len(m[0]) for m in merged if m is not None), default=0)
        if width == 0:
            return Prune(keep=keep)
        hidden = view.hidden.new_zeros(batch, width, view.hidden.shape[-1])
        index = torch.zeros(batch, width, dtype=torch.long, device=device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
        for row, item in enumerate(merged):
            if item is not None:
                count = len(item[0])
                hidden[row, :count], index[row, :count], valid[row, :count] = item[0], item[1], True
        return Prune(keep=keep, extra_hidden=hidden, extra_index=index, extra_valid=valid)
