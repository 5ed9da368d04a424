"""The run-folder format, owned here: the sweep writes with it, the report reads it through
:class:`RunFolder`, and test fixtures are generated from it (``tests/synthetic.py``).

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

import yaml

STATUS_OK, STATUS_FAILED, STATUS_INCOMPLETE = "ok", "failed", "incomplete"

RUN_JSON = "run.json"
CONFIG_YAML = "config.yaml"
RUN_LOG = "run.log"
EFFICIENCY_JSONL = "efficiency.jsonl"
LMMS_EVAL_DIR = "lmms_eval"
RUNS_DIR = "runs"
LOCKS_DIR = "locks"
# lmms-eval's files, ``<date>_results.json`` and ``<date>_samples_<task>.jsonl`` (date: YYYYMMDD_HHMMSS)
RESULTS_SUFFIX = "_results.json"
SAMPLES_INFIX = "_samples_"

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
    # what ``visionzip-eval tune`` recorded in the checkpoint folder (its visionzip_tuning.json),
    # read when the run ran; None for a checkpoint not tuned by it (and in runs recorded before
    # this field existed: the report then looks in the checkpoint folder itself).
    tuning: dict | None = None

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


# -- reading a run folder ----------------------------------------------------------------------
def newest(files) -> Path | None:
    """The newest of lmms-eval's dated files: the last by file name, whose date sorts as text
    (file times are not trusted: copying a results folder changes them). Only names that start
    with their date count: MMBench also writes ``submissions/<task>_results.json``, which would
    otherwise sort after every date."""
    files = sorted((path for path in files if path.name[:1].isdigit()), key=lambda path: (path.name, str(path)))
    return files[-1] if files else None


def newest_results_file(lmms_dir: Path) -> Path | None:
    """The newest ``*_results.json`` under ``lmms_dir``, at any depth (lmms-eval's command line
    writes into a folder per model), None when there is none."""
    lmms_dir = Path(lmms_dir)
    return newest(lmms_dir.rglob(f"*{RESULTS_SUFFIX}")) if lmms_dir.is_dir() else None


def newest_samples_file(lmms_dir: Path, task: str) -> Path | None:
    """The newest ``*_samples_<task>.jsonl`` under ``lmms_dir``, by the same rule."""
    lmms_dir = Path(lmms_dir)
    if not lmms_dir.is_dir():
        return None
    return newest(p for p in lmms_dir.rglob(f"*{SAMPLES_INFIX}{task}.jsonl") if p.is_file())


def task_metrics(results: dict, task: str) -> dict[str, float]:
    """Numeric metrics of one task in lmms-eval's results JSON, keys as it writes them
    (``name,filter``); its standard errors and the alias left out."""
    entry = (results.get("results") or {}).get(task) or {}
    return {
        key: float(value)
        for key, value in entry.items()
        if key != "alias" and "_stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; blank and torn lines (a killed writer's last) skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


@dataclass(frozen=True)
class RunFolder:
    """One folder under ``OUTPUT/runs/``, read-only: each accessor reads its file when called
    (call once and keep the value) and answers None / empty for a missing or unreadable file."""

    path: Path

    @property
    def run_id(self) -> str | None:
        """The run id the folder name gives (a ``.<id>.partial-*`` folder's too); None for a
        ``.<id>.replaced-*`` folder, an old attempt being swapped out, not a run."""
        name = Path(self.path).name
        return partial_run_id(name) if name.startswith(".") else name

    @property
    def is_partial(self) -> bool:
        return partial_run_id(Path(self.path).name) is not None

    @property
    def lmms_dir(self) -> Path:
        return Path(self.path) / LMMS_EVAL_DIR

    def record(self) -> dict | None:
        """``run.json`` as a dict (None: missing or unreadable)."""
        return read_run_json(self.path)

    def config(self) -> dict:
        """``config.yaml``, the run's resolved configuration ({} if missing or unreadable)."""
        try:
            loaded = yaml.safe_load((Path(self.path) / CONFIG_YAML).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def requests(self) -> list[dict]:
        """``efficiency.jsonl``'s rows, one per request ([] without the file)."""
        path = Path(self.path) / EFFICIENCY_JSONL
        return read_jsonl(path) if path.is_file() else []

    def results(self) -> dict | None:
        """lmms-eval's newest results JSON (None: none, or unreadable)."""
        path = newest_results_file(self.lmms_dir)
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path else None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def samples(self, task: str) -> list[dict]:
        """lmms-eval's newest samples of ``task``, one dict per document ([] without them)."""
        path = newest_samples_file(self.lmms_dir, task)
        return read_jsonl(path) if path else []
