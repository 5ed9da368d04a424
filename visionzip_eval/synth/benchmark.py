"""The synthetic benchmark on disk: scenes and questions in the hub schemas of GQA, MMBench,
MME and POPE, written in the data-root layout of ``visionzip_eval.datasets``, so the
``visionzip_synth_*`` tasks read it exactly like the real benchmarks' local snapshots and score
it with lmms-eval's own functions.

Nothing is shipped: the data is generated from :data:`EVAL_SEED` the first time a task asks
for it (a few seconds) into ``$VISIONZIP_DATA/synth-v<VERSION>-seed<seed>/`` (default
``~/.cache/visionzip_eval/data/...``), under a file lock and by atomic renames, so concurrent
sweeps and interrupted runs never see half a split. The YAML hook ``!function
visionzip_eval.synth.benchmark.data_files_<bench>`` returns the paths.

Images are stored as JPEG (quality :data:`JPEG_QUALITY`); the trainer passes its own renders
through the same encoding, so the model sees at test time the kind of pixels it learnt on.
"""

from __future__ import annotations

import io
import os
import string
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from visionzip_eval.synth import questions as Q
from visionzip_eval.synth.scenes import COLOR_NAMES, SHAPES, Scene, random_scene, render

VERSION = 1  # bump when scenes or questions change: a new cache folder, old results stay valid
EVAL_SEED = 20241205
JPEG_QUALITY = 90
# Scenes per benchmark; questions: POPE 6 per scene, MME 2, GQA 2, MMBench 1 x 4 rotations.
EVAL_SCENES = {"pope": 100, "mme": 120, "gqa": 120, "mmbench": 60}
BENCHES = tuple(EVAL_SCENES)
_BENCH_OFFSET = {bench: i for i, bench in enumerate(BENCHES)}  # each benchmark its own scenes


def encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def scene_rng(seed: int, bench: str) -> np.random.Generator:
    return np.random.default_rng([seed, _BENCH_OFFSET[bench]])


def popular_pairs(scenes: list[Scene]) -> list[tuple[str, str]]:
    """All (colour, shape) pairs, most frequent in ``scenes`` first (ties in a fixed order)."""
    counts = Counter((o.color, o.shape) for s in scenes for o in s.objects)
    pairs = [(c, s) for c in COLOR_NAMES for s in SHAPES]
    return sorted(pairs, key=lambda p: -counts[p])


# ---------------------------------------------------------------- rows in the hub schemas
# Each builder returns (rows, scenes); a row's "_scene" is the index of its scene, which the
# writer replaces by the image cell and the trainer by the rendered image.


def pope_docs(rng: np.random.Generator, n_scenes: int) -> tuple[list[dict], list[Scene]]:
    scenes = [random_scene(rng) for _ in range(n_scenes)]
    popular = popular_pairs(scenes)
    rows = []
    for i, scene in enumerate(scenes):
        for question, answer, category in Q.pope_questions(scene, rng, popular):
            number = str(len(rows) + 1)
            rows.append(dict(id=number, question_id=number, question=question, answer=answer,
                             image_source=f"synth_{i:05d}", category=category, _scene=i))
    return rows, scenes


def mme_docs(rng: np.random.Generator, n_scenes: int) -> tuple[list[dict], list[Scene]]:
    scenes = [random_scene(rng) for _ in range(n_scenes)]
    rows = []
    for i, scene in enumerate(scenes):
        category, yes, no = Q.mme_pair(scene, rng)
        question_id = f"{category}/{i:05d}.jpg"  # both questions of an image share it (MME pairs them)
        for question, answer in ((yes, "Yes"), (no, "No")):
            rows.append(dict(question_id=question_id, question=question, answer=answer, category=category, _scene=i))
    return rows, scenes


def gqa_docs(rng: np.random.Generator, n_scenes: int, per_scene: int = 2) -> tuple[list[dict], list[Scene]]:
    scenes = [random_scene(rng) for _ in range(n_scenes)]
    rows = []
    for i, scene in enumerate(scenes):
        asked = set()
        for _ in range(per_scene * 4):  # a few tries for distinct questions
            question, answer, full, _kind = Q.gqa_question(scene, rng)
            if question in asked:
                continue
            asked.add(question)
            rows.append(dict(id=f"synth{len(rows):07d}", imageId=f"synth_{i:05d}", question=question, answer=answer,
                             fullAnswer=full, isBalanced=True, _scene=i))
            if len(asked) == per_scene:
                break
    return rows, scenes


def mmbench_docs(rng: np.random.Generator, n_scenes: int, rotations: int = 4) -> tuple[list[dict], list[Scene]]:
    """MMBench dev holds each question once per rotation of its options (circular evaluation):
    index i + k * 1e6 is rotation k of question i; a question counts only if all are right."""
    scenes = [random_scene(rng) for _ in range(n_scenes)]
    base = []
    for i, scene in enumerate(scenes):
        base.append((i, *Q.mmbench_question(scene, rng)))
    rows = []
    letters = string.ascii_uppercase[:4]
    for k in range(rotations):
        for i, question, options, correct, category, l2 in base:
            rotated = [options[(j + k) % 4] for j in range(4)]
            rows.append(dict(index=i + k * 1_000_000, question=question, hint=None, answer=letters[(correct - k) % 4],
                             **dict(zip(letters, rotated)), category=category, source="visionzip_synth",
                             **{"L2-category": l2}, comment=None, split="dev", _scene=i))
    return rows, scenes


DOC_BUILDERS = {"pope": pope_docs, "mme": mme_docs, "gqa": gqa_docs, "mmbench": mmbench_docs}


def build_docs(bench: str, seed: int = EVAL_SEED, n_scenes: int | None = None) -> tuple[list[dict], list[Scene]]:
    return DOC_BUILDERS[bench](scene_rng(seed, bench), n_scenes or EVAL_SCENES[bench])


# ---------------------------------------------------------------- writing the data root


def _features(bench: str):
    import datasets

    s, image = datasets.Value("string"), datasets.Image()
    return {
        "pope": datasets.Features(dict(id=s, question_id=s, question=s, answer=s, image_source=s, image=image, category=s)),
        "mme": datasets.Features(dict(question_id=s, image=image, question=s, answer=s, category=s)),
        "gqa": datasets.Features(dict(id=s, imageId=s, question=s, answer=s, fullAnswer=s, isBalanced=datasets.Value("bool"))),
        "mmbench": datasets.Features({"index": datasets.Value("int64"), "question": s, "hint": s, "answer": s, "A": s,
                                      "B": s, "C": s, "D": s, "category": s, "image": image, "source": s,
                                      "L2-category": s, "comment": s, "split": s}),
    }[bench]


def write_benchmark(root: str | os.PathLike, seed: int = EVAL_SEED, scenes: dict[str, int] | None = None) -> Path:
    """Write all four synthetic benchmarks under ``root`` (the data-root layout). Returns root."""
    import datasets

    from visionzip_eval.datasets import write_split

    root = Path(root)
    sizes = {**EVAL_SCENES, **(scenes or {})}
    for bench in BENCHES:
        rows, scene_list = build_docs(bench, seed, sizes[bench])
        images = [{"bytes": encode(render(s)[0]), "path": None} for s in scene_list]
        features = _features(bench)
        if bench == "gqa":  # questions and images are two configs, joined on imageId
            image_table = datasets.Dataset.from_dict(
                {"id": [f"synth_{i:05d}" for i in range(len(scene_list))], "image": images},
                features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()}),
            )
            write_split(image_table, root, "gqa", "testdev", config="testdev_balanced_images")
            config, split = "testdev_balanced_instructions", "testdev"
        else:
            for row in rows:
                row["image"] = images[row["_scene"]]
            config, split = {"pope": (None, "test"), "mme": (None, "test"), "mmbench": ("en", "dev")}[bench]
        table = datasets.Dataset.from_dict({key: [r[key] for r in rows] for key in features}, features=features)
        write_split(table, root, bench, split, config=config)
    return root


def default_root(seed: int = EVAL_SEED) -> Path:
    from visionzip_eval.datasets import data_root

    return Path(data_root()) / f"synth-v{VERSION}-seed{seed}"


def ensure_benchmark(seed: int = EVAL_SEED) -> Path:
    """The synthetic data root, generated first if it is not complete. Safe under concurrency:
    one process writes (file lock), into a temporary folder renamed into place at the end."""
    import shutil

    from filelock import FileLock

    root = default_root(seed)
    done = root / ".complete"
    if done.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if done.exists():
            return root
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_benchmark(partial, seed)
        (partial / ".complete").write_text(f"visionzip_eval synthetic benchmark v{VERSION}, seed {seed}\n")
        shutil.rmtree(root, ignore_errors=True)
        partial.rename(root)
    return root


def __getattr__(name: str):
    """``data_files_<bench>``: the task YAML hook (see the module docstring)."""
    prefix = "data_files_"
    if name.startswith(prefix) and name[len(prefix):] in BENCHES:
        from visionzip_eval.datasets import data_files

        return data_files(name[len(prefix):], root=ensure_benchmark())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
