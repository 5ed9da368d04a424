"""Benchmarks that print figures (never timed tests).

``bench_tower``: what the VisionZip step costs next to the vision tower, and what the official
approach (eager attention with ``output_attentions=True`` on every layer) costs, on a
CLIP-L-sized random tower (24 layers, 1024 wide, 16 heads, 336 px -> 577 tokens).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from visionzip_eval.backends import backend_for
from visionzip_eval.methods.visionzip import VisionZip
from visionzip_eval.testing import build_tiny_llava

CLIP_L = dict(vision_hidden=1024, vision_layers=24, vision_heads=16)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def bench_tower(
    batch_sizes: tuple[int, ...] = (1, 8),
    repeats: int = 3,
    step_repeats: int = 20,
    dominant: int = 54,
    contextual: int = 10,
    sizes: dict | None = None,
    progress: Callable[[str], None] = print,
) -> list[dict]:
    """One row per batch size; times are medians in milliseconds (CPU, ``perf_counter``)."""
    sizes = sizes or CLIP_L
    sdpa, _ = build_tiny_llava(seed=0, attn_implementation="sdpa", **sizes)
    eager, _ = build_tiny_llava(seed=0, attn_implementation="eager", **sizes)
    vz = VisionZip(dominant, contextual)
    backend = backend_for(sdpa)
    tower, eager_tower = sdpa.model.vision_tower, eager.model.vision_tower
    rows = []
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, 336, 336, generator=torch.Generator().manual_seed(batch))
        signals = backend.capture(pixels, attention=True)

        def step():
            signals._cache.clear()  # recompute the CLS row every time
            return vz.reduce(signals, backend)

        progress(f"batch {batch}: VisionZip step (CLS row + key metric + select + merge)")
        step_ms = median_ms(step, step_repeats, warmup=3)
        # The three tower variants run round-robin, so drift in machine load hits all alike.
        variants = {
            "tower_ms": lambda: tower(pixels),
            "capture_ms": lambda: backend.capture(pixels, attention=True),
            "official_tower_ms": lambda: eager_tower(pixels, output_attentions=True, output_hidden_states=True),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_index in range(repeats + 1):  # round 0 warms up
            progress(f"batch {batch}: tower round {round_index + 1}/{repeats + 1} (plain, ours, official)")
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                if round_index:
                    times[name].append((time.perf_counter() - start) * 1e3)
        medians = {name: statistics.median(values) for name, values in times.items()}
        ours = medians["capture_ms"] + step_ms
        rows.append(
            dict(
                batch=batch,
                **medians,
                step_ms=step_ms,
                step_pct_of_tower=100 * step_ms / medians["tower_ms"],
                ours_total_ms=ours,
                official_vs_ours=medians["official_tower_ms"] / ours,
                threads=torch.get_num_threads(),
            )
        )
    return rows


def format_tower_rows(rows: list[dict]) -> str:
    header = (
        "| batch | plain tower ms | our capture ms | VisionZip step ms | step % of tower "
        "| ours total ms | official eager+attentions ms | official / ours |"
    )
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['tower_ms']:.1f} | {r['capture_ms']:.1f} | {r['step_ms']:.2f} "
            f"| {r['step_pct_of_tower']:.2f}% | {r['ours_total_ms']:.1f} | {r['official_tower_ms']:.1f} "
            f"| {r['official_vs_ours']:.2f}x |"
        )
    return "\n".join(lines)


PROXY_LLM = dict(text_hidden=1024, text_layers=8, text_heads=16, text_kv_heads=16)


@torch.no_grad()
def bench_prefill(
    budgets: tuple = ("full", 192, 128, 64),
    repeats: int = 3,
    sizes: dict | None = None,
    progress: Callable[[str], None] = print,
    methods: tuple[str, ...] = ("visionzip",),
) -> list[dict]:
    """LLM prefill and time to first token per (method, budget) on a CPU proxy VLM (CLIP-L
    tower, 8-layer 1024-wide Llama, random weights), beside the FLOPs-predicted prefill ratio.

    The configurations run round-robin (one request each per round, after a warm-up round), so
    drift in machine load hits all alike; times are medians with the p10-p90 spread. ``full``
    runs once, whatever the methods."""
    from visionzip_eval.engine import Engine, Generation, Request
    from visionzip_eval.methods import MethodSpec
    from visionzip_eval.testing import sample_images

    model, processor = build_tiny_llava(seed=0, **(sizes or {**CLIP_L, **PROXY_LLM}))
    engine = Engine(model, processor)
    request = Request(turns=[("What is in the picture? Answer briefly.", None)], images=[sample_images()["astronaut"]])
    settings = Generation(max_new_tokens=1)
    configs = [("none", "full")] if "full" in [str(b) for b in budgets] else []
    configs += [(m, str(b)) for m in methods for b in budgets if str(b) != "full"]
    reducers = {c: MethodSpec.parse(c[0]).build(c[1]) for c in configs}
    samples: dict = {c: [] for c in configs}
    try:
        for index in range(repeats + 1):  # round 0 warms up
            for config in configs:
                progress(f"round {index + 1}/{repeats + 1}: {config[0]} at {config[1]}")
                engine.set_reducer(reducers[config])
                metrics = engine.generate([request], settings)[0].metrics
                if index:
                    samples[config].append(metrics)
    finally:
        engine.close()

    def spread(config, key):
        values = sorted(s[key] for s in samples[config])
        return statistics.median(values), values[0], values[-1]

    rows = []
    for config in configs:
        first = samples[config][0]
        prefill, prefill_low, prefill_high = spread(config, "prefill_ms")
        rows.append(dict(
            method=config[0], budget=config[1], visual_tokens=first["visual_tokens"],
            visual_tokens_after_pruning=first["visual_tokens_after_pruning"], prompt_tokens=first["prompt_tokens"],
            vision_ms=spread(config, "vision_ms")[0], prefill_ms=prefill, prefill_ms_min=prefill_low,
            prefill_ms_max=prefill_high, ttft_ms=spread(config, "ttft_ms")[0],
            prefill_tflops=first["prefill_flops"] / 1e12,
        ))
    full = rows[0]
    for row in rows:
        row["prefill_speedup"] = full["prefill_ms"] / row["prefill_ms"]
        row["flops_predicted_speedup"] = full["prefill_tflops"] / row["prefill_tflops"]
        row["ttft_speedup"] = full["ttft_ms"] / row["ttft_ms"]
    return rows


def format_prefill_rows(rows: list[dict]) -> str:
    lines = [
        "| method | budget | visual tokens in / kept | prompt tokens | vision ms | prefill ms (min-max) | TTFT ms "
        "| prefill TFLOPs | prefill speed-up | FLOPs-predicted | TTFT speed-up |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['visual_tokens']} / {r['visual_tokens_after_pruning']} "
            f"| {r['prompt_tokens']} | {r['vision_ms']:.1f} | {r['prefill_ms']:.1f} ({r['prefill_ms_min']:.1f}-"
            f"{r['prefill_ms_max']:.1f}) | {r['ttft_ms']:.1f} | {r['prefill_tflops']:.4f} "
            f"| {r['prefill_speedup']:.2f}x | {r['flops_predicted_speedup']:.2f}x | {r['ttft_speedup']:.2f}x |"
        )
    return "\n".join(lines)
