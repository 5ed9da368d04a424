"""``pretrained=`` strings to (model, processor): hub ids, local folders, ``builtin:*``.

Each backend declares what it loads (``VLMBackend.model_types`` / ``claims``, ``load``) and its
tiny offline models (``VLMBackend.builtin``: name -> builder in the backend's module); the one
trained tiny model (``builtin:tiny-llava-synth``) ships with ``visionzip_eval.synth``. This
module only dispatches, so the backends import nothing above themselves. The device and dtype
names every command and the adapter accept are resolved here, once.
"""

from __future__ import annotations

from typing import Callable

import torch

from visionzip_eval.backends import BACKENDS, VLMBackend

BUILTIN_PREFIX = "builtin:"
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / ``auto``: the GPU when torch sees one, else the CPU; ``"1"``: ``cuda:1``; a
    CUDA device on a machine without one is an error now, not at the first tensor moved."""
    if isinstance(device, torch.device):
        resolved = device
    elif device in (None, "auto"):
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        resolved = torch.device(f"cuda:{device}" if str(device).isdigit() else str(device))
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU: use the CPU "
                         "(device auto or cpu)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, prefer_bfloat16: bool = False) -> torch.dtype:
    """``auto`` / None: half precision on a GPU (bfloat16 with ``prefer_bfloat16`` where the GPU
    has it: training), float32 on the CPU (whose half-precision matmul crawls); else a name of
    :data:`DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if prefer_bfloat16 and torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float16, bfloat16 or float32")
    return DTYPES[dtype]


def builtin_models() -> dict[str, tuple[type[VLMBackend], Callable]]:
    """``builtin:*`` name -> (backend, builder: (attn_implementation=...) -> (model, processor))."""
    from visionzip_eval.backends.llava_hf import LlavaHFBackend
    from visionzip_eval.synth.weights import BUILTIN_NAME as SYNTH, load_trained

    models = {name: (cls, builder) for cls in BACKENDS for name, builder in cls.builtin.items()}
    models[SYNTH] = (LlavaHFBackend, load_trained)  # trained on the synthetic benchmark
    return models


def load_pretrained(pretrained: str, dtype, device, attn_implementation: str | None = None):
    """Load a supported checkpoint: (model, processor) on ``device`` in ``dtype``.

    ``builtin:tiny-llava`` (``-next``, ``-onevision``, ``-original``, ``builtin:tiny-qwen2.5-vl``)
    builds a tiny random-weight model in memory (offline, seed 0); ``builtin:tiny-llava-synth``
    loads the tiny LLaVA trained on the synthetic benchmark, whose weights ship in the package.
    Anything else is a hub id or a folder, dispatched on its config.
    """
    pretrained = str(pretrained)
    if pretrained.startswith(BUILTIN_PREFIX):
        builtins = builtin_models()
        if pretrained not in builtins:
            raise ValueError(f"unknown builtin model {pretrained!r}: choose one of {', '.join(sorted(builtins))}")
        build = builtins[pretrained][1]
        model, processor = build(attn_implementation=attn_implementation or "sdpa")
        return model.to(device=device, dtype=dtype), processor
    backend = backend_for_checkpoint(pretrained)
    return backend.load(pretrained, dtype, device, attn_implementation)


def backend_for_checkpoint(pretrained: str) -> type[VLMBackend]:
    """The backend whose ``claims`` accepts the checkpoint's raw config.json."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(pretrained)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot load the config of {pretrained!r}: give a local checkpoint folder or a hub id "
            f"reachable from this machine ({type(error).__name__})"
        ) from error
    for cls in sorted(BACKENDS, key=lambda c: c.claim_order):
        if cls.claims(config):
            return cls
    supported = sorted({t for cls in BACKENDS for t in cls.model_types})
    raise ValueError(
        f"{pretrained!r} is a {config.get('model_type')!r} model; supported model types: {', '.join(supported)}"
    )
