"""Does VisionZip's prefill saving on Qwen2.5-VL survive FlashAttention?

Times the LLM prefill (the decoder's forward over the whole prompt) of one image prompt with
the full image (t*h*w/4 merged tokens) and with VisionZip at a few budgets, under each
attention implementation, on random weights (timing does not depend on the weights):

- on CUDA: Qwen2.5-VL-7B widths (ViT 1280 x 32 blocks, full attention in 7/15/23/31; LLM 3584 x
  28 layers, 28 heads, 4 KV heads; the MLP widths of ``build_tiny_qwen2_5_vl``), bfloat16,
  ``sdpa`` and ``flash_attention_2`` (skipped with a message when flash-attn is not installed);
  or a real checkpoint when ``QWEN_VL_CHECKPOINT`` names one (hub id or local folder);
- on CPU: a small random model (ViT 128 x 8, LLM 512 x 8 layers), float32, ``sdpa`` only.

No command line: ``python scripts/bench_qwen_prefill.py`` prints one row per implementation and
budget (median milliseconds over REPEATS; CUDA events on GPU, perf_counter on CPU) and the
speed-up over the full image; ``bench_qwen_prefill()`` returns the rows. Environment overrides:
``QWEN_VL_CHECKPOINT``, ``BENCH_IMAGE_SIZE`` (default 1344x1008 px -> 96x72 patches -> 1728
merged tokens), ``BENCH_REPEATS`` (5).
"""

from __future__ import annotations

import os
import statistics

import torch
from PIL import Image

from visionzip_eval import NoReduction, VisionZip, visionzip_processor
from visionzip_eval.profiling import DecoderShape, StageClock, prefill_flops
from visionzip_eval.backends.qwen2_5_vl import build_tiny_qwen2_5_vl
from visionzip_eval.testing import sample_images

BUDGETS = ("full", "54+10", "108+20", "216+40")
WARMUP = 3  # untimed forwards per budget: with 1, the first budget measured ran ~10x slow on CPU
GPU_SIZES = dict(vision_hidden=1280, vision_depth=32, vision_heads=16, fullatt_block_indexes=(7, 15, 23, 31),
                 text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4)
CPU_SIZES = dict(vision_hidden=128, vision_depth=8, vision_heads=4, fullatt_block_indexes=(3, 7),
                 text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=2)


def flash_attention_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return bool(torch.cuda.is_available() and is_flash_attn_2_available())


def _build(attn_implementation: str, device: torch.device, image_pixels: int):
    checkpoint = os.environ.get("QWEN_VL_CHECKPOINT")
    if checkpoint:
        from visionzip_eval.loading import load_pretrained

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, processor = load_pretrained(checkpoint, dtype, device, attn_implementation)
        processor.image_processor.max_pixels = max(processor.image_processor.max_pixels or 0, image_pixels)
        processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": image_pixels}
        return model, processor
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    with torch.device(device):
        model, processor = build_tiny_qwen2_5_vl(
            seed=0, attn_implementation=attn_implementation, max_pixels=image_pixels, **sizes
        )
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    return model.eval(), processor


def _prefill_ms(model, processor, image, reducer, repeats: int, device) -> dict:
    core = model.model
    with reducer(model):
        visionzip_processor(processor, model)
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
            add_generation_prompt=True,
        )
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        clock_box: list[StageClock] = []

        def mark(name):
            return lambda *args: clock_box[-1].mark(name)

        hooks = [
            core.visual.register_forward_pre_hook(mark("vision_start")),
            core.visual.merger.mlp.register_forward_hook(mark("vision_end")),
            core.language_model.register_forward_pre_hook(mark("prefill_start")),
            core.language_model.register_forward_hook(mark("prefill_end")),
        ]
        vision, prefill = [], []
        try:
            with torch.inference_mode():
                for i in range(repeats + WARMUP):  # the first runs warm up (allocator, kernels)
                    clock_box.append(StageClock(device))
                    core.rope_deltas = None
                    core(**inputs, use_cache=True)
                    clock_box[-1].finish()
                    if i >= WARMUP:
                        vision.append(clock_box[-1].ms("vision_start", "vision_end"))
                        prefill.append(clock_box[-1].ms("prefill_start", "prefill_end"))
        finally:
            for hook in hooks:
                hook.remove()
        visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    visionzip_processor(processor, model)
    return dict(
        visual_tokens=visual,
        prompt_tokens=int(inputs["input_ids"].shape[1]),
        vision_ms=statistics.median(vision),
        prefill_ms=statistics.median(prefill),
    )


def bench_qwen_prefill(
    budgets=BUDGETS, image_size: tuple[int, int] | None = None, repeats: int | None = None, progress=print
) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if image_size is None:
        w, h = os.environ.get("BENCH_IMAGE_SIZE", "1344x1008").split("x")
        image_size = (int(w), int(h))
    repeats = repeats or int(os.environ.get("BENCH_REPEATS", "5"))
    image = sample_images()["astronaut"].resize(image_size, Image.BICUBIC)
    pixels = image_size[0] * image_size[1]
    implementations = ["sdpa"]
    if device.type == "cuda":
        if flash_attention_available():
            implementations.append("flash_attention_2")
        else:
            progress("flash_attention_2: skipped, flash-attn is not installed (pip install flash-attn); sdpa only")
    else:
        progress("CPU: sdpa only, small random model (flash_attention_2 needs a CUDA GPU)")
    rows = []
    for implementation in implementations:
        model, processor = _build(implementation, device, pixels)
        full_ms = full_flops = None
        for budget in budgets:
            reducer = NoReduction() if budget == "full" else VisionZip(*map(int, budget.split("+")))
            row = dict(device=str(device), attn_implementation=implementation, budget=budget,
                       **_prefill_ms(model, processor, image, reducer, repeats, device))
            full_ms = row["prefill_ms"] if budget == "full" else full_ms
            row["prefill_speedup"] = (full_ms / row["prefill_ms"]) if full_ms else None
            flops = prefill_flops(DecoderShape.from_config(model.config.text_config), row["prompt_tokens"])
            full_flops = flops if budget == "full" else full_flops
            row["flops_ratio"] = full_flops / flops  # the speed-up the FLOPs predict
            rows.append(row)
            progress(
                f"{implementation:18s} {budget:>7s}: {row['visual_tokens']:5d} visual / {row['prompt_tokens']:5d} prompt "
                f"tokens, vision {row['vision_ms']:8.1f} ms, prefill {row['prefill_ms']:8.1f} ms"
                + f" ({row['prefill_speedup']:.2f}x; FLOPs predict {row['flops_ratio']:.2f}x)"
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    bench_qwen_prefill()
