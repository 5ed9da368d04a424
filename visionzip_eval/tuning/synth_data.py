"""Synthetic training conversations in LLaVA's format, for tuning the tiny trained model on a CPU.

Scenes come from the training side of the split: the stream ``[seed, TRAIN_SEED_OFFSET,
EXPORT_STREAM]`` (``synth/train.py`` uses streams 0-4 of the same offset for the shipped
model's own training), never from the benchmark's ``[EVAL_SEED, benchmark]`` streams; the
export also checks that no exported scene is one of the benchmark's. Questions are the
benchmark's four formats from the generators the benchmark and the trainer share
(``synth/questions.py``, via ``train._train_docs``: POPE pairs with colour-sharing negatives,
an MME pair, GQA, MMBench), each worded by lmms-eval's own ``doc_to_text``, so a tuned model
is trained on the prompts the evaluation sends. Images are written through the benchmark's
JPEG encoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from visionzip_eval.synth import benchmark as B
from visionzip_eval.synth.scenes import Scene, render
from visionzip_eval.synth.train import TRAIN_SEED_OFFSET, _train_docs

EXPORT_STREAM = 5  # train.py draws its scenes from streams 0-4 of [seed, TRAIN_SEED_OFFSET, k]
HARD_PAIRS = 2  # existence pairs per scene whose negative shares a colour with an object (as train.py)


def training_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, TRAIN_SEED_OFFSET, EXPORT_STREAM])


def benchmark_scenes() -> set[Scene]:
    """Every scene of the four synthetic benchmarks (drawn, not rendered)."""
    return {scene for bench in B.BENCHES for scene in B.build_docs(bench)[1]}


def export_llava(output: str | Path, scenes: int, seed: int = 0) -> Path:
    """Write ``output/images/*.jpg`` and ``output/synth_llava.json`` (one single-turn
    conversation per question, every question of each scene); returns the JSON's path."""
    from visionzip_eval.synth.model import doc_prompt

    if not (isinstance(scenes, int) and scenes >= 1):
        raise ValueError(f"--scenes must be an integer >= 1, got {scenes!r}")
    drawn, docs = _train_docs(training_rng(seed), scenes, HARD_PAIRS)
    overlap = set(drawn) & benchmark_scenes()
    if overlap:  # cannot happen with distinct streams; checked because the split is the point
        raise ValueError(f"{len(overlap)} exported scenes are benchmark scenes: the training stream must differ")
    output = Path(output)
    images = output / "images"
    images.mkdir(parents=True, exist_ok=True)
    samples = []
    for index, (scene, questions) in enumerate(zip(drawn, docs)):
        name = f"images/train_{seed}_{index:06d}.jpg"
        (output / name).write_bytes(B.encode(render(scene)[0]))
        for number, (bench, doc) in enumerate(questions):
            samples.append({
                "id": f"synth_{seed}_{index:06d}_{number:02d}",
                "image": name,
                "benchmark": bench,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + doc_prompt(bench, doc)},
                    {"from": "gpt", "value": doc["answer"]},
                ],
            })
    path = output / "synth_llava.json"
    path.write_text(json.dumps(samples, indent=1) + "\n", encoding="utf-8")
    return path
