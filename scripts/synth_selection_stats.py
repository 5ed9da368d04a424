#!/usr/bin/env python
"""What VisionZip keeps on the synthetic benchmark, with the trained tiny model: prints figures.

For the benchmark's POPE scenes (seeded; the model never saw them):
- how concentrated the CLS attention of layer -2 is on object patches (the premise of
  VisionZip's dominant tokens): its share of attention mass on patches covered by an object,
  beside the share of patches that are covered;
- per object size class, the fraction of objects with at least one patch among the dominant
  tokens at 192/128/64, beside the same fraction for a uniformly random choice of as many
  patches (what the `random` baseline keeps).

    python scripts/synth_selection_stats.py [--scenes 100] [--model DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from visionzip_eval.backends import backend_for  # noqa: E402
from visionzip_eval.budget import Budget  # noqa: E402
from visionzip_eval.methods.visionzip import VisionZip  # noqa: E402
from visionzip_eval.synth.benchmark import build_docs, decode, encode  # noqa: E402
from visionzip_eval.synth.model import pixel_values  # noqa: E402
from visionzip_eval.synth.scenes import GRID, PATCH, render  # noqa: E402
from visionzip_eval.synth.weights import load_trained  # noqa: E402


def object_patches(scene, object_map) -> list[set[int]]:
    """Per object, the patch indices (row-major, CLS excluded) it covers at all."""
    blocks = object_map.reshape(GRID, PATCH, GRID, PATCH)
    return [set(np.flatnonzero((blocks == i + 1).any(axis=(1, 3)).reshape(-1))) for i in range(len(scene.objects))]


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--model", help="trained model folder (default: the shipped one)")
    parser.add_argument("--budgets", nargs="+", default=["192", "128", "64"])
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, _ = load_trained(args.model)
    backend = backend_for(model)
    _, scenes = build_docs("pope", n_scenes=args.scenes)
    mass, covered = [], []
    kept = defaultdict(lambda: defaultdict(list))  # budget -> size class -> [kept?]
    expected_random = defaultdict(lambda: defaultdict(list))
    for scene in scenes:
        image, object_map = render(scene)
        pixels = pixel_values([decode(encode(image))])
        signals = backend.capture(pixels, attention=True)
        attention = signals.cls_attention[0].sum(0)[1:]  # heads summed, CLS column dropped
        attention = (attention / attention.sum()).numpy()
        patches = object_patches(scene, object_map)
        on_object = sorted(set().union(*patches))
        mass.append(attention[on_object].sum())
        covered.append(len(on_object) / GRID**2)
        for budget in args.budgets:
            split = Budget.parse(budget)
            selection = VisionZip(split.dominant, split.contextual).reduce(signals, backend)
            chosen = set((selection.dominant_index[0] - backend.patch_offset).tolist()) - {-1}
            k = len(chosen)  # patches kept as themselves (CLS is the other dominant token)
            for obj, cells in zip(scene.objects, patches):
                kept[budget][obj.size_class].append(bool(cells & chosen))
                # P(a uniform choice of k of the 576 patches misses all of the object's cells)
                miss = np.prod([(GRID**2 - len(cells) - j) / (GRID**2 - j) for j in range(k)])
                expected_random[budget][obj.size_class].append(1 - miss)
    print(f"{len(scenes)} scenes: CLS attention (layer -2) on object patches {np.mean(mass):.1%} of its mass, "
          f"while objects cover {np.mean(covered):.1%} of the patches ({np.mean(mass) / np.mean(covered):.1f}x)")
    print("objects with >= 1 patch among the dominant tokens (VisionZip) vs a uniform choice of as many patches (random):")
    for budget in args.budgets:
        parts = []
        for size in ("small", "medium", "large"):
            if kept[budget][size]:
                parts.append(f"{size} {np.mean(kept[budget][size]):.1%} vs {np.mean(expected_random[budget][size]):.1%}")
        print(f"  {budget:>4}: " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
