"""What a token reduction saves in training: ``visionzip-eval bench train``.

One training step (forward + backward, no optimizer update) of the CPU proxy VLM of ``bench
prefill`` (CLIP-L tower, 8-layer 1024-wide Llama, random weights) at each budget, training the
projector alone or everything, on the batch ``tune`` would build (:mod:`.data`: chat template,
reply labels, placeholders expanded to the budget) with the reduction applied by the
evaluation's hooks. Configurations run round-robin (one step each per round, after a warm-up
round), so drift in machine load hits all alike; times are medians with the min-max spread.

Memory: the bytes autograd keeps for backward (every tensor saved by the forward that is not a
parameter, each storage counted once: ``torch.autograd.graph.saved_tensors_hooks``), measured
on any device; on a GPU also the CUDA allocator's peak over the step.

FLOPs (2 per multiply-accumulate, from the configs; ``profiling.prefill_flops`` /
``vit_flops``): a backward pass costs twice its forward when it computes the gradients of both
the weights and the inputs, once when only the inputs' (frozen weights on the path to a
trained part), and nothing for a module no gradient passes through. So, with ``T`` the tower up
to layer L, ``P`` the projector over the kept tokens, ``Ll`` the LLM's weight matmuls and ``La``
its attention score and value products (both operands activations: always twice in backward):

- ``all``: ``3 (T + P + Ll + La)``
- ``projector``: ``T + 3 P + 2 Ll + 3 La`` (the tower runs forward only; the LLM passes input
  gradients back to the projector).
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

PARTS = ("projector", "all")
QUESTION = "<image>\nWhat is shown in this picture? Describe it in one sentence."
ANSWER = "An astronaut in a white suit stands beside a flag, with a spacecraft behind."


def step_flops(backend, shape, sequence: int, tokens_per_image: int, part: str) -> int:
    """Training FLOPs of one sample (see the module docstring for the formula)."""
    from visionzip_eval.profiling import prefill_flops

    config = backend.config
    vision = backend.vision_flops(tokens_per_image)
    d_in, d_out = config.vision_config.hidden_size, config.text_config.hidden_size
    projector = 2 * tokens_per_image * (d_in * d_out + d_out * d_out)
    tower = vision - projector
    llm = prefill_flops(shape, sequence, logits_tokens=sequence)  # the loss reads logits at every position
    attention = 2 * shape.layers * 2 * sequence * sequence * shape.heads * shape.head_dim
    matmuls = llm - attention
    if part == "all":
        return 3 * (tower + projector + llm)
    return tower + 3 * projector + 2 * matmuls + 3 * attention


class SavedBytes:
    """Bytes of the distinct non-parameter tensors autograd saves for backward while active."""

    def __init__(self, model: torch.nn.Module):
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def bench_train(
    budgets: tuple = ("full", 192, 128, 64),
    parts: tuple[str, ...] = PARTS,
    repeats: int = 2,
    batch: int = 1,
    tiny: bool = False,
    device: str | None = None,
    progress: Callable[[str], None] = print,
    realsize: bool = False,
) -> tuple[list[dict], dict]:
    """Rows (part x budget: step time median/min/max, measured and FLOPs-predicted speed-up,
    saved-for-backward bytes, CUDA peak) and the run's facts (device, model sizes, formula).
    ``realsize``: LLaVA-1.5-7B's exact architecture (random weights; a GPU only) instead of the proxy."""
    from visionzip_eval.apply import remove_reduction
    from visionzip_eval.backends import backend_for
    from visionzip_eval.loading import resolve_device
    from visionzip_eval.profiling import DecoderShape
    from visionzip_eval.tuning.tune import freeze

    parsed = _check_train_options(budgets, parts, repeats, batch)
    device = resolve_device(device)
    cuda = device.type == "cuda"
    if realsize and not cuda:
        raise ValueError("--realsize trains LLaVA-1.5-7B's architecture: it needs a GPU (use the proxy on a CPU)")
    model, processor = _train_model(realsize, tiny, device)
    backend = backend_for(model)
    shape = DecoderShape.from_config(backend.config.text_config)
    reducers, inputs = _train_inputs(model, processor, backend, parsed, batch, device)

    configs = [(part, budget.label) for part in parts for budget in parsed]
    times: dict = {c: [] for c in configs}
    saved_bytes: dict = {}
    peaks: dict = {c: [] for c in configs}
    try:
        for index in range(repeats + 1):  # round 0 warms up and measures the saved bytes
            for part, label in configs:
                progress(f"round {index + 1}/{repeats + 1}: train {part} at {label}")
                freeze(model, backend, part)
                reducers[label].apply(model)
                seconds, saved, peak = _train_step(model, inputs[label], device, measure_saved=index == 0)
                if index == 0:
                    saved_bytes[(part, label)] = saved
                else:
                    times[(part, label)].append(seconds * 1e3)
                    if peak is not None:
                        peaks[(part, label)].append(peak)
    finally:
        remove_reduction(model)

    rows = []
    for part, label in configs:
        values = sorted(times[(part, label)])
        per_image = reducers[label].tokens_per_image(backend)
        sequence = inputs[label]["input_ids"].shape[1]
        rows.append(dict(
            train=part, budget=label, visual_tokens=per_image, sequence=sequence,
            step_ms=statistics.median(values), step_ms_min=values[0], step_ms_max=values[-1],
            train_gflops=batch * step_flops(backend, shape, sequence, per_image, part) / 1e9,
            saved_mib=saved_bytes[(part, label)] / 2**20,
            cuda_peak_mib=max(peaks[(part, label)]) / 2**20 if peaks[(part, label)] else None,
        ))
    _add_ratios(rows, parsed[0].label)
    info = dict(
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        threads=torch.get_num_threads(), batch=batch, repeats=repeats,
        model="LLaVA-1.5-7B architecture, random weights" if realsize else "tiny" if tiny
        else "proxy: CLIP-L/336 tower (24 layers, 1024 wide) + 8-layer 1024-wide Llama",
        precision="bfloat16 autocast, float32 weights" if cuda else "float32",
        memory="saved-for-backward bytes (torch.autograd.graph.saved_tensors_hooks, parameters excluded)"
        + ("; CUDA peak: torch.cuda.max_memory_allocated over the step, weights and gradients included" if cuda else ""),
    )
    return rows, info


def _check_train_options(budgets, parts, repeats, batch) -> list:
    """The budgets parsed (full first), after checking every option."""
    from visionzip_eval.budget import Budget
    from visionzip_eval.tuning.tune import TRAIN_PARTS

    unknown = [p for p in parts if p not in TRAIN_PARTS]
    if unknown:
        raise ValueError(f"unknown trained part {unknown[0]!r}: choose from {', '.join(TRAIN_PARTS)}")
    if not (isinstance(repeats, int) and repeats >= 1) or not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"--repeats and --batch must be integers >= 1, got {repeats!r} and {batch!r}")
    parsed = [Budget.parse(b) for b in budgets]
    if not parsed or not parsed[0].is_full:
        raise ValueError("list the budgets with full first: speed-ups are against it")
    return parsed


def _train_model(realsize: bool, tiny: bool, device: torch.device):
    """The model trained, in train mode on ``device``: LLaVA-1.5-7B's shape, the tiny model, or
    the proxy (CLIP-L tower + a small Llama)."""
    from visionzip_eval.backends import llava_hf
    from visionzip_eval.bench import CLIP_L, PROXY_LLM

    if realsize:
        model, processor = llava_hf.build_llava15_7b_shape(device=device)
    else:
        sizes = dict(vision_hidden=64, vision_layers=4, vision_heads=4, text_layers=4) if tiny else {**CLIP_L, **PROXY_LLM}
        model, processor = llava_hf.build_tiny_llava(seed=0, **sizes)
    model.to(device).train()
    return model, processor


def _train_inputs(model, processor, backend, budgets, batch: int, device: torch.device) -> tuple[dict, dict]:
    """Per budget label: the VisionZip reducer and a batch of one question + answer whose prompt
    holds that budget's visual tokens (labels on the answer only)."""
    from visionzip_eval.apply import tokens_per_image
    from visionzip_eval.methods import MethodSpec
    from visionzip_eval.testing import sample_images
    from visionzip_eval.tuning.data import encode_conversation

    pixels = processor.image_processor([sample_images()["astronaut"]] * batch, return_tensors="pt")["pixel_values"]
    reducers, inputs = {}, {}
    for budget in budgets:
        reducer = MethodSpec.parse("visionzip").build(budget)
        reducer.apply(model)
        ids, labels = encode_conversation(processor, ((QUESTION, ANSWER),), tokens_per_image(model),
                                          backend.image_token_id)
        reducers[budget.label] = reducer
        inputs[budget.label] = dict(
            input_ids=torch.tensor([ids] * batch, device=device), labels=torch.tensor([labels] * batch, device=device),
            attention_mask=torch.ones(batch, len(ids), dtype=torch.long, device=device), pixel_values=pixels.to(device))
    return reducers, inputs


def _train_step(model, inputs: dict, device: torch.device, measure_saved: bool) -> tuple[float, int | None, int | None]:
    """One forward + backward: (seconds, bytes saved for backward when ``measure_saved``, the
    CUDA peak or None on a CPU)."""
    from visionzip_eval.profiling import PeakMemory, StageClock

    cuda = device.type == "cuda"
    memory = PeakMemory(device)
    model.zero_grad(set_to_none=True)
    memory.reset()
    saved = SavedBytes(model)
    clock = StageClock(device)
    clock.mark("start")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        if measure_saved:
            with saved:
                loss = model(**inputs).loss
        else:
            loss = model(**inputs).loss
    loss.backward()
    clock.mark("end")
    clock.finish()
    peak = memory.read() if cuda else None  # a CPU's peak RSS only grows: not per step
    return clock.ms("start", "end") / 1e3, saved.total if measure_saved else None, peak


def _add_ratios(rows: list[dict], full_label: str) -> None:
    """Each row's speed-up (with its spread), FLOPs-predicted speed-up and memory ratio against
    the full-budget row of the same trained part."""
    for row in rows:
        full = next(r for r in rows if r["train"] == row["train"] and r["budget"] == full_label)
        row["speedup"] = full["step_ms"] / row["step_ms"]
        # the spread of the ratio: slowest full over fastest reduced, fastest full over slowest reduced
        row["speedup_min"] = full["step_ms_min"] / row["step_ms_max"]
        row["speedup_max"] = full["step_ms_max"] / row["step_ms_min"]
        row["flops_predicted_speedup"] = full["train_gflops"] / row["train_gflops"]
        row["memory_ratio"] = full["saved_mib"] / row["saved_mib"] if row["saved_mib"] else None


def format_train_rows(rows: list[dict], info: dict) -> str:
    cuda = any(r["cuda_peak_mib"] is not None for r in rows)
    header = ("| train | budget | visual tokens | sequence | step ms (min-max) | speed-up (min-max) | FLOPs-predicted "
              "| train GFLOPs | saved for backward MiB | memory ratio |" + (" CUDA peak MiB |" if cuda else ""))
    lines = [header, "|" + "---|" * (11 if cuda else 10)]
    for r in rows:
        line = (f"| {r['train']} | {r['budget']} | {r['visual_tokens']} | {r['sequence']} | {r['step_ms']:.0f} "
                f"({r['step_ms_min']:.0f}-{r['step_ms_max']:.0f}) | {r['speedup']:.2f}x ({r['speedup_min']:.2f}-"
                f"{r['speedup_max']:.2f}) | {r['flops_predicted_speedup']:.2f}x | {r['train_gflops']:.1f} "
                f"| {r['saved_mib']:.1f} | {r['memory_ratio']:.2f}x |")
        if cuda:
            line += f" {r['cuda_peak_mib']:.0f} |"
        lines.append(line)
    lines += [
        "",
        f"Device: {info['device']} ({info['threads']} threads), {info['precision']}; model: {info['model']}; "
        f"batch {info['batch']}, {info['repeats']} timed rounds after a warm-up, round-robin.",
        "One step = forward + loss + backward (no optimizer update). Speed-up and memory ratio: full / this budget, "
        "same trained part. FLOPs-predicted: all = 3 (T + P + Ll + La); projector = T + 3 P + 2 Ll + 3 La "
        "(T tower to layer L, P projector, Ll LLM weight matmuls + LM head, La LLM attention products).",
        f"Memory: {info['memory']}.",
    ]
    return "\n".join(lines)
