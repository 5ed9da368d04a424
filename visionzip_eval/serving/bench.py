"""``visionzip-eval bench serve``: methods served by vLLM at several concurrencies.

Each (method, budget) runs round-robin with the others, batch by batch: a batch is C requests
submitted to vLLM at once (C = the concurrency; vLLM's ``max_num_seqs`` is the largest C), each
request with its own image (vLLM's prefix caching is off too, so no request reuses another's
prefill). Tower + reduction + projector run before submission (``vision_ms``, per request);
vLLM times TTFT and end-to-end from a request's arrival in the engine. Beside the measured
speed-ups: the FLOPs-predicted one (per request, batch-invariant) and the roofline-predicted one
for a batch of C (``roofline.request_bound(batch=C)``: weights read once, FLOPs and KV C times).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from visionzip_eval.serving.served import ServedEngine, check_servable, new_llm, vllm_unavailable

ROW_KEYS = ("method", "budget", "concurrency", "requests", "visual_tokens", "prompt_tokens", "requests_per_s",
            "prompt_tokens_per_s", "ttft_ms_p50", "ttft_ms_p90", "e2e_ms_p50", "e2e_ms_p90", "vision_ms_p50",
            "requests_per_s_with_vision", "prefill_tflops", "flops_predicted_speedup", "roofline_predicted_speedup",
            "rps_speedup", "ttft_speedup", "peak_memory_bytes", "noisy", "noise")
REALSIZE = "realsize-7b"  # LLaVA-1.5-7B's shape, random weights (vLLM's load_format="dummy")
QUESTION = "What is in the picture? Answer briefly."
SHAPE_MEMORY_FRACTION = 0.70  # vLLM's CPU backend: weights + KV cache (14.6 GB of bf16 weights need > 0.6 of 24 GB)
SHAPE_MARGIN_BYTES = 3 * 2**30  # the fp32 tower + projector copy, activations, Python


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0-1) by linear interpolation (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def request_image(index: int):
    """A distinct 336 px image per request index (seeded noise): no two requests share a prefix."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    return Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))


def shape_bytes_needed() -> int:
    from visionzip_eval.bench import _parameter_counts

    return _parameter_counts(32)[0] * 2 + SHAPE_MARGIN_BYTES


def check_shape_fits(available: int) -> None:
    """One line when LLaVA-1.5-7B's shape in bfloat16 does not fit in ``available`` bytes."""
    needed = shape_bytes_needed()
    if needed > available:
        raise ValueError(f"LLaVA-1.5-7B's shape in bfloat16 under vLLM needs about {needed / 2**30:.1f} GiB and "
                         f"{available / 2**30:.1f} GiB is available: free memory, or serve --tiny")


def tower_copy():
    """LLaVA-1.5-7B's tower and projector at exact size in float32 with a one-wide stand-in decoder
    (vLLM holds the LLM; this copy's decoder never runs): what ``Engine.encode`` reduces with."""
    from transformers import LlavaForConditionalGeneration

    from visionzip_eval.backends.llava_hf import llava15_7b_config, tiny_processor

    config = llava15_7b_config(1)
    config.text_config.intermediate_size = 1
    config.text_config.vocab_size = 512
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), tiny_processor()


def _load(pretrained: str, max_num_seqs: int, memory_fraction: float | None):
    """(served engine, roofline facts record, decoder shape, what was loaded)."""
    from visionzip_eval import roofline
    from visionzip_eval.engine import Engine
    from visionzip_eval.profiling import DecoderShape

    if pretrained == REALSIZE:
        import psutil

        from visionzip_eval.bench import _parameter_counts
        from visionzip_eval.serving.checkpoint import shape_checkpoint
        from visionzip_eval.backends.llava_hf import llava15_7b_config

        check_shape_fits(psutil.virtual_memory().available)
        # vLLM first: its CPU backend checks the free memory against its fraction at start-up
        folder = shape_checkpoint(Path(tempfile.mkdtemp(prefix="visionzip-vllm-shape-")))
        llm = new_llm(folder, torch.bfloat16, max_num_seqs=max_num_seqs, max_model_len=1024,
                      memory_fraction=memory_fraction or SHAPE_MEMORY_FRACTION, load_format="dummy",
                      max_num_batched_tokens=1024)  # = max_model_len: a full-budget request per step
        model, processor = tower_copy()
        served = ServedEngine(Engine(model, processor), llm, torch.bfloat16)
        config = llava15_7b_config(32)
        _, per_layer, _ = _parameter_counts(32)
        facts = roofline.ModelFacts.from_record(roofline.describe(served.backend, "cpu"))
        text = config.text_config
        facts = replace(facts, dtype="bfloat16", bytes_per_element=2, layers=32, decoder_weight_bytes=32 * per_layer * 2,
                        lm_head_weight_bytes=text.vocab_size * text.hidden_size * 2)
        return served, facts, DecoderShape.from_config(config.text_config), "LLaVA-1.5-7B's shape (random weights)"
    from visionzip_eval.loading import load_pretrained

    model, processor = load_pretrained(pretrained, torch.float32, torch.device("cpu"))
    served = ServedEngine.load(model, processor, None, pretrained, max_num_seqs=max_num_seqs,
                               memory_fraction=memory_fraction or 0.1)
    facts = roofline.ModelFacts.from_record(roofline.describe(served.backend, "cpu"))
    shape = DecoderShape.from_config(getattr(served.backend.config, "text_config", None) or served.backend.config)
    return served, facts, shape, pretrained


def bench_serve(
    pretrained: str = "builtin:tiny-llava-synth",
    methods: tuple[str, ...] = ("visionzip",),
    budgets: tuple = ("full", 64),
    concurrency: tuple[int, ...] = (1, 8, 32),
    requests: int = 8,
    max_new_tokens: int = 8,
    memory_fraction: float | None = None,
    progress: Callable[[str], None] = print,
) -> tuple[list[dict], dict]:
    """One row per (method, budget, concurrency) and facts about the run (see the module doc).

    ``requests``: at least this many timed requests per row (whole batches of C), after one
    warm-up request per (method, budget) at the start of the run. Refuses in-LLM methods and bad concurrencies before loading anything."""
    from visionzip_eval import roofline
    from visionzip_eval.bench import _configs, matmul_tflops
    from visionzip_eval.engine import Request
    from visionzip_eval.methods.registry import MethodSpec
    from visionzip_eval.profiling import PeakMemory, machine_probe, machine_record

    specs = [check_servable(m) for m in methods]
    if not concurrency or any(not isinstance(c, int) or c < 1 for c in concurrency):
        raise ValueError(f"concurrency values must be integers >= 1, got {list(concurrency)}")
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    configs = _configs(budgets, [s.label for s in specs])
    if not configs:
        raise ValueError("no (method, budget) to serve: give --budgets")
    if reason := vllm_unavailable():
        raise ValueError(reason)
    served, facts, shape, loaded = _load(pretrained, max(concurrency), memory_fraction)
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, seed=0)
    reducers = {c: MethodSpec.parse(c[0]).build(c[1]) for c in configs}
    memory = PeakMemory("cpu")
    before = machine_probe("cpu")
    samples: dict = {}
    index = 0
    started = time.perf_counter()
    for c in [0] + list(concurrency):  # 0: one warm-up request per config, not timed
        rounds = math.ceil(requests / c) if c else 1
        for round_index in range(rounds):
            for config in configs:
                progress(f"concurrency {c or 'warm-up'}, round {round_index + 1}/{rounds}: {config[0]} at {config[1]}")
                served.set_reducer(reducers[config])
                size = c or 1
                batch = [Request(turns=[(QUESTION, None)], images=[request_image(index + i)]) for i in range(size)]
                index += size
                metrics = [o.metrics for o in served.submit(batch, params)]
                if c:
                    samples.setdefault((config, c), []).append(metrics)
    after = machine_probe("cpu")
    machine = machine_record(before, after)
    llm_tflops = matmul_tflops(torch.device("cpu"), torch.bfloat16 if facts.dtype == "bfloat16" else torch.float32)
    device = roofline.Device(f"cpu (probe: {facts.dtype} matmul, copy)", llm_tflops, after["copy_gbs"],
                             "bench serve's own probe")
    rows = [_row(config, c, batches, shape, facts, device) for (config, c), batches in samples.items()]
    _speedups(rows)
    noisy, noise = _noise(machine)
    peak = memory.read()
    for row in rows:
        row.update(peak_memory_bytes=peak, noisy=noisy, noise=noise)
    info = dict(model=loaded, engine="vllm", llm_dtype=facts.dtype, max_new_tokens=max_new_tokens,
                seconds=time.perf_counter() - started, other_cpu_share=machine["other_cpu_share"],
                probe_gflops=after["matmul_gflops"], llm_matmul_tflops=llm_tflops, copy_gbs=after["copy_gbs"],
                roofline_device=device.describe(), noisy=noisy, noise=noise, threads=torch.get_num_threads())
    return rows, info


def _row(config, c: int, batches: list[list[dict]], shape, facts, device) -> dict:
    from visionzip_eval import roofline
    from visionzip_eval.profiling import prefill_flops

    flat = [m for batch in batches for m in batch]
    wall_s = sum(batch[0]["batch_wall_ms"] for batch in batches) / 1e3
    vision_s = sum(m["vision_ms"] for m in flat) / 1e3
    prompt_tokens = statistics.median(m["prompt_tokens"] for m in flat)
    flops = prefill_flops(shape, int(prompt_tokens))
    bound = roofline.request_bound(facts, device, flops, prompt_tokens, batch=c)
    ttft = [m["ttft_ms"] for m in flat if "ttft_ms" in m]
    e2e = [m["total_ms"] for m in flat if "total_ms" in m]
    return dict(
        method=config[0], budget=config[1], concurrency=c, requests=len(flat),
        visual_tokens=flat[0]["visual_tokens"], prompt_tokens=int(prompt_tokens),
        requests_per_s=len(flat) / wall_s, prompt_tokens_per_s=sum(m["prompt_tokens"] for m in flat) / wall_s,
        ttft_ms_p50=percentile(ttft, 0.5), ttft_ms_p90=percentile(ttft, 0.9),
        e2e_ms_p50=percentile(e2e, 0.5), e2e_ms_p90=percentile(e2e, 0.9),
        vision_ms_p50=percentile([m["vision_ms"] for m in flat], 0.5),
        requests_per_s_with_vision=len(flat) / (wall_s + vision_s),
        prefill_tflops=flops / 1e12, roofline_batch_prefill_ms=bound.prefill_ms,
    )


def _speedups(rows: list[dict]) -> None:
    """Against the full budget at the same concurrency (NaN where full was not served)."""
    full = {r["concurrency"]: r for r in rows if r["budget"] == "full"}
    for row in rows:
        base = full.get(row["concurrency"])
        ratio = (lambda key, inverse=False: math.nan if base is None else  # noqa: E731
                 (row[key] / base[key] if inverse else base[key] / row[key]))
        row.update(flops_predicted_speedup=ratio("prefill_tflops"),
                   roofline_predicted_speedup=ratio("roofline_batch_prefill_ms"),
                   rps_speedup=ratio("requests_per_s", inverse=True), ttft_speedup=ratio("ttft_ms_p50"))


def _noise(machine: dict) -> tuple[bool, str]:
    """The sweep's rule (``noise.flag_noisy``) applied to this one run's machine record."""
    import pandas as pd

    from visionzip_eval.noise import flag_noisy, probe_columns

    flagged = flag_noisy(pd.DataFrame([{**probe_columns(machine), "device": "cpu"}]))
    return bool(flagged["noisy"].iloc[0]), str(flagged["noise"].iloc[0])


def format_serve(rows: list[dict], info: dict) -> str:
    lines = [
        f"{info['model']} served by vLLM ({info['llm_dtype']} LLM), {info['max_new_tokens']} new tokens per request; "
        f"roofline: {info['roofline_device']}; other processes' CPU share {info['other_cpu_share']:.0%}"
        + (f" (NOISY: {info['noise']})" if info["noisy"] else ""),
        "",
        "| method | budget | C | n | visual tokens | prompt tokens | req/s | prompt tok/s | TTFT p50 / p90 ms "
        "| e2e p50 / p90 ms | vision ms p50 | req/s with vision | req/s speed-up | TTFT speed-up | FLOPs-predicted "
        "| roofline-predicted (batch C) |",
        "|" + "---|" * 16,
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['concurrency']} | {r['requests']} | {r['visual_tokens']} "
            f"| {r['prompt_tokens']} | {r['requests_per_s']:.2f} | {r['prompt_tokens_per_s']:.0f} "
            f"| {r['ttft_ms_p50']:.1f} / {r['ttft_ms_p90']:.1f} | {r['e2e_ms_p50']:.1f} / {r['e2e_ms_p90']:.1f} "
            f"| {r['vision_ms_p50']:.1f} | {r['requests_per_s_with_vision']:.2f} | {r['rps_speedup']:.2f}x "
            f"| {r['ttft_speedup']:.2f}x | {r['flops_predicted_speedup']:.2f}x | {r['roofline_predicted_speedup']:.2f}x |"
        )
    lines += ["", f"peak memory (process RSS, cumulative): {rows[0]['peak_memory_bytes'] / 2**30:.2f} GiB"]
    return "\n".join(lines)
