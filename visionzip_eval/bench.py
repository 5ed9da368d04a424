"""Benchmarks that print figures (never timed tests).

``bench_tower``: what the VisionZip step costs next to the vision tower, and what the official
approach (eager attention with ``output_attentions=True`` on every layer) costs, on a
CLIP-L-sized random tower (24 layers, 1024 wide, 16 heads, 336 px -> 577 tokens).
"""

from __future__ import annotations

import statistics
import time
from functools import lru_cache
from typing import Callable

import torch

from visionzip_eval.backends import backend_for
from visionzip_eval.methods.visionzip import VisionZip
from visionzip_eval.backends.llava_hf import build_tiny_llava

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


def _configs(budgets, methods) -> list[tuple[str, str]]:
    """(method, budget) pairs to time: ``full`` once (method "none"), whatever the methods."""
    configs = [("none", "full")] if "full" in [str(b) for b in budgets] else []
    return configs + [(m, str(b)) for m in methods for b in budgets if str(b) != "full"]


def _round_robin(model, processor, configs, repeats: int, progress: Callable[[str], None], batch: int = 1) -> dict:
    """Each config's per-request metrics (engine records) over ``repeats`` rounds of one
    request (``batch`` > 1: one batch of that many) per config, after a warm-up round: drift in
    machine load hits all alike."""
    from visionzip_eval.engine import Engine, Generation, Request
    from visionzip_eval.methods import MethodSpec
    from visionzip_eval.testing import sample_images

    engine = Engine(model, processor)
    request = Request(turns=[("What is in the picture? Answer briefly.", None)], images=[sample_images()["astronaut"]])
    settings = Generation(max_new_tokens=1)
    reducers = {c: MethodSpec.parse(c[0]).build(c[1]) for c in configs}
    samples: dict = {c: [] for c in configs}
    try:
        for index in range(repeats + 1):  # round 0 warms up
            for config in configs:
                progress(f"round {index + 1}/{repeats + 1}: {config[0]} at {config[1]}")
                engine.set_reducer(reducers[config])
                metrics = engine.generate([request] * batch, settings)[0].metrics
                if index:
                    samples[config].append(metrics)
    finally:
        engine.close()
    return samples


def _prefill_rows(samples: dict) -> list[dict]:
    """One row per config: medians with min-max, and speed-ups against the first (``full``)."""

    def spread(config, key):
        values = sorted(s[key] for s in samples[config])
        return statistics.median(values), values[0], values[-1]

    rows = []
    for config, measured in samples.items():
        first = measured[0]
        prefill, prefill_low, prefill_high = spread(config, "prefill_ms")
        rows.append(dict(
            method=config[0], budget=config[1], visual_tokens=first["visual_tokens"],
            visual_tokens_after_pruning=first["visual_tokens_after_pruning"], prompt_tokens=first["prompt_tokens"],
            vision_ms=spread(config, "vision_ms")[0], prefill_ms=prefill, prefill_ms_min=prefill_low,
            prefill_ms_max=prefill_high, ttft_ms=spread(config, "ttft_ms")[0],
            prefill_tflops=first["prefill_flops"] / 1e12, vision_tflops=first["vision_flops"] / 1e12,
            peak_memory_bytes=max(s["peak_memory_bytes"] or 0 for s in measured),
            peak_memory_kind=first["peak_memory_kind"],
        ))
    full = rows[0]
    for row in rows:
        row["prefill_speedup"] = full["prefill_ms"] / row["prefill_ms"]
        row["flops_predicted_speedup"] = full["prefill_tflops"] / row["prefill_tflops"]
        row["ttft_speedup"] = full["ttft_ms"] / row["ttft_ms"]
    return rows


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

    The configurations run round-robin (:func:`_round_robin`); times are medians with the
    min-max spread."""
    model, processor = build_tiny_llava(seed=0, **(sizes or {**CLIP_L, **PROXY_LLM}))
    return _prefill_rows(_round_robin(model, processor, _configs(budgets, methods), repeats, progress))


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


# -- bench realsize: LLaVA-1.5-7B's exact shape --------------------------------------------------

MEMORY_MARGIN_BYTES = 2 * 2**30  # activations, the KV cache, the allocator and Python besides the weights


def _resolve(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    from visionzip_eval.loading import resolve_device, resolve_dtype

    device = resolve_device(device)
    return device, resolve_dtype(dtype, device)


@lru_cache(maxsize=None)  # the fit check and the time estimate both ask
def _parameter_counts(layers: int) -> tuple[int, int, int]:
    """(all parameters, one decoder layer's, the vision tower's + projector's) of the 7B shape,
    counted on the meta device (nothing allocated)."""
    from transformers import LlavaForConditionalGeneration

    from visionzip_eval.backends.llava_hf import llava15_7b_config

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava15_7b_config(layers))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return (count(model), count(model.model.language_model.layers[0]),
            count(model.model.vision_tower) + count(model.model.multi_modal_projector))


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_fits(layers: int, dtype: torch.dtype, free_bytes: int) -> int:
    """The bytes the 7B shape with ``layers`` decoder layers needs in ``dtype`` (weights and a
    margin); a one-line ValueError naming the largest layer count that fits when it does not."""
    total, per_layer, _ = _parameter_counts(layers)
    size = dtype.itemsize
    needed = total * size + MEMORY_MARGIN_BYTES
    if needed <= free_bytes:
        return needed
    fixed = (total - layers * per_layer) * size + MEMORY_MARGIN_BYTES
    largest = int((free_bytes - fixed) // (per_layer * size))
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    fix = (f"pass --layers {largest} to time {largest} of the {layers} decoder layers at exact size"
           if largest >= 1 else "no decoder layer fits beside the tower and embeddings: free memory or use a GPU")
    raise ValueError(f"LLaVA-1.5-7B's shape with {layers} decoder layers in {str(dtype).removeprefix('torch.')} "
                     f"needs {gib(needed)} ({gib(MEMORY_MARGIN_BYTES)} of it margin) and {gib(free_bytes)} is free: {fix}")


def matmul_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best-of-``repeats`` rate of a square matmul as large as the 7B's (1024 on a CPU, 8192 on
    a GPU) in ``dtype``: what the run's compute can reach, and how long it will take."""
    from visionzip_eval.profiling import best_seconds

    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / best_seconds(lambda: a @ b, device, repeats) / 1e12


def estimate_seconds(layers: int, budgets, methods, repeats: int, tflops: float) -> float:
    """About how long the round-robin takes at ``tflops``: 2 FLOPs per parameter per token
    through the decoder (at the budget's tokens + a 40-token prompt) and the tower (577 tokens)."""
    total, per_layer, vision = _parameter_counts(layers)
    configs = _configs(budgets, methods)
    tokens = sum((576 if budget == "full" else int(budget)) + 40 for _, budget in configs)
    flops = 2 * (layers * per_layer * tokens + vision * 577 * len(configs))
    return (repeats + 1) * flops / (tflops * 1e12)


@torch.no_grad()
def bench_realsize(
    budgets: tuple = ("full", 192, 128, 64),
    repeats: int = 2,
    layers: int = 32,
    dtype: str = "auto",
    device: str | None = None,
    max_minutes: float = 30.0,
    methods: tuple[str, ...] = ("visionzip",),
    progress: Callable[[str], None] = print,
    batches: tuple[int, ...] = (1,),
) -> tuple[list[dict], dict]:
    """Prefill and TTFT of LLaVA-1.5-7B's exact architecture (random weights) at each budget,
    round-robin, beside the FLOPs-predicted and roofline-predicted speed-ups and the peak memory.
    ``batches``: batch sizes (a batch of b copies of the request, one generate call): each row
    carries its batch and requests/s (b / the batch's TTFT), speed-ups within its batch size.

    Refuses in one line, before building anything, when the weights do not fit in free memory
    (naming the largest layer count that does) or when the run would take over ``max_minutes``
    at the measured matmul rate (the CPU's bfloat16 runs ~100x slower than its float32).
    Returns (rows, facts about the run)."""
    from visionzip_eval import roofline
    from visionzip_eval.backends import backend_for
    from visionzip_eval.profiling import machine_probe
    from visionzip_eval.backends.llava_hf import LLAVA15_7B, build_llava15_7b_shape

    if not batches or any(not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"batch sizes must be integers >= 1, got {list(batches)}")
    device, torch_dtype = _resolve(device, dtype)
    needed = check_fits(layers, torch_dtype, _free_bytes(device))
    progress(f"probing {str(torch_dtype).removeprefix('torch.')} matmul speed on {device}")
    tflops = matmul_tflops(device, torch_dtype)
    seconds = estimate_seconds(layers, budgets, methods, repeats, tflops) * sum(batches)
    if seconds > max_minutes * 60:
        raise ValueError(f"at the measured {tflops * 1e3:.1f} GFLOP/s this run would take about {seconds / 60:.0f} "
                         f"min (over --max-minutes {max_minutes:g}): use --dtype float32 on a CPU, fewer --layers "
                         "or --repeats, or raise --max-minutes")
    progress(f"building LLaVA-1.5-7B's shape with {layers} decoder layers ({needed / 2**30:.1f} GiB), "
             f"about {seconds / 60:.1f} min to time")
    model, processor = build_llava15_7b_shape(layers, torch_dtype, device)
    copy_gbs = machine_probe(device)["copy_gbs"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    limit = roofline.device_for(name) if device.type == "cuda" and torch_dtype != torch.float32 else None
    if limit is None:  # the CPU, float32, or a GPU without datasheet figures: this run's own probe
        limit = roofline.Device(f"{name} (probe: {str(torch_dtype).removeprefix('torch.')} matmul, copy)",
                                tflops, copy_gbs, "bench realsize's own probe")
    facts = roofline.ModelFacts.from_record(roofline.describe(backend_for(model), device))
    rows = []
    try:
        for batch in batches:
            group = _prefill_rows(_round_robin(model, processor, _configs(budgets, methods), repeats, progress, batch))
            for row in group:
                cached = row["prompt_tokens"] - row["visual_tokens"] + row["visual_tokens_after_pruning"]
                bound = roofline.request_bound(facts, limit, row["prefill_tflops"] * 1e12, cached,
                                               row["vision_tflops"] * 1e12, batch=batch)
                row.update(batch=batch, requests_per_s=batch / (row["ttft_ms"] / 1e3),
                           prefill_roofline_ms=bound.prefill_ms, ttft_roofline_ms=bound.ttft_ms,
                           roofline_bound_by=bound.prefill.bound_by,
                           kv_cache_bytes=batch * cached * facts.kv_bytes_per_position)
            for row in group:
                row["prefill_vs_roofline"] = row["prefill_ms"] / row["prefill_roofline_ms"]
                row["roofline_predicted_speedup"] = group[0]["prefill_roofline_ms"] / row["prefill_roofline_ms"]
                row["requests_per_s_speedup"] = row["requests_per_s"] / group[0]["requests_per_s"]
            rows += group
    finally:
        del model
    info = dict(layers=layers, of_layers=LLAVA15_7B["text_layers"], dtype=str(torch_dtype).removeprefix("torch."),
                device=name, weights_gib=(needed - MEMORY_MARGIN_BYTES) / 2**30, roofline_device=limit.describe(),
                matmul_tflops=tflops, copy_gbs=copy_gbs, threads=torch.get_num_threads())
    return rows, info


def format_realsize(rows: list[dict], info: dict) -> str:
    part = ("all 32 decoder layers" if info["layers"] == info["of_layers"] else
            f"{info['layers']} of its {info['of_layers']} decoder layers (each of exact size; the tower, "
            "projector, embeddings and LM head whole)")
    lines = [
        f"LLaVA-1.5-7B's architecture, random weights, {part}: {info['weights_gib']:.1f} GiB of "
        f"{info['dtype']} weights on {info['device']}. Roofline: {info['roofline_device']}.",
        "",
        "| method | budget | visual tokens in / kept | prompt tokens | vision ms | prefill ms (min-max) | TTFT ms "
        "| prefill TFLOPs | prefill speed-up | FLOPs-predicted | roofline prefill ms | measured / roofline "
        "| roofline-predicted | bound by | KV cache MiB | peak memory GiB | batch | requests/s (speed-up) |",
        "|" + "---|" * 18,
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['visual_tokens']} / {r['visual_tokens_after_pruning']} "
            f"| {r['prompt_tokens']} | {r['vision_ms']:.1f} | {r['prefill_ms']:.1f} ({r['prefill_ms_min']:.1f}-"
            f"{r['prefill_ms_max']:.1f}) | {r['ttft_ms']:.1f} | {r['prefill_tflops']:.3f} | {r['prefill_speedup']:.2f}x "
            f"| {r['flops_predicted_speedup']:.2f}x | {r['prefill_roofline_ms']:.2f} | {r['prefill_vs_roofline']:.2f} "
            f"| {r['roofline_predicted_speedup']:.2f}x | {r['roofline_bound_by']} | {r['kv_cache_bytes'] / 2**20:.1f} "
            f"| {r['peak_memory_bytes'] / 2**30:.2f} | {r['batch']} | {r['requests_per_s']:.2f} "
            f"({r['requests_per_s_speedup']:.2f}x) |"
        )
    kind = rows[0]["peak_memory_kind"]
    lines += ["", "peak memory: " + ("the CUDA allocator's peak during each request" if kind == "cuda_max_allocated"
                                     else "the process's peak RSS, cumulative over the run (the weights dominate; "
                                          "the KV-cache column is what a budget changes)")]
    return "\n".join(lines)


def noise_guarded(measure: Callable[[], object], device: str | torch.device = "cpu") -> tuple[object, dict]:
    """``measure()`` between two machine probes (the sweep's): its result and ``{noisy, noise,
    machine}``, judged by :func:`visionzip_eval.noise.probe_noise`. Timings taken while other
    processes were busy or the machine changed speed are flagged, not hidden."""
    from visionzip_eval.noise import probe_noise
    from visionzip_eval.profiling import machine_probe, machine_record

    machine_probe(device)  # a process's first probe can read slow (noise.probe_columns): not the machine
    before = machine_probe(device)
    result = measure()
    record = machine_record(before, machine_probe(device))
    why = probe_noise(record)
    return result, {"noisy": bool(why), "noise": why, "machine": record}


def format_noise(guard: dict) -> str:
    """One line under a bench's table: quiet, or NOISY and why."""
    share = guard["machine"].get("other_cpu_share")
    load = f"other processes used {share:.0%} of the cores" if isinstance(share, (int, float)) else "load unknown"
    if guard["noisy"]:
        return (f"NOISY machine: {guard['noise']}: these timings are not comparable with other runs; "
                "re-run on a quiet machine")
    return f"machine quiet during the bench ({load}; matmul probe steady)"
