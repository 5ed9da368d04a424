"""Per-request measurement: stage timing, peak memory, FLOPs.

Timing marks are CUDA events on a GPU (recorded in stream order, read after one
synchronisation at the end of the request) and ``time.perf_counter`` on the CPU, where work
is synchronous. Peak memory is ``torch.cuda.max_memory_allocated`` after a reset on CUDA, and
the process's peak resident set size on the CPU (a process-lifetime maximum, labelled so,
never presented as per-request). FLOPs come from the model config, 2 per multiply-accumulate.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch


class StageClock:
    """Named time marks for one request; ``ms(a, b)`` after ``finish()``."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._marks: dict[str, object] = {}
        self._finished = False

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self._marks[name] = event
        else:
            self._marks[name] = time.perf_counter()

    def mark_once(self, name: str) -> None:
        if name not in self._marks:
            self.mark(name)

    def has(self, name: str) -> bool:
        return name in self._marks

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._finished = True

    def ms(self, start: str, end: str) -> float | None:
        """Milliseconds between two marks; None if either was never reached."""
        if not self._finished:
            raise RuntimeError("call finish() before reading times")
        if start not in self._marks or end not in self._marks:
            return None
        a, b = self._marks[start], self._marks[end]
        if self.cuda:
            return float(a.elapsed_time(b))
        return (b - a) * 1e3


class PeakMemory:
    """Peak memory over a request: CUDA allocator peak, or the CPU process's peak RSS."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.cuda else "process_peak_rss"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> int | None:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        except (AttributeError, OSError):  # pragma: no cover - non-POSIX
            return None
        return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


# -- FLOPs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderShape:
    """What the FLOPs of a Llama-style decoder depend on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
        )


def prefill_flops(shape: DecoderShape, tokens: int, logits_tokens: int = 1) -> int:
    """FLOPs of one prefill over ``tokens`` positions, no cache.

    Per layer, in multiply-accumulates: q and o projections ``n*d*h*hd`` each, k and v
    ``n*d*kv*hd`` each (grouped-query attention), scores ``QK^T`` and ``AV`` ``n*n*h*hd`` each
    (the dense quadratic term, causal masking not discounted), SwiGLU MLP ``3*n*d*m``.
    Plus the LM head over ``logits_tokens`` positions (generate computes only the last).
    Norms, rotary embeddings and softmax are lower order and left out. FLOPs = 2 x MACs.
    """
    n, s = tokens, shape
    projections = n * s.hidden * s.head_dim * (2 * s.heads + 2 * s.kv_heads)
    attention = 2 * n * n * s.heads * s.head_dim
    mlp = 3 * n * s.hidden * s.intermediate
    head = logits_tokens * s.hidden * s.vocab
    return 2 * (s.layers * (projections + attention + mlp) + head)


def decode_step_flops(shape: DecoderShape, context: int) -> int:
    """FLOPs of generating one token with a KV cache of ``context`` positions."""
    s = shape
    projections = s.hidden * s.head_dim * (2 * s.heads + 2 * s.kv_heads)
    attention = 2 * (context + 1) * s.heads * s.head_dim
    mlp = 3 * s.hidden * s.intermediate
    return 2 * (s.layers * (projections + attention + mlp) + s.hidden * s.vocab)


def vit_flops(
    vision_config,
    layers_run: int,
    projector_in: int,
    projector_out: int,
    tokens_out: int,
    cls_token: bool = True,
) -> int:
    """FLOPs of a ViT tower run through ``layers_run`` layers, plus a 2-layer MLP projector.

    Patch embedding ``P*(3*p*p)*D``; per layer ``4*N*D*D`` (q, k, v, o), ``2*N*N*D``
    (scores and AV) and ``2*N*D*M`` (fc1, fc2) with ``N = P + 1`` (CLS) or ``P`` (no CLS,
    SigLIP); projector ``K*(Din*Dout + Dout*Dout)`` over the ``tokens_out`` rows the LLM
    receives. FLOPs = 2 x MACs.
    """
    patch = vision_config.patch_size
    patches = (vision_config.image_size // patch) ** 2
    tokens = patches + 1 if cls_token else patches
    d, m = vision_config.hidden_size, vision_config.intermediate_size
    embed = patches * 3 * patch * patch * d
    layer = 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * m
    projector = tokens_out * (projector_in * projector_out + projector_out * projector_out)
    return 2 * (embed + layers_run * layer + projector)
