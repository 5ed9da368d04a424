"""Synthetic scenes: a few coloured shapes on a plain or textured background, 336 x 336 px.

Everything is drawn from a numpy ``Generator`` (PCG64), so a seed fixes the scenes, and the
rendering is plain Pillow drawing, so a scene fixes its pixels. Each scene also yields a
per-patch label map on LLaVA-1.5's 24 x 24 grid of 14 px patches (which object, if any,
covers most of each patch): the training target of the vision tower's dense auxiliary head.

Within one scene every (colour, shape) pair occurs at most once, so "the red circle" always
names one object; sizes are drawn from three classes, and small objects (18-30 px, one to
four patches) are where dropping tokens costs accuracy.

Each shape has its own fill texture (a darker shade of its colour in a shape-specific pattern),
as real object classes have their own textures: a tiny ViT trained in minutes on a CPU cannot
learn outlines from scratch (tried: after 3,200 images its patches knew colour, not shape), but
it learns a texture at once, and then every patch of an object, however few survive a token
budget, says what the object is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 55, 175),
    "orange": (245, 130, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
COLOR_NAMES = tuple(COLORS)
# (low, high) of the object's bounding-box side in pixels, and how often each class is drawn.
SIZES = {"small": (18, 30), "medium": (40, 64), "large": (72, 104)}
SIZE_WEIGHTS = {"small": 0.4, "medium": 0.35, "large": 0.25}
BACKGROUNDS = ("plain", "noise", "stripes", "checker")
# shape -> fill pattern (period PATTERN px, darker shade of the object's colour)
TEXTURE_OF_SHAPE = {"circle": "solid", "square": "rows", "triangle": "diagonals", "cross": "dots"}
PATTERN = 6
MAX_OBJECTS = 5
GAP = 8  # minimum free pixels between two objects' boxes


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: int  # bounding-box side, px
    cx: int
    cy: int

    @property
    def texture(self) -> str:
        return TEXTURE_OF_SHAPE[self.shape]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        half = self.size // 2
        return (self.cx - half, self.cy - half, self.cx - half + self.size, self.cy - half + self.size)

    @property
    def size_class(self) -> str:
        return next(k for k, (lo, hi) in SIZES.items() if lo <= self.size <= hi)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    background: str
    background_rgb: tuple[int, int, int]
    seed: int  # of the background texture's noise

    def has(self, color: str, shape: str) -> bool:
        return any(o.color == color and o.shape == shape for o in self.objects)

    def find(self, color: str | None = None, shape: str | None = None) -> list[Shape]:
        return [o for o in self.objects if (color is None or o.color == color) and (shape is None or o.shape == shape)]


def combo_index(color: str, shape: str) -> int:
    """Index of a (colour, shape) pair in 0 .. len(COLORS) * len(SHAPES) - 1."""
    return COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(shape)


NUM_COMBOS = len(COLORS) * len(SHAPES)


def _overlaps(box, boxes) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + GAP and b[0] < x1 + GAP and y0 < b[3] + GAP and b[1] < y1 + GAP for b in boxes)


def random_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = MAX_OBJECTS) -> Scene:
    """A scene of ``min_objects`` .. ``max_objects`` non-overlapping shapes, distinct (colour, shape) pairs."""
    count = int(rng.integers(min_objects, max_objects + 1))
    classes = list(SIZES)
    weights = np.array([SIZE_WEIGHTS[c] for c in classes])
    objects: list[Shape] = []
    used: set[tuple[str, str]] = set()
    attempts = 0
    while len(objects) < count and attempts < 200:
        attempts += 1
        color = COLOR_NAMES[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if (color, shape) in used:
            continue
        lo, hi = SIZES[classes[int(rng.choice(len(classes), p=weights / weights.sum()))]]
        size = int(rng.integers(lo, hi + 1))
        margin = size // 2 + 4
        cx = int(rng.integers(margin, IMAGE_SIZE - margin))
        cy = int(rng.integers(margin, IMAGE_SIZE - margin))
        candidate = Shape(color, shape, size, cx, cy)
        if _overlaps(candidate.box, [o.box for o in objects]):
            continue
        objects.append(candidate)
        used.add((color, shape))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    gray = int(rng.integers(200, 246))
    tint = rng.integers(-12, 13, size=3)
    background_rgb = tuple(int(np.clip(gray + t, 0, 255)) for t in tint)
    return Scene(tuple(objects), background, background_rgb, int(rng.integers(2**31)))


def _background(scene: Scene) -> np.ndarray:
    base = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    base[:] = scene.background_rgb
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    if scene.background == "noise":
        base += np.random.default_rng(scene.seed).normal(0.0, 10.0, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    elif scene.background == "stripes":
        base += np.where(((xx + yy) // 12) % 2 == 0, 9.0, -9.0)[..., None]
    elif scene.background == "checker":
        base += np.where(((xx // 28) + (yy // 28)) % 2 == 0, 8.0, -8.0)[..., None]
    return np.clip(base, 0, 255).astype(np.uint8)


def _outline(obj: Shape) -> tuple[str, list]:
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        return "ellipse", [x0, y0, x1 - 1, y1 - 1]
    if obj.shape == "square":
        inset = max(1, obj.size // 10)  # squares look as big as circles of the same box
        return "rectangle", [x0 + inset, y0 + inset, x1 - 1 - inset, y1 - 1 - inset]
    if obj.shape == "triangle":
        return "polygon", [(obj.cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)]
    arm = max(2, obj.size // 6)  # cross: a plus sign
    return "polygon", [
        (obj.cx - arm, y0), (obj.cx + arm, y0), (obj.cx + arm, obj.cy - arm), (x1 - 1, obj.cy - arm),
        (x1 - 1, obj.cy + arm), (obj.cx + arm, obj.cy + arm), (obj.cx + arm, y1 - 1), (obj.cx - arm, y1 - 1),
        (obj.cx - arm, obj.cy + arm), (x0, obj.cy + arm), (x0, obj.cy - arm), (obj.cx - arm, obj.cy - arm),
    ]


def _draw(draw: ImageDraw.ImageDraw, obj: Shape, fill) -> None:
    kind, coords = _outline(obj)
    getattr(draw, kind)(coords, fill=fill)


_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
_PATTERNS = {  # where the darker shade goes, in image coordinates
    "solid": np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool),
    "rows": (_YY // (PATTERN // 2)) % 2 == 0,
    "diagonals": ((_XX + _YY) // (PATTERN // 2)) % 2 == 0,
    "dots": ((_XX % PATTERN) < PATTERN // 2) & ((_YY % PATTERN) < PATTERN // 2),
}


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and the (336, 336) object map (0 background, i + 1 for ``scene.objects[i]``)."""
    image = Image.fromarray(_background(scene))
    mask = Image.new("L", image.size, 0)
    draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for i, obj in enumerate(scene.objects):
        _draw(draw, obj, COLORS[obj.color])
        _draw(mask_draw, obj, i + 1)
    object_map = np.asarray(mask)
    pixels = np.asarray(image).copy()
    for i, obj in enumerate(scene.objects):
        shade = object_map == i + 1
        shade &= _PATTERNS[obj.texture]
        pixels[shade] = (np.array(COLORS[obj.color]) * 0.6).astype(np.uint8)
    return Image.fromarray(pixels), object_map


def patch_labels(scene: Scene, object_map: np.ndarray, min_fraction: float = 0.15) -> np.ndarray:
    """(GRID * GRID,) int64: per 14 px patch, 1 + combo index of the object covering most of it
    (at least ``min_fraction`` of the patch), else 0; row-major, as CLIP orders its patches."""
    counts = np.zeros((len(scene.objects) + 1, GRID, GRID), np.int64)
    blocks = object_map.reshape(GRID, PATCH, GRID, PATCH)
    for i in range(1, len(scene.objects) + 1):
        counts[i] = (blocks == i).sum(axis=(1, 3))
    best = counts[1:].argmax(axis=0) if scene.objects else np.zeros((GRID, GRID), np.int64)
    covered = counts[1:].max(axis=0) >= min_fraction * PATCH * PATCH if scene.objects else np.zeros((GRID, GRID), bool)
    labels = np.zeros((GRID, GRID), np.int64)
    for i, obj in enumerate(scene.objects):
        labels[covered & (best == i)] = 1 + combo_index(obj.color, obj.shape)
    return labels.reshape(-1)


def presence(scene: Scene) -> np.ndarray:
    """(NUM_COMBOS,) float32 multi-hot of the (colour, shape) pairs in the scene."""
    target = np.zeros(NUM_COMBOS, np.float32)
    for obj in scene.objects:
        target[combo_index(obj.color, obj.shape)] = 1.0
    return target
