"""Where the trained tiny reference VLM ships, and loading it offline."""

from __future__ import annotations

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent / "tiny-llava-synth"
BUILTIN_NAME = "builtin:tiny-llava-synth"


def load_trained(directory: str | Path | None = None, attn_implementation: str = "sdpa"):
    """(model, processor) of the trained tiny LLaVA, CPU, float32, eval mode, offline."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    directory = Path(directory or SHIPPED_DIR)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained tiny model at {directory}: reinstall visionzip-eval, or train it with "
            "`python scripts/train_tiny_vlm.py`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(directory)
    return model.eval(), processor
