import os

import pytest
import torch

# Tests never touch the network: hub look-ups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny():
    """A tiny random LLaVA (SDPA) and its processor; tests must not leave VisionZip applied."""
    from visionzip_eval.backends.llava_hf import build_tiny_llava

    return build_tiny_llava(seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def tiny_eager():
    from visionzip_eval.backends.llava_hf import build_tiny_llava

    return build_tiny_llava(seed=0, attn_implementation="eager")


@pytest.fixture(scope="session")
def pixel_values(tiny):
    from visionzip_eval.testing import sample_images

    _, processor = tiny
    images = list(sample_images().values())[:3]
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]
