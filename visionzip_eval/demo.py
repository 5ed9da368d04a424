"""The README's first command: VisionZip on a tiny offline LLaVA at full/192/128/64 tokens.

Weights are random, so answers are noise; what it shows is the mechanism: how many visual
tokens reach the LLM at each budget, the prompt length, and the time each stage takes.
"""

from __future__ import annotations

import time

import torch

from visionzip_eval.budget import Budget
from visionzip_eval.compressor import make_reducer, remove_reduction, visionzip_processor
from visionzip_eval.testing import build_tiny_llava, sample_images

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


@torch.no_grad()
def run_demo(budgets=("full", 192, 128, 64), image: str = "astronaut", new_tokens: int = 8) -> list[dict]:
    model, processor = build_tiny_llava(seed=0)
    picture = sample_images()[image]
    rows = []
    for value in budgets:
        budget = Budget.parse(value)
        reducer = make_reducer(budget)
        reducer.apply(model)
        visionzip_processor(processor, model)
        inputs = processor(images=picture, text=PROMPT, return_tensors="pt")
        start = time.perf_counter()
        reducer.encode_images(model, inputs["pixel_values"])
        vision_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        generate_ms = (time.perf_counter() - start) * 1e3
        remove_reduction(model)
        rows.append(
            dict(
                budget=budget.label,
                visual_tokens=int((inputs["input_ids"] == model.config.image_token_id).sum()),
                prompt_tokens=inputs["input_ids"].shape[1],
                vision_ms=vision_ms,
                generate_ms=generate_ms,
                answer=processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True),
            )
        )
    visionzip_processor(processor, model)
    return rows


def format_demo_rows(rows: list[dict]) -> str:
    lines = [
        "| budget | visual tokens | prompt tokens | vision ms | generate ms (8 tokens) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['visual_tokens']} | {r['prompt_tokens']} "
            f"| {r['vision_ms']:.1f} | {r['generate_ms']:.1f} |"
        )
    return "\n".join(lines)
