"""Frames vs. cost: video runs at several frame counts (the model's ``max_frames`` argument) and
budgets, measured on this machine beside the time two real 7B models would need on a GPU.

- **Measured** (the runs, on whatever machine ran them): visual tokens, prefill + vision TFLOPs
  and TTFT per request (medians over measured requests), per (frames, budget).
- **Predicted** (a model, not a measurement): the roofline TTFT (``roofline.request_bound``:
  tower + prefill + LM head, each max(FLOPs / peak, bytes / bandwidth)) in fp16 on an H100 SXM of
  LLaVA-1.5-7B (frames as images: 576 tokens each, the budget per frame under reduction) and of
  LLaVA-OneVision-7B (its own 2x2-pooled 196 tokens per frame and one newline; the budget per
  frame under reduction), at the same frames and budget, with the text tokens the runs measured.
  Batch 1 in eager PyTorch sits far above it on a fast GPU (the launch overhead of ~30 decoder
  layers: ``bench realsize``), so it says what the hardware allows, not what a run will see.

The seed's claim (VisionZip at 32 frames about twice as fast as the vanilla model at 16) is read
off both: each row's speed-up is against the full budget at 16 frames.
"""

from __future__ import annotations

import math
from functools import lru_cache

import pandas as pd

from visionzip_eval import roofline
from visionzip_eval.report.collect import Results, _stat
from visionzip_eval.report.tables import Column, TableBlock, _row_at_budget

PREDICTION_DEVICE = "NVIDIA H100 SXM"
REFERENCE_FRAMES = 16  # the claim's vanilla model: full budget at 16 frames
# name -> (tokens per frame at the full budget, extra rows per video at full (newlines))
REFERENCE_MODELS = {"LLaVA-1.5-7B": (576, 0), "LLaVA-OneVision-7B": (196, 1)}

FRAMES_COLUMNS = [
    Column("visual_tokens", "Visual tokens", "int"),
    Column("tflops", "TFLOPs (measured run)", "tflops"),
    Column("ttft_ms", "TTFT ms (measured)", "ms"),
    Column("ttft_speedup", "vs full@16 (measured)", "speedup", "max"),
] + [col for name in REFERENCE_MODELS for col in (
    Column(f"{name}_ms", f"{name} TTFT ms (predicted)", "ms_sig"),
    Column(f"{name}_speedup", f"vs full@16 ({name}, predicted)", "speedup", "max"),
)]


@lru_cache(maxsize=None)
def reference_model(name: str):
    """(ModelFacts in fp16 on the prediction device, the backend for its vision FLOPs), built on
    the meta device from the checkpoint's architecture (nothing allocated, no download)."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    from visionzip_eval.backends import backend_for
    from visionzip_eval.backends.llava_hf import llava15_7b_config
    from visionzip_eval.backends.llava_onevision import llava_onevision_7b_config

    model_class, config = {
        "LLaVA-1.5-7B": (LlavaForConditionalGeneration, llava15_7b_config),
        "LLaVA-OneVision-7B": (LlavaOnevisionForConditionalGeneration, llava_onevision_7b_config),
    }[name]
    with torch.device("meta"):
        model = model_class._from_config(config(), dtype=torch.float16)
    backend = backend_for(model)
    record = roofline.describe(backend, "cpu")
    record["accelerator"] = PREDICTION_DEVICE
    return roofline.ModelFacts.from_record(record), backend


def predicted_ttft_ms(name: str, frames: int, budget: str, text_tokens: float) -> float:
    """The roofline TTFT of one video question to ``name`` at ``frames`` and ``budget``."""
    from visionzip_eval.profiling import DecoderShape, prefill_flops

    facts, backend = reference_model(name)
    full_per_frame, newlines = REFERENCE_MODELS[name]
    per_frame = full_per_frame if budget == "full" else int(budget)
    visual = frames * per_frame + (newlines if budget == "full" else 0)
    prompt = int(round(text_tokens)) + visual
    shape = DecoderShape.from_config(backend.config.text_config)
    device = roofline.device_for(PREDICTION_DEVICE)
    bound = roofline.request_bound(facts, device, prefill_flops(shape, prompt), prompt,
                                   frames * backend.vision_flops(per_frame))
    return bound.ttft_ms


def frames_tables(results: Results) -> list[TableBlock]:
    """One table per checkpoint swept at two or more frame counts; none otherwise."""
    requests = results.requests
    if requests.empty or "frames" not in requests or requests["frames"].notna().sum() == 0:
        return []
    runs = results.runs.drop_duplicates("run_id").set_index("run_id")
    reqs = requests[requests["measured"] & requests["frames"].notna()].copy()
    reqs["pretrained"] = reqs["run_id"].map(runs["pretrained"])
    blocks = []
    for (pretrained, task), group in reqs.groupby(["pretrained", "task"], sort=True):
        if group["frames"].nunique() < 2:
            continue
        rows = []
        for (frames, method, budget), cell in group.groupby(["frames", "method", "budget"], sort=False):
            text = _stat(cell["prompt_tokens"] - cell["visual_tokens"], None)
            row = dict(
                frames=int(frames), method=method, budget=budget, group=f"{int(frames)} frames",
                label=_row_at_budget(dict(method=method, budget=budget, budget_total=cell["budget_total"].iloc[0])),
                source="measured",
                visual_tokens=_stat(cell["visual_tokens"], None),
                tflops=_stat(cell["prefill_flops"] + cell["vision_flops"], None) / 1e12,
                ttft_ms=_stat(cell["ttft_ms"], None), text_tokens=text,
            )
            for name in REFERENCE_MODELS:
                row[f"{name}_ms"] = predicted_ttft_ms(name, int(frames), budget, text)
            rows.append(row)
        frame = pd.DataFrame(rows)
        frame["_full"] = frame["budget"] == "full"
        frame = frame.sort_values(["frames", "_full"], ascending=[True, False]).drop(columns="_full")
        frame = frame.reset_index(drop=True)
        anchor = frame[(frame["frames"] == REFERENCE_FRAMES) & (frame["budget"] == "full")]
        for key, out in [("ttft_ms", "ttft_speedup")] + [(f"{n}_ms", f"{n}_speedup") for n in REFERENCE_MODELS]:
            frame[out] = float(anchor[key].iloc[0]) / frame[key] if len(anchor) else math.nan
        blocks.append(TableBlock(
            title=f"{pretrained}: frames vs. cost ({task})", frame=frame, columns=FRAMES_COLUMNS,
            notes=_notes(frame), csv_extra=["group", "frames", "method", "budget", "label"],
        ))
    return blocks


def _notes(frame: pd.DataFrame) -> list[str]:
    device = roofline.device_for(PREDICTION_DEVICE)
    notes = [
        "Measured: this sweep's runs on its own machine (medians over measured requests; TFLOPs: tower + "
        "prefill). Predicted: a roofline model, not a measurement: the lower bound on TTFT (tower + prefill + "
        f"LM head) in fp16 on {device.describe()}, batch 1, at the same frames and budget with the measured text "
        "tokens: LLaVA-1.5-7B takes frames as images (576 tokens each at full), LLaVA-OneVision-7B pools "
        "each frame to 196 tokens (+1 newline); under reduction each frame gets the budget. Eager batch-1 "
        "PyTorch runs well above this bound on a fast GPU (kernel launches: see bench realsize).",
    ]
    claim = frame[(frame["frames"] == 2 * REFERENCE_FRAMES) & (frame["budget"] != "full")]
    if len(claim):
        row = claim.iloc[0]
        parts = [f"measured {row['ttft_speedup']:.2f}×"] + [
            f"{name} predicted {row[f'{name}_speedup']:.2f}×" for name in REFERENCE_MODELS]
        notes.append(f"The seed's claim, {row['label']} at {2 * REFERENCE_FRAMES} frames against the full model at "
                     f"{REFERENCE_FRAMES} (about 2× faster): " + ", ".join(parts) + ".")
    return notes
