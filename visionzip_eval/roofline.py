"""Roofline: the fastest a request's prefill could run on a device, from FLOPs and bytes moved.

A stage that does ``F`` FLOPs and must move ``B`` bytes through memory cannot finish sooner than
``max(F / peak FLOP/s, B / memory bandwidth)``. For one request:

- **prefill** (the decoder stack, the window ``prefill_ms`` times): ``F`` = the row's
  ``prefill_flops`` less the LM head's ``2 * hidden * vocab``; ``B`` = the decoder's weights
  (read once per forward; the input embedding table is not: only the prompt's rows are gathered)
  plus the K and V it writes, ``2 * layers * kv_heads * head_dim * bytes/element`` per position;
- **TTFT** (``ttft_ms``): the vision tower + projector stage (``vision_flops``, the weights of the
  tower layers run and of the projector) + prefill + the LM head stage (one position's logits,
  the head's weights), summed: each waits for the one before.

Activations, attention scores and norms are left out, so the figure is a lower bound on time;
an in-LLM method's cache is counted at the positions kept after its last pruning layer (a lower
bound too). At batch size ``b`` the batch is taken as ``b`` requests like this one (weights read
once, FLOPs and KV ``b`` times), the batch's time being what ``prefill_ms`` holds.

Peaks: GPUs from the vendors' datasheets (dense fp16/bf16 tensor-core FLOP/s, i.e. half the
"with sparsity" figures; memory bandwidth), matched on ``torch.cuda.get_device_name``; the CPU
from the run's own probe (``profiling.machine_probe``: a 256 x 256 fp32 matmul and a 16 MiB
copy, recorded in ``run.json``), since no datasheet describes a shared CPU.

The sweep records what the bound needs about the model in ``run.json``'s ``roofline`` entry
(:func:`describe`, at run time); the report reads it back (:meth:`ModelFacts.from_record`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

# -- devices -------------------------------------------------------------------------------------

A100_DATASHEET = ("https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                  "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
A800_DATASHEET = ("https://www.nvidia.cn/content/dam/en-zz/Solutions/Data-Center/a800/"
                  "nvidia-a800-datasheet-2029415.pdf")
H100_DATASHEET = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
H200_DATASHEET = "https://nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446"
L40S_DATASHEET = "https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413"
ADA_WHITEPAPER = ("https://images.nvidia.com/aem-dam/Solutions/geforce/ada/"
                  "nvidia-ada-lovelace-architecture-whitepaper-v1.1.pdf")
CPU_SOURCE = "the run's own probe in run.json: a 256 x 256 fp32 matmul and a 16 MiB copy"

CPU_NAME = "CPU (each run's own probe)"

HALF_PRECISION = ("float16", "bfloat16")  # the dtypes the datasheet peaks are for


@dataclass(frozen=True)
class Device:
    """Peak dense matmul throughput and memory bandwidth of one device.

    ``match``: lower-case fragments that must all occur in the normalised device name
    (``torch.cuda.get_device_name``, ``-``/``_`` read as spaces), ``exclude``: none may."""

    name: str
    tflops: float  # dense fp16/bf16 tensor-core TFLOP/s (the CPU: the probe's fp32 matmul)
    bandwidth_gbs: float  # GB/s (1e9 bytes)
    source: str
    match: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for what, value in (("peak TFLOP/s", self.tflops), ("bandwidth GB/s", self.bandwidth_gbs)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"device {self.name!r}: {what} must be a positive number, got {value!r}")

    def describe(self) -> str:
        return f"{self.name}: {self.tflops:.4g} TFLOP/s, {self.bandwidth_gbs:.4g} GB/s"


# Datasheet tensor-core figures for fp16 and bf16 are equal on all of these. Where a sheet gives
# only "with sparsity" (2:4 structured, which dense inference does not use) the dense peak is half.
DEVICES: tuple[Device, ...] = (
    # A100: 312 TFLOPS fp16/bf16 dense (624 sparse); 40GB 1,555 GB/s (SXM4 and PCIe), 80GB SXM4
    # 2,039 GB/s, 80GB PCIe 1,935 GB/s
    Device("NVIDIA A100 80GB PCIe", 312.0, 1935.0, A100_DATASHEET, ("a100", "80gb", "pcie")),
    Device("NVIDIA A100 80GB SXM4", 312.0, 2039.0, A100_DATASHEET, ("a100", "80gb"), ("pcie",)),
    Device("NVIDIA A100 40GB", 312.0, 1555.0, A100_DATASHEET, ("a100", "40gb")),
    # A800 (the A100 with a slower NVLink): the same compute and memory figures as the A100
    Device("NVIDIA A800 80GB PCIe", 312.0, 1935.0, A800_DATASHEET, ("a800", "80gb", "pcie")),
    Device("NVIDIA A800 80GB SXM4", 312.0, 2039.0, A800_DATASHEET, ("a800", "80gb"), ("pcie",)),
    Device("NVIDIA A800 40GB PCIe", 312.0, 1555.0, A800_DATASHEET, ("a800", "40gb"), ("active",)),
    # H100: sheet 1,979 (SXM) / 1,513 (PCIe) / 1,671 (NVL) TFLOPS with sparsity;
    # 3.35 / 2 / 3.9 TB/s. The SXM part reports itself as "NVIDIA H100 80GB HBM3".
    Device("NVIDIA H100 PCIe", 756.5, 2000.0, H100_DATASHEET, ("h100", "pcie")),
    Device("NVIDIA H100 NVL", 835.5, 3900.0, H100_DATASHEET, ("h100", "nvl")),
    Device("NVIDIA H100 SXM", 989.5, 3350.0, H100_DATASHEET, ("h100",), ("pcie", "nvl")),
    # H200: the H100's compute with 4.8 TB/s HBM3e; SXM 1,979, NVL 1,671 TFLOPS with sparsity
    Device("NVIDIA H200 NVL", 835.5, 4800.0, H200_DATASHEET, ("h200", "nvl")),
    Device("NVIDIA H200 SXM", 989.5, 4800.0, H200_DATASHEET, ("h200",), ("nvl",)),
    # L40S: 362.05 TFLOPS fp16/bf16 dense (733 sparse), 864 GB/s GDDR6
    Device("NVIDIA L40S", 362.05, 864.0, L40S_DATASHEET, ("l40s",)),
    # RTX 4090 (Ada whitepaper, appendix): 165.2 TFLOPS fp16/bf16 with FP32 accumulate, which is
    # what PyTorch's matmuls use (330.3 with FP16 accumulate); 1,008 GB/s GDDR6X
    Device("NVIDIA GeForce RTX 4090", 165.2, 1008.0, ADA_WHITEPAPER, ("rtx 4090",), ("laptop", "4090 d")),
)


def _normalise(name: str) -> str:
    return " ".join(str(name).lower().replace("-", " ").replace("_", " ").split())


def device_for(accelerator: str) -> Device | None:
    """The table's entry for a device name as torch reports it, None when none matches."""
    name = _normalise(accelerator)
    for device in DEVICES:
        if all(m in name for m in device.match) and not any(x in name for x in device.exclude):
            return device
    return None


def cpu_device(probe_gflops: float, probe_copy_gbs: float) -> Device:
    """The CPU entry: the run's own probe (``run.json`` machine record) as its peaks."""
    for what, value in (("matmul probe GFLOP/s", probe_gflops), ("copy probe GB/s", probe_copy_gbs)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"no usable CPU {what} in run.json's machine record (got {value!r})")
    return Device(CPU_NAME, probe_gflops / 1e3, probe_copy_gbs, CPU_SOURCE)


# -- what a run records about its model ------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """``run.json``'s ``roofline`` entry: the device name, dtype, weight bytes read per stage and
    the decoder's shape (what the KV cache and the LM head cost)."""

    accelerator: str  # torch.cuda.get_device_name(), or the device type ("cpu")
    dtype: str  # "float16", "bfloat16", "float32"
    bytes_per_element: int  # of activations and the KV cache
    decoder_weight_bytes: int  # decoder layers + final norm (no input embedding table)
    lm_head_weight_bytes: int
    vision_weight_bytes: int  # tower layers run + embeddings + projector
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int

    def to_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> ModelFacts:
        """Read back :meth:`to_record`'s dict; a one-line ValueError on anything malformed."""
        if not isinstance(record, dict) or not record:
            raise ValueError("run.json records no roofline facts (a run from before they were recorded, "
                             "or one launched with accelerate): re-run it to get a bound")
        values = {}
        for f in fields(cls):
            if f.name not in record:
                raise ValueError(f"run.json's roofline record lacks {f.name!r}")
            value = record[f.name]
            if f.name in ("accelerator", "dtype"):
                if not isinstance(value, str) or not value:
                    raise ValueError(f"run.json's roofline record: {f.name} must be a name, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"run.json's roofline record: {f.name} must be a non-negative integer, got {value!r}")
            values[f.name] = value
        if min(values["layers"], values["kv_heads"], values["head_dim"], values["bytes_per_element"]) == 0:
            raise ValueError("run.json's roofline record: layers, kv_heads, head_dim and bytes_per_element "
                             "must be positive")
        return cls(**values)

    @property
    def kv_bytes_per_position(self) -> int:
        """K and V of one position in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_element

    @property
    def lm_head_flops(self) -> int:
        """One position's logits (all ``profiling.prefill_flops`` counts of the head)."""
        return 2 * self.hidden * self.vocab


def _param_bytes(modules, skip: set[int]) -> int:
    """Bytes of the distinct parameters of ``modules`` not in ``skip`` (ids; updated)."""
    total = 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if id(p) not in skip:
                skip.add(id(p))
                total += p.numel() * p.element_size()
    return total


def describe(backend, device) -> dict:
    """``run.json``'s roofline record for the model a backend wraps, on ``device`` (run time)."""
    import torch

    from visionzip_eval.profiling import DecoderShape

    device = torch.device(device)
    model = backend.model
    modules = backend.modules()
    first = next(model.parameters())
    shape = DecoderShape.from_config(getattr(backend.config, "text_config", None) or backend.config)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None

    embedding_ids = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    decoder = _param_bytes([modules["language_model"]], embedding_ids)
    head = _param_bytes([modules["lm_head"]], set())  # tied to the embedding or not, the head reads it
    # the tower layers after the feature layer never run (LLaVA families stop at it)
    layers, index = getattr(backend, "layers", None), getattr(backend, "layer_index", None)
    unused = set()
    if layers is not None and isinstance(index, int):
        _param_bytes(list(layers)[index + 1:], unused)
    vision = _param_bytes([modules["vision_tower"], modules["projector"]], unused)

    if device.type == "cuda" and torch.cuda.is_available():
        accelerator = torch.cuda.get_device_name(device)
    else:
        accelerator = device.type
    return ModelFacts(
        accelerator=accelerator,
        dtype=str(first.dtype).removeprefix("torch."),
        bytes_per_element=first.element_size(),
        decoder_weight_bytes=decoder,
        lm_head_weight_bytes=head,
        vision_weight_bytes=vision,
        layers=shape.layers,
        hidden=shape.hidden,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        vocab=shape.vocab,
    ).to_record()


def for_run(record: dict | None, probe_gflops: float = math.nan,
            probe_copy_gbs: float = math.nan) -> tuple[ModelFacts, Device]:
    """The facts and the device a run is bounded with; a one-line ValueError saying why not."""
    facts = ModelFacts.from_record(record)
    if facts.accelerator == "cpu":
        return facts, cpu_device(probe_gflops, probe_copy_gbs)
    device = device_for(facts.accelerator)
    if device is None:
        raise ValueError(f"no datasheet figures for {facts.accelerator!r} "
                         "(add it to DEVICES in visionzip_eval/roofline.py)")
    if facts.dtype not in HALF_PRECISION:
        raise ValueError(f"the datasheet peaks are for float16/bfloat16 and this run is {facts.dtype}")
    return facts, device


# -- the bound -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage's work (FLOPs, bytes moved) and its two limits on a device, in ms."""

    flops: float
    nbytes: float
    compute_ms: float
    memory_ms: float

    @property
    def ms(self) -> float:
        return max(self.compute_ms, self.memory_ms)

    @property
    def bound_by(self) -> str:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"


def stage(flops: float, nbytes: float, device: Device) -> Stage:
    if flops < 0 or nbytes < 0:
        raise ValueError(f"FLOPs and bytes must be non-negative, got {flops!r} and {nbytes!r}")
    return Stage(flops=flops, nbytes=nbytes, compute_ms=flops / (device.tflops * 1e12) * 1e3,
                 memory_ms=nbytes / (device.bandwidth_gbs * 1e9) * 1e3)


@dataclass(frozen=True)
class RequestBound:
    vision: Stage | None  # None: the request's vision FLOPs are unknown
    prefill: Stage
    head: Stage

    @property
    def prefill_ms(self) -> float:
        return self.prefill.ms

    @property
    def ttft_ms(self) -> float:
        return math.nan if self.vision is None else self.vision.ms + self.prefill.ms + self.head.ms


def request_bound(facts: ModelFacts, device: Device, prefill_flops: float, cached_positions: float,
                  vision_flops: float | None = None, batch: int = 1) -> RequestBound:
    """The bound of one request (an ``efficiency.jsonl`` row): ``prefill_flops`` as recorded
    (LM head included), ``cached_positions`` the positions every decoder layer keeps in its
    cache, ``vision_flops`` 0 when the tower did not run (image tokens reused), None unknown."""
    for what, value in (("prefill_flops", prefill_flops), ("cached_positions", cached_positions)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{what} must be a non-negative number, got {value!r}")
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    decoder_flops = max(prefill_flops - facts.lm_head_flops, 0)
    prefill = stage(batch * decoder_flops,
                    facts.decoder_weight_bytes + batch * cached_positions * facts.kv_bytes_per_position, device)
    head = stage(batch * facts.lm_head_flops, facts.lm_head_weight_bytes, device)
    vision = None
    if vision_flops is not None and math.isfinite(vision_flops):
        vision = stage(0, 0, device) if vision_flops == 0 else stage(batch * vision_flops,
                                                                     facts.vision_weight_bytes, device)
    return RequestBound(vision=vision, prefill=prefill, head=head)
