"""Model families. Each module knows one family: where its vision tower is, which layer the
LLM reads, how to capture that layer's signals, and how the LLM receives the image tokens.

Add a family by writing a module with a ``VLMBackend`` subclass decorated with
``@register_backend`` and importing it below.
"""

from visionzip_eval.backends.base import (
    BACKENDS,
    TowerSignals,
    VLMBackend,
    backend_for,
    register_backend,
)
from visionzip_eval.backends import llava_hf  # noqa: F401  (registers itself)
from visionzip_eval.backends import llava_next  # noqa: F401  (registers itself)
from visionzip_eval.backends import llava_onevision  # noqa: F401  (registers itself)
from visionzip_eval.backends import llava_original  # noqa: F401  (registers itself; matches only with llava installed)
from visionzip_eval.backends import qwen2_5_vl  # noqa: F401  (registers itself)
from visionzip_eval.synth.weights import BUILTIN_NAME


BUILTIN_TINY = "builtin:tiny-llava"
BUILTIN_TRAINED = BUILTIN_NAME  # the tiny model trained on the synthetic benchmark (visionzip_eval.synth)
# builtin name -> builder in visionzip_eval.testing
BUILTIN_TINY_MODELS = {
    BUILTIN_TINY: "build_tiny_llava",
    "builtin:tiny-llava-next": "build_tiny_llava_next",
    "builtin:tiny-llava-onevision": "build_tiny_llava_onevision",
    "builtin:tiny-llava-original": "build_tiny_llava_original",
    "builtin:tiny-qwen2.5-vl": "build_tiny_qwen2_5_vl",
}


def load_pretrained(pretrained: str, dtype, device, attn_implementation: str | None = None):
    """Load a supported checkpoint by its config's ``model_type``: (model, processor).

    ``builtin:tiny-llava`` (``-next``, ``-onevision``, ...) builds the tiny random-weight LLaVA-1.5
    (LLaVA-NeXT, LLaVA-OneVision, ...) of ``visionzip_eval.testing`` in memory (offline, seed 0);
    ``builtin:tiny-llava-synth`` loads the tiny LLaVA trained on the synthetic benchmark, whose
    weights ship in the package (``visionzip_eval/synth/tiny-llava-synth``).
    """
    from transformers import AutoConfig

    if pretrained == BUILTIN_TRAINED:
        from visionzip_eval.synth.weights import load_trained

        model, processor = load_trained(attn_implementation=attn_implementation or "sdpa")
        return model.to(device=device, dtype=dtype), processor
    if pretrained in BUILTIN_TINY_MODELS:
        from visionzip_eval import testing

        build = getattr(testing, BUILTIN_TINY_MODELS[pretrained])
        model, processor = build(seed=0, attn_implementation=attn_implementation or "sdpa")
        return model.to(device=device, dtype=dtype), processor

    if _is_original_llava(pretrained):  # the llava package's checkpoints (liuhaotian/llava-v1.5-*)
        return llava_original.load_pretrained(pretrained, dtype, device, attn_implementation)
    try:
        config = AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot load the config of {pretrained!r}: give a local checkpoint folder or a hub id "
            f"reachable from this machine ({type(error).__name__})"
        ) from error
    loaders = {
        "llava": llava_hf.load_pretrained,
        "llava_next": llava_next.load_pretrained,
        "llava_onevision": llava_onevision.load_pretrained,
        "qwen2_5_vl": qwen2_5_vl.load_pretrained,
    }
    if config.model_type not in loaders:
        raise ValueError(
            f"{pretrained!r} is a {config.model_type!r} model; supported model types: {', '.join(loaders)}"
        )
    return loaders[config.model_type](pretrained, dtype, device, attn_implementation)


def _is_original_llava(pretrained: str) -> bool:
    """An original-LLaVA checkpoint (``model_type`` ``llava_llama``, or ``mm_vision_tower`` in
    its config.json), read raw: AutoConfig knows ``llava_llama`` only once llava is imported."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(pretrained)
    except (OSError, ValueError):
        return False  # AutoConfig below reports it
    return llava_original.is_original_llava_config(config)


__all__ = ["BACKENDS", "TowerSignals", "VLMBackend", "backend_for", "load_pretrained", "register_backend"]
