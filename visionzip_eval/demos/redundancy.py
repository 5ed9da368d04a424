"""Visual redundancy in the vision tower, the VisionZip paper's motivation (its Figure 2 and the
seed's ``gradio_demo.py``): in the deeper layers the [CLS] token's attention collapses onto a few
patches, and the remaining patches resemble each other, which contextual merging exploits.

``tower_redundancy`` runs the tower once (SDPA kept; every layer's projected CLS query and keys
captured by hooks) and returns, per layer, the CLS attention over the patches (head mean), the
share of it on the top-k patches and its normalised entropy; and at the feature layer, how
similar each remaining patch is to the dominant ones and to its nearest remaining neighbour
(head-mean keys, cosine). ``redundancy_figure`` draws it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from visionzip_eval.backends import backend_for
from visionzip_eval.selection import cls_attention_row, head_mean_keys


@dataclass
class RedundancyStats:
    """One image's tower, layer by layer (index 0 = the first encoder layer)."""

    grid: tuple[int, int]
    attention: np.ndarray  # (layers, rows, cols) CLS attention over patches, head mean, sums to 1
    top_share: np.ndarray  # (layers,) share of that attention on the top ``top_k`` patches
    entropy: np.ndarray  # (layers,) its entropy / log(patches): 1 = uniform, 0 = one patch
    top_k: int
    feature_layer: int  # the layer whose output the LLM receives (LLaVA's -2)
    to_dominant: np.ndarray  # (remaining,) each non-dominant patch's best cosine to a dominant one
    to_neighbour: np.ndarray  # (remaining,) its best cosine to another non-dominant patch


@torch.no_grad()
def tower_redundancy(model, pixel_values: torch.Tensor, top_k: int = 54) -> RedundancyStats:
    """Per-layer CLS-attention concentration of one image (``pixel_values`` (1, 3, H, W)), and
    at the feature layer the similarity of the ``top_k`` dominant patches to the rest."""
    backend = backend_for(model)
    if not backend.cls_token:
        raise ValueError(f"the redundancy view reads the [CLS] token's attention, and the {backend.name} tower has none")
    layers, feature = backend.tower_layers()
    if pixel_values.shape[0] != 1:
        raise ValueError(f"one image at a time, got a batch of {pixel_values.shape[0]}")
    store: dict[tuple[int, str], torch.Tensor] = {}

    def keep(index: int, which: str):
        def hook(module, args, output):
            store[(index, which)] = output

        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.self_attn.q_proj.register_forward_hook(keep(index, "q")))
        handles.append(layer.self_attn.k_proj.register_forward_hook(keep(index, "k")))
    tower = backend.modules()["vision_tower"]
    try:
        tower(pixel_values.to(device=next(tower.parameters()).device, dtype=next(tower.parameters()).dtype))
    finally:
        for handle in handles:
            handle.remove()
    rows, cols = backend.patch_grid
    offset = backend.patch_offset
    maps, shares, entropies = [], [], []
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        row = cls_attention_row(store[(index, "q")][:, 0], store[(index, "k")], attn.num_heads, attn.scale)
        patches = row.mean(dim=1)[0, offset:].double()
        patches = patches / patches.sum()
        maps.append(patches.reshape(rows, cols).cpu().numpy())
        shares.append(float(patches.topk(top_k).values.sum()))
        entropies.append(float(-(patches * patches.clamp_min(1e-30).log()).sum() / math.log(len(patches))))
    keys = head_mean_keys(store[(feature, "k")], layers[feature].self_attn.num_heads)[0, offset:].double()
    keys = torch.nn.functional.normalize(keys, dim=-1)
    dominant = torch.zeros(len(keys), dtype=torch.bool)
    dominant[torch.tensor(maps[feature]).flatten().topk(top_k).indices] = True
    similarity = keys @ keys.T
    rest = similarity[~dominant]
    to_dominant = rest[:, dominant].max(dim=1).values
    among = rest[:, ~dominant].clone()
    among[torch.arange(len(among)), torch.arange(len(among))] = -math.inf  # not itself
    return RedundancyStats(
        grid=(rows, cols), attention=np.stack(maps), top_share=np.array(shares), entropy=np.array(entropies),
        top_k=top_k, feature_layer=feature, to_dominant=to_dominant.numpy(), to_neighbour=among.max(dim=1).values.numpy(),
    )


def redundancy_figure(stats: RedundancyStats, image=None, title: str = ""):
    """A matplotlib figure: the CLS attention maps of four layers up to the feature layer, the
    concentration curves over depth, and the similarity histogram at the feature layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = len(stats.attention)
    shown = sorted({0, stats.feature_layer // 3, 2 * stats.feature_layer // 3, stats.feature_layer})
    columns = len(shown) + (image is not None)
    figure = plt.figure(figsize=(3.0 * max(columns, 3), 6.4))
    grid = figure.add_gridspec(2, max(columns, 2))
    position = 0
    if image is not None:
        axis = figure.add_subplot(grid[0, 0])
        axis.imshow(image)
        axis.set_title("image", fontsize=9)
        axis.axis("off")
        position = 1
    for offset, layer in enumerate(shown):
        axis = figure.add_subplot(grid[0, position + offset])
        axis.imshow(stats.attention[layer], cmap="magma")
        axis.set_title(f"layer {layer + 1}: top-{stats.top_k} hold {100 * stats.top_share[layer]:.0f}%", fontsize=9)
        axis.axis("off")
    half = max(columns, 2) // 2
    axis = figure.add_subplot(grid[1, :half])
    depth = np.arange(1, layers + 1)
    axis.plot(depth, stats.top_share, marker="o", label=f"share on the top {stats.top_k} patches")
    axis.plot(depth, stats.entropy, marker="s", label="entropy / log(patches)")
    axis.axvline(stats.feature_layer + 1, color="grey", linestyle=":", label="feature layer (LLaVA's -2)")
    axis.set_xlabel("tower layer")
    axis.set_ylim(0, 1.05)
    axis.set_title("how concentrated the CLS attention is, by layer", fontsize=10)
    axis.set_xticks(depth)
    axis.legend(fontsize=8)
    axis = figure.add_subplot(grid[1, half:])
    low = float(min(stats.to_neighbour.min(), stats.to_dominant.min()))
    bins = np.linspace(max(-1.0, low - 0.02), 1.0, 41)
    axis.hist(stats.to_neighbour, bins=bins, alpha=0.7, label="to its nearest other remaining patch")
    axis.hist(stats.to_dominant, bins=bins, alpha=0.7, label="to its nearest dominant patch")
    axis.set_xlabel("cosine similarity of keys (head mean), feature layer")
    axis.set_title("how alike the non-dominant patches are (feature layer)", fontsize=10)
    axis.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return figure
