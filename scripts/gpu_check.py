"""``scripts/gpu_check.sh``: the CUDA-only paths of a machine with one GPU, checked in about ten
minutes, with a one-page summary.

Steps, in order; each ends passed, failed or skipped (with the reason), one failing never stops
the next, and the summary is rewritten after each (a kill loses nothing already checked):

1. ``cuda``: CUDA-event timing against the wall clock, ``max_memory_allocated`` against a known
   allocation, fp16 and bf16 matmul rates, and the engine end to end in fp16 at full and 64 tokens
   (``flash_attention_2`` when ``flash_attn`` is installed, ``sdpa`` otherwise).
2. ``parity``: VisionZip's dominant tokens in fp16 (``selection_precision`` float32 and
   reference) against the same weights in float32 arithmetic, on real photos, with LLaVA-1.5-7B's weights when they are
   in the Hugging Face cache, else the tiny trained model (said so).
3. ``realsize``: ``bench realsize`` (LLaVA-1.5-7B's exact shape) in fp16 and bf16.
4. ``accuracy``: MME + POPE at full and 64 tokens (``configs/ci_gpu.yaml``, limit 200; the tiny
   trained model on the synthetic tasks when the weights are absent), and a ``baselines/gpu_ci.json``
   candidate written from it.
5. ``serve``: ``bench serve`` (the tiny trained model served by vLLM, VisionZip and DivPrune at full and
   64, concurrency 1 and 8); skipped, saying why, where vLLM is not importable (run the script with
   ``PYTHON=.venv-vllm/bin/python`` after ``scripts/setup_vllm.sh`` with the official ``vllm``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
LLAVA15_7B_HUB = "llava-hf/llava-1.5-7b-hf"
TINY = "builtin:tiny-llava-synth"


class Skip(Exception):
    """A step that cannot run here; the message says why."""


@dataclass
class Step:
    name: str
    status: str = "pending"  # passed, failed, skipped
    seconds: float = 0.0
    detail: str = ""
    figures: dict = field(default_factory=dict)


@dataclass
class Context:
    output_dir: Path
    device: torch.device
    weights: str | None  # LLaVA-1.5-7B's hub id when it is in the local cache, else None
    limit: int
    progress: Callable[[str], None]


def cached_weights(hub_id: str = LLAVA15_7B_HUB) -> str | None:
    """``hub_id`` when its config and weights index are in the Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = [try_to_load_from_cache(hub_id, name) for name in ("config.json", "model.safetensors.index.json")]
    return hub_id if all(isinstance(path, str) for path in found) else None


def _need_cuda(ctx: Context) -> None:
    if ctx.device.type != "cuda":
        raise Skip("no CUDA GPU (torch.cuda.is_available() is False): CUDA events, the allocator's peak "
                   "and half precision are GPU paths")


# -- steps ---------------------------------------------------------------------------------------


def step_cuda(ctx: Context) -> dict:
    from visionzip_eval.bench import matmul_tflops
    from visionzip_eval.engine import Engine, Generation, Request
    from visionzip_eval.loading import load_pretrained
    from visionzip_eval.methods import MethodSpec
    from visionzip_eval.profiling import PeakMemory, StageClock
    from visionzip_eval.testing import sample_images

    _need_cuda(ctx)
    device = ctx.device
    figures = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__, cuda=torch.version.cuda)
    # CUDA events must time what the wall clock (after a synchronize) times
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    a @ a
    torch.cuda.synchronize(device)
    clock, wall = StageClock(device), time.perf_counter()
    clock.mark("a")
    for _ in range(20):
        a @ a
    clock.mark("b")
    clock.finish()
    wall_ms = (time.perf_counter() - wall) * 1e3
    figures.update(event_ms=clock.ms("a", "b"), wall_ms=wall_ms)
    if not 0.8 <= clock.ms("a", "b") / wall_ms <= 1.05:
        raise AssertionError(f"CUDA events timed {clock.ms('a', 'b'):.2f} ms where the wall clock saw {wall_ms:.2f} ms")
    # the allocator's peak must see a known allocation and forget it after a reset
    del a
    memory = PeakMemory(device)
    memory.reset()
    base = torch.cuda.memory_allocated(device)
    block = torch.empty(2**30, dtype=torch.uint8, device=device)
    peak = memory.read()
    del block
    memory.reset()
    after = memory.read()
    figures.update(peak_with_1gib=peak - base, peak_after_reset=after - base)
    if peak - base < 2**30 or after - base >= 2**30:
        raise AssertionError(f"max_memory_allocated saw {peak - base} bytes for a 1 GiB block, {after - base} after reset")
    for dtype in (torch.float16, torch.bfloat16):
        figures[f"{str(dtype).removeprefix('torch.')}_matmul_tflops"] = matmul_tflops(device, dtype)
    # the engine end to end on the GPU, in fp16
    attention = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    figures["attn_implementation"] = attention
    model, processor = load_pretrained(TINY, torch.float16, device, attention)
    engine = Engine(model, processor)
    request = Request(turns=[("Is there a red circle?", None)], images=[sample_images()["astronaut"]])
    try:
        for budget, expected in (("full", 576), ("64", 64)):
            engine.set_reducer(MethodSpec.parse("none" if budget == "full" else "visionzip").build(budget))
            metrics = engine.generate([request], Generation(max_new_tokens=4))[0].metrics
            if metrics["visual_tokens"] != expected or metrics["peak_memory_kind"] != "cuda_max_allocated":
                raise AssertionError(f"engine at {budget}: {metrics['visual_tokens']} visual tokens, memory "
                                     f"{metrics['peak_memory_kind']}")
            figures[f"engine_{budget}"] = {k: metrics[k] for k in ("visual_tokens", "vision_ms", "prefill_ms",
                                                                    "ttft_ms", "peak_memory_bytes")}
    finally:
        engine.close()
    return figures


def step_parity(ctx: Context) -> dict:
    from visionzip_eval.loading import load_pretrained
    from visionzip_eval.methods import get_method
    from visionzip_eval.testing import sample_images

    _need_cuda(ctx)
    name = ctx.weights or TINY
    model, processor = load_pretrained(name, torch.float16, ctx.device)
    photos = sample_images()
    pixels = processor.image_processor(images=list(photos.values()), return_tensors="pt")["pixel_values"].to(ctx.device)
    figures = dict(model=name, images=len(photos), real_weights=ctx.weights is not None)
    half = {precision: get_method("visionzip", "54+10", selection_precision=precision).select(
        model, pixels.half()).dominant_index for precision in ("float32", "reference")}
    model.float()  # the same weights in float32 arithmetic; one copy on the GPU at a time
    reference = get_method("visionzip", "54+10").select(model, pixels.float()).dominant_index
    for precision, ours in half.items():
        shared = [len(set(a.tolist()) & set(b.tolist())) / a.numel() for a, b in zip(ours, reference)]
        figures[f"fp16_{precision}_overlap_with_fp32"] = dict(mean=sum(shared) / len(shared), min=min(shared))
    worst = figures["fp16_float32_overlap_with_fp32"]["min"]
    if worst < 0.9:  # a few boundary ties may flip in fp16; a tenth of the dominant set may not
        raise AssertionError(f"fp16 keeps only {worst:.0%} of float32's dominant tokens on one photo")
    return figures


def step_realsize(ctx: Context) -> dict:
    from visionzip_eval.bench import bench_realsize, format_realsize

    _need_cuda(ctx)
    figures = {}
    tables = []
    for dtype in ("float16", "bfloat16"):
        rows, info = bench_realsize(dtype=dtype, device=str(ctx.device), repeats=3, max_minutes=3,
                                    progress=ctx.progress)
        tables.append(format_realsize(rows, info))
        figures[dtype] = dict(run=info, rows=rows)
        torch.cuda.empty_cache()
    (ctx.output_dir / "realsize.md").write_text("\n\n".join(tables) + "\n", encoding="utf-8")
    return figures


def accuracy_config(ctx: Context) -> dict:
    """The sweep: configs/ci_gpu.yaml with real weights, the tiny trained model on the synthetic
    MME and POPE otherwise; full and VisionZip 64, ``limit`` samples each."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "ci_gpu.yaml").read_text(encoding="utf-8"))
    if ctx.weights is None:
        config["models"] = [dict(name="tiny-llava-synth", pretrained=TINY, dtype="float32", attn_implementation="sdpa")]
        config["tasks"] = ["visionzip_synth_mme", "visionzip_synth_pope"]
        config["include_path"] = str(REPO / "tasks")
        config["lmms_eval"]["gen_kwargs"] = "max_new_tokens=4"
    config.update(limit=ctx.limit, output_dir=str(ctx.output_dir / "accuracy"))
    config["executor"]["devices"] = ["0" if ctx.device.type == "cuda" else "cpu"]
    if ctx.weights is None and ctx.device.type == "cuda":
        config["models"][0]["dtype"] = "float16"
    return config


def step_accuracy(ctx: Context) -> dict:
    import yaml

    from visionzip_eval.cli import main
    from visionzip_eval.report.regress import write_baseline

    if importlib.util.find_spec("lmms_eval") is None:
        raise Skip("lmms-eval is not installed: pip install -e . first")
    config = accuracy_config(ctx)
    path = ctx.output_dir / "accuracy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    if main(["sweep", str(path), "--quiet"]) != 0:
        raise AssertionError(f"the sweep had failed runs: see {config['output_dir']}")
    candidate = ctx.output_dir / "gpu_ci.candidate.json"
    shutil.copy(REPO / "baselines" / "gpu_ci.json", candidate)  # keeps the GPU tolerances
    baseline = write_baseline(config["output_dir"], candidate)
    return dict(model=config["models"][0]["pretrained"], tasks=config["tasks"], limit=ctx.limit,
                candidate=str(candidate), runs={key: {k: v for k, v in values.items() if "score" in k or "acc" in k
                                                      or k in ("visual_tokens", "prefill_ms_median")}
                                                for key, values in baseline["runs"].items()})


def step_serve(ctx: Context) -> dict:
    from visionzip_eval.serving.bench import bench_serve, format_serve
    from visionzip_eval.serving.served import vllm_unavailable

    _need_cuda(ctx)
    if reason := vllm_unavailable():
        raise Skip(reason)
    rows, info = bench_serve(TINY, methods=("visionzip", "divprune"), budgets=("full", 64), concurrency=(1, 8),
                             requests=8, progress=ctx.progress)
    (ctx.output_dir / "serve.md").write_text(format_serve(rows, info) + "\n", encoding="utf-8")
    return dict(run=info, rows=rows)


STEPS: dict[str, Callable[[Context], dict]] = dict(cuda=step_cuda, parity=step_parity, realsize=step_realsize,
                                                   accuracy=step_accuracy, serve=step_serve)


# -- driver --------------------------------------------------------------------------------------


def summary(steps: list[Step], ctx: Context, started: float) -> str:
    weights = (f"LLaVA-1.5-7B weights found in the cache ({ctx.weights})" if ctx.weights else
               "LLaVA-1.5-7B weights NOT in the cache: parity and accuracy ran on the tiny trained model")
    lines = [f"# GPU check: {ctx.device}", "", f"- {weights}", f"- {time.time() - started:.0f} s so far", "",
             "| step | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail.splitlines()[0] if s.detail else ''} |"
              for s in steps]
    for s in steps:
        if s.figures:
            lines += ["", f"## {s.name}", "", "```json", json.dumps(s.figures, indent=1, default=str)[:6000], "```"]
    return "\n".join(lines) + "\n"


def run_checks(output_dir: str | Path, steps: list[str] | None = None, device: str | None = None,
               limit: int = 200, budget_s: float = 570.0, progress: Callable[[str], None] = print) -> int:
    """Run the steps, write ``summary.md`` and ``gpu_check.json`` after each; 0 when none failed
    and at least one passed, 1 when one failed, 2 when nothing could be checked."""
    names = steps or list(STEPS)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}: choose from {', '.join(STEPS)}")
    if not (isinstance(limit, int) and limit >= 2 and limit % 2 == 0):
        raise ValueError(f"--limit must be a positive even number (MME scores its questions in pairs), got {limit!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    ctx = Context(output_dir, torch.device(device or ("cuda" if cuda else "cpu")), cached_weights(), limit, progress)
    started = time.time()
    results = [Step(name) for name in names]
    for step in results:
        left = budget_s - (time.time() - started)
        progress(f"== {step.name} ({left:.0f} s left)")
        begin = time.time()
        try:
            if left < 30:
                raise Skip(f"out of time ({budget_s:.0f} s budget)")
            step.figures = STEPS[step.name](ctx)
            step.status = "passed"
        except Skip as reason:
            step.status, step.detail = "skipped", str(reason)
        except Exception as error:  # noqa: BLE001 - one step failing never stops the next
            step.status, step.detail = "failed", f"{type(error).__name__}: {error}"
            (output_dir / f"{step.name}.traceback.txt").write_text(traceback.format_exc(), encoding="utf-8")
        step.seconds = time.time() - begin
        progress(f"   {step.status} in {step.seconds:.1f} s {step.detail}")
        (output_dir / "summary.md").write_text(summary(results, ctx, started), encoding="utf-8")
        (output_dir / "gpu_check.json").write_text(
            json.dumps(dict(device=str(ctx.device), weights=ctx.weights, steps=[asdict(s) for s in results]),
                       indent=1, default=str), encoding="utf-8")
    statuses = {s.status for s in results}
    return 1 if "failed" in statuses else 0 if "passed" in statuses else 2


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description="Check the CUDA-only paths on a machine with one GPU (about 10 minutes): CUDA-event timing, "
        "the allocator's peak, fp16/bf16, flash attention or SDPA, fp16 selection parity, bench realsize, and an "
        "MME + POPE sweep at full and 64 tokens with a baselines/gpu_ci.json candidate. Writes OUTPUT/summary.md.")
    parser.add_argument("--output-dir", default="results/gpu_check", help="where the summary and results go")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), help="a subset of the steps (default: all)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present; on a CPU only the accuracy "
                        "step runs, on the tiny model)")
    parser.add_argument("--limit", type=int, default=200, help="samples per task in the accuracy step (default 200)")
    parser.add_argument("--budget-s", type=float, default=570.0, help="skip steps once this much time is spent")
    args = parser.parse_args(argv)
    try:
        code = run_checks(args.output_dir, args.steps, args.device, args.limit, args.budget_s)
    except ValueError as error:
        print(f"gpu_check: error: {error}")
        return 2
    print(f"summary: {Path(args.output_dir) / 'summary.md'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
