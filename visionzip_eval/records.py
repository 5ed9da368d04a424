"""The run-folder format, owned here: the sweep writes with it, the report reads with it, and
test fixtures are generated from it (``report/synthetic.py``).

``OUTPUT/runs/<run id>/`` holds ``config.yaml``, ``run.log``, lmms-eval's results and samples
under ``lmms_eval/``, ``efficiency.jsonl`` (one row per request, ``EFFICIENCY_FIELDS``) and
``run.json`` (``RunRecord``), written last. A run works in ``.<run id>.partial-<pid>-<time>/``
and lands by rename; an earlier attempt being replaced is moved aside as ``.<run id>.replaced-*``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATUS_OK, STATUS_FAILED, STATUS_INCOMPLETE = "ok", "failed", "incomplete"

RUN_JSON = "run.json"
CONFIG_YAML = "config.yaml"
RUN_LOG = "run.log"
EFFICIENCY_JSONL = "efficiency.jsonl"
LMMS_EVAL_DIR = "lmms_eval"

IDENTITY = ("model", "method", "budget", "task", "limit", "seed")
FULL_METHOD = "none"  # the method label of full-budget runs: no reduction, whatever the method

# Every efficiency.jsonl row carries these keys (None when a failed sample could not be measured).
EFFICIENCY_FIELDS = (
    "task", "doc_id", "method", "budget", "visual_tokens", "visual_tokens_after_pruning",
    "visual_tokens_layer_average", "prompt_tokens",
    "generated_tokens",
    "vision_ms", "prefill_ms", "decode_ms", "ttft_ms", "total_ms", "peak_memory_bytes",
    "prefill_flops", "vision_flops", "warmup", "device", "attn_implementation", "error",
)
TIMES = ("vision_ms", "prefill_ms", "decode_ms", "ttft_ms", "total_ms")


# -- run ids and folder names ------------------------------------------------------------------
def run_id(model: str, method: str, budget: str, task: str, limit: int | None, seed: int) -> str:
    """``model__method__budget__task__limit-N|all__seed-S`` from labels (method labels carry
    non-default options: ``vispruner,important_ratio=0.25``)."""
    return f"{model}__{method}__{budget}__{task}__limit-{'all' if limit is None else limit}__seed-{seed}"


def parse_run_id(text: str) -> dict:
    """The identity a run id encodes; every value None when ``text`` is not a run id."""
    parts = text.split("__")
    identity: dict = dict.fromkeys(IDENTITY)
    if len(parts) == 6 and parts[4].startswith("limit-") and parts[5].startswith("seed-"):
        identity.update(model=parts[0], method=parts[1], budget=parts[2], task=parts[3])
        limit = parts[4].removeprefix("limit-")
        identity["limit"] = None if limit == "all" else _to_int(limit)
        identity["seed"] = _to_int(parts[5].removeprefix("seed-"))
    return identity


def partial_name(run: str, pid: int, started: int) -> str:
    return f".{run}.partial-{pid}-{started}"


def replaced_name(run: str, when: int) -> str:
    return f".{run}.replaced-{when}"


def partial_run_id(folder_name: str) -> str | None:
    """The run id of a ``.<id>.partial-*`` folder, else None."""
    if folder_name.startswith(".") and ".partial-" in folder_name:
        return folder_name[1 : folder_name.index(".partial-")]
    return None


def is_replaced(folder_name: str) -> bool:
    return folder_name.startswith(".") and ".replaced-" in folder_name


def _to_int(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        return text


# -- run.json --------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """``run.json``: how a run ended, what it measured, and on what machine."""

    status: str
    run_id: str
    identity: dict
    error: str | None = None
    metrics: dict = field(default_factory=dict)  # lmms-eval's "name,filter": value
    efficiency: dict = field(default_factory=dict)  # the adapter's medians (EfficiencyLog.summary)
    started: float | None = None
    finished: float | None = None
    seconds: float | None = None
    device: str | None = None
    versions: dict = field(default_factory=dict)
    # machine speed and load around the run: {"before": probe, "after": probe} (profiling.machine_probe)
    machine: dict = field(default_factory=dict)
    # what the report's roofline needs about the model and device (roofline.describe); empty in
    # runs recorded before it existed and in accelerate-launched ones: they get no bound
    roofline: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def read_run_json(folder: Path) -> dict | None:
    """A run folder's ``run.json`` as a dict, None if missing or unreadable."""
    try:
        return json.loads((Path(folder) / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` is either absent or complete, never torn."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# -- efficiency.jsonl ------------------------------------------------------------------------
def efficiency_row(**fields) -> dict:
    """One ``efficiency.jsonl`` row: every field present (None where unknown), extras kept."""
    row = dict.fromkeys(EFFICIENCY_FIELDS)
    row.update(fields)
    return row
