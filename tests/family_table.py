"""One row per model family (as ``method_table.py`` is per method): its tiny builder, one request
in the family's own input format, what VisionZip(54, 10) does to that request's visual rows and
how feeding unreduced inputs to a reduced model is refused. ``test_families.py`` iterates these
rows (restore, placeholder counts) and fails when a family is registered without one, so a new
family is one module in ``visionzip_eval/backends/`` plus one row here."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from visionzip_eval.backends.llava_hf import LlavaHFBackend, build_tiny_llava
from visionzip_eval.backends.llava_next import LlavaNextBackend, build_tiny_llava_next
from visionzip_eval.backends.llava_onevision import LlavaOnevisionBackend, build_tiny_llava_onevision
from visionzip_eval.backends.llava_original import LlavaOriginalBackend
from visionzip_eval.backends.qwen2_5_vl import Qwen2_5_VLBackend, build_tiny_qwen2_5_vl
from visionzip_eval.testing import sample_images

LLAVA_PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
VIDEO = Path(__file__).resolve().parents[1] / "tasks/visionzip_smoke/data/videomme/data/vz_red_ball.mp4"

# A request: processor -> (args, kwargs) that both ``model(...)`` and ``model.generate(...)`` take.
Request = Callable[[object], tuple[tuple, dict]]


def frames(count=4, size=(320, 240)):
    photos = list(sample_images().values())
    return [photos[i % len(photos)].resize(size) for i in range(count)]


def onevision_prompt(images=1, videos=0):
    return f"<|im_start|>user {'<image>' * images}{'<video>' * videos}\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"


def qwen_prompt(processor, images=1, text="What is shown?"):
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def llava_request(image: str) -> Request:
    return lambda processor: ((), dict(processor(images=sample_images()[image], text=LLAVA_PROMPT, return_tensors="pt")))


def onevision_request(images: int, videos: int) -> Request:
    def request(processor):
        visuals = {}
        if images:
            visuals["images"] = [[sample_images()["coffee" if videos else "rocket"]]]
        if videos:
            visuals["videos"] = [frames(2)]
        return (), dict(processor(**visuals, text=[onevision_prompt(images, videos)], return_tensors="pt"))

    return request


def qwen_request(processor):
    image = sample_images()["astronaut"]  # 512 x 512 px -> 16 x 16 patches -> 64 merged tokens
    return (), dict(processor(images=[image], text=[qwen_prompt(processor)], return_tensors="pt", padding=True))


def build_original(seed=0, attn_implementation="sdpa"):
    from visionzip_eval.backends.llava_original import accept_cache_kwarg, build_tiny_llava_original

    model, processor = build_tiny_llava_original(seed=seed, attn_implementation=attn_implementation)
    return accept_cache_kwarg(model), processor  # transformers 5's `cache` keyword (changes no output)


def original_request(processor):
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nDescribe it.")
    conv.append_message(conv.roles[1], None)
    image = sample_images()["chelsea"]
    input_ids = tokenizer_image_token(conv.get_prompt(), processor.tokenizer, return_tensors="pt")[None]
    pixel_values = processor.image_processor([image])["pixel_values"]
    return (input_ids,), {"images": pixel_values, "image_sizes": [image.size]}


@dataclass(frozen=True)
class FamilyRow:
    backend: type
    build: Callable  # (seed=..., attn_implementation=...) -> (model, processor)
    request: Request  # one request with every kind of visual the family takes
    # the LLM's visual rows for ``request``: unreduced, and under VisionZip(*budget) once
    # visionzip_processor has told the processor the new count
    visual_rows: tuple[int, int]
    # requests with unreduced placeholder counts and what a model under VisionZip(*budget) says
    # about them; empty where the model splices features itself (the original llava code)
    placeholder_errors: tuple[tuple[Request, str], ...] = field(default=())
    needs: str | None = None  # a package the family needs (its rows are skipped without it)
    budget: tuple[int, int] = (54, 10)  # (dominant, contextual) of the VisionZip these rows assume


FAMILY_ROWS = [
    FamilyRow(LlavaHFBackend, build_tiny_llava, llava_request("coffee"), (576, 64),
              ((llava_request("rocket"), "576 image placeholder tokens.*visionzip_processor"),)),
    FamilyRow(LlavaNextBackend, build_tiny_llava_next, llava_request("coffee"), (2144, 5 * 64),
              ((llava_request("rocket"), "2144 image placeholder.*320.*visionzip_processor"),)),
    FamilyRow(LlavaOnevisionBackend, build_tiny_llava_onevision, onevision_request(1, 1), (2709 + 393, 5 * 64 + 2 * 64), (
        (onevision_request(1, 0), "2709 image placeholder.*320 .64 per crop, base image included.*visionzip_processor"),
        (onevision_request(0, 1), "393 video placeholder.*128 .64 per frame.*visionzip_processor"),
    )),
    FamilyRow(LlavaOriginalBackend, build_original, original_request, (576, 64), needs="llava"),
    FamilyRow(Qwen2_5_VLBackend, build_tiny_qwen2_5_vl, qwen_request, (64, 32),
              ((qwen_request, "visionzip_processor"),), budget=(27, 5)),
]
