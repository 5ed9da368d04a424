"""Questions about a synthetic scene in the formats of the real benchmarks.

- POPE: "Is there a red circle in the image?" yes/no, one positive and one negative per scene and
  negative-sampling category: ``random`` (any absent pair), ``popular`` (the absent pairs most
  frequent over the whole set), ``adversarial`` (absent, but sharing the colour or the shape of
  an object that is there: a binding test).
- MME: a yes/no pair on one image in one of MME's perception categories ``existence``,
  ``count``, ``position``, ``color``, phrased as MME does ("... Please answer yes or no.").
- GQA: a short answer: a colour, a shape, a count, or left/right / above/below.
- MMBench: four options A-D about colour, shape, count or position.

Every generator takes the scene and a numpy ``Generator`` and returns plain tuples; the
benchmark writer (``benchmark.py``) puts them into the hub schemas and the trainer
(``train.py``) asks the same generators for its training questions, with another seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from visionzip_eval.synth.scenes import COLOR_NAMES, SHAPES, Scene, Shape

POPE_CATEGORIES = ("adversarial", "popular", "random")
MME_CATEGORIES = ("existence", "count", "position", "color")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
MIN_SEPARATION = 24  # px between two centres before "left of" / "above" is asked


def pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _all_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOR_NAMES for s in SHAPES]


def absent_pairs(scene: Scene) -> list[tuple[str, str]]:
    return [(c, s) for c, s in _all_pairs() if not scene.has(c, s)]


def adversarial_pairs(scene: Scene) -> list[tuple[str, str]]:
    """Absent pairs that share a colour or a shape with an object in the scene."""
    present_colors = {o.color for o in scene.objects}
    present_shapes = {o.shape for o in scene.objects}
    return [(c, s) for c, s in absent_pairs(scene) if c in present_colors or s in present_shapes]


def colour_decoys(scene: Scene) -> list[tuple[str, str]]:
    """Absent pairs whose colour is in the scene: the negatives a model that checks the
    colour alone gets wrong."""
    present_colors = {o.color for o in scene.objects}
    return [(c, s) for c, s in absent_pairs(scene) if c in present_colors]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def existence_question(color: str, shape: str) -> str:
    return f"Is there {article(color)} {color} {shape} in the image?"


def pope_questions(scene: Scene, rng: np.random.Generator, popular: Sequence[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """[(question, "yes"/"no", category)]: per category one present and one absent pair.
    ``popular``: all pairs, most frequent first (over the set the scene belongs to)."""
    out = []
    absent = absent_pairs(scene)
    for category in POPE_CATEGORIES:
        present = pick(rng, scene.objects)
        out.append((existence_question(present.color, present.shape), "yes", category))
        if category == "random":
            negative = pick(rng, absent)
        elif category == "popular":
            negative = next(p for p in popular if p in absent)
        else:
            negative = pick(rng, adversarial_pairs(scene) or absent)
        out.append((existence_question(*negative), "no", category))
    return out


def _unique_shapes(scene: Scene) -> list[Shape]:
    return [o for o in scene.objects if len(scene.find(shape=o.shape)) == 1]


def _unique_colors(scene: Scene) -> list[Shape]:
    return [o for o in scene.objects if len(scene.find(color=o.color)) == 1]


def _separated_pairs(scene: Scene) -> list[tuple[Shape, Shape, str]]:
    """(a, b, relation) with a ``relation`` in left/right/above/below of b, clearly so."""
    out = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            if b.cx - a.cx >= MIN_SEPARATION:
                out.append((a, b, "left"))
            if a.cx - b.cx >= MIN_SEPARATION:
                out.append((a, b, "right"))
            if b.cy - a.cy >= MIN_SEPARATION:
                out.append((a, b, "above"))
            if a.cy - b.cy >= MIN_SEPARATION:
                out.append((a, b, "below"))
    return out


OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
RELATION_PHRASE = {"left": "on the left of", "right": "on the right of", "above": "above", "below": "below"}


def mme_pair(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """(category, yes question, no question) in one MME perception category the scene allows."""
    suffix = " Please answer yes or no."
    categories = ["existence", "count"]
    if _separated_pairs(scene):
        categories.append("position")
    if _unique_shapes(scene):
        categories.append("color")
    category = pick(rng, categories)
    if category == "existence":
        present = pick(rng, scene.objects)
        absent = pick(rng, adversarial_pairs(scene) or absent_pairs(scene))
        yes = f"Is there {article(present.color)} {present.name} in this image?"
        no = f"Is there {article(absent[0])} {absent[0]} {absent[1]} in this image?"
    elif category == "count":
        n = len(scene.objects)
        wrong = pick(rng, [m for m in (n - 1, n + 1) if 1 <= m <= len(NUMBER_WORDS) - 1])
        yes = f"Are there {NUMBER_WORDS[n]} shapes in this image?"
        no = f"Are there {NUMBER_WORDS[wrong]} shapes in this image?"
    elif category == "position":
        a, b, relation = pick(rng, _separated_pairs(scene))
        yes = f"Is the {a.name} {RELATION_PHRASE[relation]} the {b.name}?"
        no = f"Is the {a.name} {RELATION_PHRASE[OPPOSITE[relation]]} the {b.name}?"
    else:
        obj = pick(rng, _unique_shapes(scene))
        other = pick(rng, [c for c in COLOR_NAMES if c != obj.color])
        yes = f"Is the {obj.shape} in this image {obj.color}?"
        no = f"Is the {obj.shape} in this image {other}?"
    return category, yes + suffix, no + suffix


def _kinds(scene: Scene) -> list[str]:
    kinds = ["count"]
    if _unique_shapes(scene):
        kinds.append("color")
    if _unique_colors(scene):
        kinds.append("shape")
    if _separated_pairs(scene):
        kinds.append("position")
    return kinds


def gqa_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str, str]:
    """(question, answer, full answer, kind)."""
    kind = pick(rng, _kinds(scene))
    if kind == "count":
        n = len(scene.objects)
        noun = "shape" if n == 1 else "shapes"
        return "How many shapes are in the image?", str(n), f"There {'is' if n == 1 else 'are'} {n} {noun}.", kind
    if kind == "color":
        obj = pick(rng, _unique_shapes(scene))
        return f"What color is the {obj.shape}?", obj.color, f"The {obj.shape} is {obj.color}.", kind
    if kind == "shape":
        obj = pick(rng, _unique_colors(scene))
        return f"What shape is the {obj.color} object?", obj.shape, f"The {obj.color} object is {article(obj.shape)} {obj.shape}.", kind
    a, b, relation = pick(rng, _separated_pairs(scene))
    if relation in ("left", "right"):
        question = f"Is the {a.name} to the left or to the right of the {b.name}?"
    else:
        question = f"Is the {a.name} above or below the {b.name}?"
    return question, relation, f"The {a.name} is {RELATION_PHRASE[relation]} the {b.name}.", kind


MMBENCH_CATEGORY = {  # kind -> (MMBench category, L2 category), the nearest real ones
    "color": ("attribute_recognition", "finegrained_perception (instance-level)"),
    "shape": ("attribute_recognition", "finegrained_perception (instance-level)"),
    "count": ("object_localization", "finegrained_perception (instance-level)"),
    "position": ("spatial_relationship", "finegrained_perception (cross-instance)"),
}


def mmbench_question(scene: Scene, rng: np.random.Generator) -> tuple[str, list[str], int, str, str]:
    """(question, four options, index of the right one, category, L2 category)."""
    kind = pick(rng, _kinds(scene))
    if kind == "count":
        n = len(scene.objects)
        question, right = "How many shapes are in the image?", str(n)
        pool = [str(m) for m in range(1, 7) if m != n]
    elif kind == "color":
        obj = pick(rng, _unique_shapes(scene))
        question, right = f"What color is the {obj.shape}?", obj.color
        pool = [c for c in COLOR_NAMES if c != obj.color]
    elif kind == "shape":
        obj = pick(rng, _unique_colors(scene))
        question, right = f"What shape is the {obj.color} object?", obj.shape
        pool = [s for s in SHAPES if s != obj.shape]
    else:
        a, b, relation = pick(rng, _separated_pairs(scene))
        question, right = f"Where is the {a.name} relative to the {b.name}?", relation
        pool = [r for r in RELATION_PHRASE if r != relation]
    wrong = [pool[int(i)] for i in rng.permutation(len(pool))[:3]]
    options = [right, *wrong]
    order = rng.permutation(4)
    options = [options[int(i)] for i in order]
    category, l2 = MMBENCH_CATEGORY[kind]
    return question, options, options.index(right), category, l2
