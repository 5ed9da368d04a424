"""Per-request measurement: stage timing, peak memory, FLOPs.

Timing marks are CUDA events on a GPU (recorded in stream order, read after one
synchronisation at the end of the request) and ``time.perf_counter`` on the CPU, where work
is synchronous. Peak memory is ``torch.cuda.max_memory_allocated`` after a reset on CUDA, and
the process's peak resident set size on the CPU (a process-lifetime maximum, labelled so,
never presented as per-request). FLOPs come from the model config, 2 per multiply-accumulate.
"""

from __future__ import annotations

from typing import Callable, Sequence

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


def prefill_flops(
    shape: DecoderShape, tokens: int, logits_tokens: int = 1, tokens_per_layer: Sequence[int] | None = None
) -> int:
    """FLOPs of one prefill over ``tokens`` positions, no cache; ``tokens_per_layer``: the
    positions each layer processes where an in-LLM method removes tokens between layers.

    Per layer, in multiply-accumulates: q and o projections ``n*d*h*hd`` each, k and v
    ``n*d*kv*hd`` each (grouped-query attention), scores ``QK^T`` and ``AV`` ``n*n*h*hd`` each
    (the dense quadratic term, causal masking not discounted), SwiGLU MLP ``3*n*d*m``.
    Plus the LM head over ``logits_tokens`` positions (generate computes only the last).
    Norms, rotary embeddings and softmax are lower order and left out. FLOPs = 2 x MACs.
    """
    s = shape
    counts = list(tokens_per_layer) if tokens_per_layer is not None else [tokens] * s.layers
    if len(counts) != s.layers:
        raise ValueError(f"tokens_per_layer has {len(counts)} entries for {s.layers} layers")
    total = 0
    for n in counts:
        projections = n * s.hidden * s.head_dim * (2 * s.heads + 2 * s.kv_heads)
        attention = 2 * n * n * s.heads * s.head_dim
        mlp = 3 * n * s.hidden * s.intermediate
        total += projections + attention + mlp
    return 2 * (total + logits_tokens * s.hidden * s.vocab)


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


# -- how fast and how busy the machine is -------------------------------------------------------

PROBE_MATMUL = 256  # CPU: a 256 x 256 fp32 matmul (33 MFLOP, ~1 ms); CUDA: 4096 (137 GFLOP)
PROBE_COPY_BYTES = 16 * 2**20  # a 16 MiB copy (memory bandwidth)


def best_seconds(fn: Callable[[], object], device: torch.device | str, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` on ``device`` (the stage clock), after one
    untimed call: first-touch page faults and allocator warm-up are not machine speed, and the
    minimum is the stable estimator on a shared machine."""
    fn()
    times = []
    for _ in range(repeats):
        clock = StageClock(device)
        clock.mark("a")
        fn()
        clock.mark("b")
        clock.finish()
        times.append(clock.ms("a", "b") / 1e3)
    return max(min(times), 1e-9)


def machine_probe(device: torch.device | str = "cpu", repeats: int = 7) -> dict:
    """A snapshot of the machine's speed and load, taken before and after each run.

    Speed: a fixed matmul (GFLOP/s) and a fixed memory copy (GB/s), each the best of
    ``repeats`` (the minimum time is the stable estimator on a shared machine), ~15 ms in all
    on a CPU. Load: the 1-minute load average per core, and cumulative CPU seconds of the whole
    machine and of this process, from which ``other_cpu_share`` (other processes' share of the
    cores between two snapshots) is derived. On CUDA also the SM clock, temperature, utilisation
    and other processes on the GPU (when ``pynvml`` is installed).
    """
    import os

    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    size = 4096 if cuda else PROBE_MATMUL
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    source = torch.empty(PROBE_COPY_BYTES // 4, device=device)
    target = torch.empty_like(source)

    snapshot = {
        "time": time.time(),
        "matmul_gflops": 2 * size**3 / best_seconds(lambda: a @ b, device, repeats) / 1e9,
        "copy_gbs": 2 * PROBE_COPY_BYTES / best_seconds(lambda: target.copy_(source), device, repeats) / 1e9,
        "cores": os.cpu_count(),
    }
    try:
        snapshot["load_per_core"] = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # pragma: no cover - platforms without a load average
        pass
    try:
        import psutil

        times = psutil.cpu_times()
        own = psutil.Process().cpu_times()
        snapshot["system_busy_s"] = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        snapshot["own_cpu_s"] = own.user + own.system
    except ImportError:  # pragma: no cover - psutil ships with accelerate
        pass
    if cuda:
        snapshot.update(_gpu_state(device))
    return snapshot


def _gpu_state(device: torch.device) -> dict:
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        import os

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        others = [p for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid != os.getpid()]
        return {
            "gpu_sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "gpu_temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "gpu_utilization_percent": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "gpu_other_processes": len(others),
        }
    except Exception:  # noqa: BLE001 - monitoring must never fail a run
        return {}


def other_cpu_share(before: dict, after: dict) -> float | None:
    """Other processes' mean share of all cores between two probes (0: idle, 1: every core)."""
    keys = ("time", "system_busy_s", "own_cpu_s", "cores")
    if not all(k in before and k in after for k in keys):
        return None
    wall = (after["time"] - before["time"]) * (after["cores"] or 1)
    if wall <= 0:
        return None
    others = (after["system_busy_s"] - before["system_busy_s"]) - (after["own_cpu_s"] - before["own_cpu_s"])
    return min(1.0, max(0.0, others / wall))


def machine_record(before: dict, after: dict) -> dict:
    """What ``run.json`` keeps of a run's machine: both probes and the load between them."""
    return {"before": before, "after": after, "other_cpu_share": other_cpu_share(before, after)}
