"""Folders vLLM can load: a checkpoint in the llava-hf key layout, or LLaVA-1.5-7B's shape.

vLLM's LLaVA loader expects the hub's llava-hf layout (``vision_tower.vision_model.*``); the
shipped tiny model (``builtin:tiny-llava-synth``), saved by transformers 5, stores
``vision_tower.*``. ``vllm_checkpoint`` writes a converted copy into a folder (a few MB for the
tiny model) and returns hub-layout checkpoints unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SERVABLE_BUILTIN = "builtin:tiny-llava-synth"
_TOWER = "vision_tower."
_INNER = "vision_model."


def llava_hf_key(key: str) -> str:
    """``key`` in the llava-hf layout: ``[model.]vision_tower.X`` -> ``[model.]vision_tower.vision_model.X``."""
    head, sep, rest = key.partition(_TOWER)
    if not sep or (head not in ("", "model.")) or rest.startswith(_INNER):
        return key
    return f"{head}{_TOWER}{_INNER}{rest}"


def source_folder(pretrained: str) -> Path:
    """The checkpoint folder behind ``pretrained`` (the shipped tiny model, or a local folder)."""
    from visionzip_eval.synth.weights import SHIPPED_DIR

    if pretrained == SERVABLE_BUILTIN:
        return SHIPPED_DIR
    if pretrained.startswith("builtin:"):
        raise ValueError(f"vLLM serves {SERVABLE_BUILTIN} or a checkpoint folder, not {pretrained!r} "
                         "(the other builtin models exist only in memory)")
    folder = Path(pretrained)
    if not (folder / "config.json").is_file():
        raise ValueError(f"vLLM needs a local checkpoint folder with config.json, got {pretrained!r}")
    return folder


def vllm_checkpoint(pretrained: str, directory: str | Path) -> Path:
    """A folder vLLM loads for ``pretrained``: the checkpoint itself when its keys are already in
    the llava-hf layout, else a copy with converted keys written under ``directory``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = source_folder(pretrained)
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{source} has no .safetensors weights: vLLM's loader is pointed at safetensors here")
    keys = [k for shard in shards for k in safe_open(str(shard), "pt").keys()]
    if all(llava_hf_key(k) == k for k in keys):
        return source
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not item.name.endswith(".index.json"):
            shutil.copy2(item, target / item.name)
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            tensors = {llava_hf_key(k): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(target / shard.name), metadata={"format": "pt"})
    index = source / "model.safetensors.index.json"
    if index.is_file():
        import json

        data = json.loads(index.read_text())
        data["weight_map"] = {llava_hf_key(k): v for k, v in data["weight_map"].items()}
        (target / index.name).write_text(json.dumps(data))
    return target


def shape_checkpoint(directory: str | Path, layers: int = 32) -> Path:
    """LLaVA-1.5-7B's config (``layers`` decoder layers) and the tiny tokenizer: what vLLM needs with
    ``load_format="dummy"`` (random weights, nothing read from disk)."""
    from visionzip_eval.backends.llava_hf import llava15_7b_config, tiny_processor

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    config = llava15_7b_config(layers)
    config.architectures = ["LlavaForConditionalGeneration"]  # without it vLLM does not pick its generate runner
    config.save_pretrained(target)
    tiny_processor().save_pretrained(target)
    return target
