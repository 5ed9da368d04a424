"""Read a sweep's results directory (``RESULTS/runs/<run_id>/``) into tidy pandas frames.

Nothing here writes: run folders are only read. Every folder under ``runs/`` becomes at least
one row: complete runs one row per lmms-eval metric, failed and incomplete runs (no
``run.json``, or a ``.<id>.partial-*`` folder) one row with ``status`` and ``error`` and no
value, so a report can list them instead of dropping them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from visionzip_eval import records, roofline
from visionzip_eval.budget import Budget
from visionzip_eval.records import IDENTITY, STATUS_FAILED, STATUS_INCOMPLETE, STATUS_OK
from visionzip_eval.benchmarks import benchmark_key, metric_scale
from visionzip_eval.noise import flag_noisy, probe_columns

# Columns of the tidy frame, in order (see README of the report module / the report's notes).
COLUMNS = [
    "run_id", "status", "error", "model", "pretrained", "method", "budget", "budget_total",
    "task", "benchmark", "limit", "seed",
    "frames",  # frames sampled per video (the model's max_frames argument); empty when not set
    "metric", "filter", "value", "stderr", "scale", "score", "n_samples",
    "visual_tokens", "tokens_per_image", "full_tokens_per_image", "token_ratio",
    "requests", "warmup_requests", "failed_requests",
    "vision_ms_median", "vision_ms_p10", "vision_ms_p90",
    "prefill_ms_median", "prefill_ms_p10", "prefill_ms_p90",
    "ttft_ms_median", "ttft_ms_p10", "ttft_ms_p90",
    "decode_ms_per_token_median", "decode_ms_per_token_p10", "decode_ms_per_token_p90",
    "total_ms_median", "total_ms_p10", "total_ms_p90", "total_ms_sum",
    "peak_memory_bytes_median", "peak_memory_bytes_max", "peak_memory_kind",
    "prefill_flops_median", "vision_flops_median", "tflops_median",
    "prefill_roofline_ms_median", "ttft_roofline_ms_median",
    "device", "dtype", "attn_implementation", "roofline_device", "roofline_reason", "seconds",
    "probe_gflops", "probe_copy_gbs", "other_cpu_share", "noisy", "noise",
    # the model the run's checkpoint was tuned from under a reduction (VisionZip‡), as run.json
    # records the checkpoint folder's visionzip_tuning.json (``visionzip-eval tune``); empty for others
    "tuned_from", "tuned_method", "tuned_budget", "path",
]
_EFFICIENCY_COLUMNS = COLUMNS[COLUMNS.index("requests"): COLUMNS.index("device")]
_NOISE_COLUMNS = ("noisy", "noise")

REQUEST_COLUMNS = [
    "run_id", "model", "method", "budget", "budget_total", "task", "benchmark", "doc_id",
    "visual_tokens", "visual_tokens_after_pruning", "images", "videos", "frames", "tokens_per_image", "input_tokens_per_image",
    "prompt_tokens", "generated_tokens", "vision_ms", "prefill_ms", "decode_ms", "decode_ms_per_token", "ttft_ms", "total_ms",
    "peak_memory_bytes", "peak_memory_kind", "prefill_flops", "vision_flops", "batch_size",
    "warmup", "error", "measured", "device",
    # roofline.py's lower bounds on this request's prefill and TTFT, what limits the prefill
    # (compute / memory), the device entry used, or why there is no bound
    "prefill_roofline_ms", "ttft_roofline_ms", "roofline_bound_by", "prefill_roofline_flops", "prefill_roofline_bytes",
    "roofline_device", "roofline_tflops", "roofline_bandwidth_gbs", "roofline_reason",
]


# What a run's lmms-eval samples say (``sample_facts``): one row per run (``path``) and metric.
SAMPLE_COLUMNS = ["path", "metric", "categories", "circular", "chance"]


@dataclass
class Results:
    """A results directory read once: ``frame`` (tidy, one row per run x metric), ``requests``
    (one row per ``efficiency.jsonl`` line, with the run's identity) and ``samples`` (what the
    runs' lmms-eval samples say, ``SAMPLE_COLUMNS``)."""

    root: Path
    frame: pd.DataFrame
    requests: pd.DataFrame
    samples: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SAMPLE_COLUMNS))

    @property
    def runs(self) -> pd.DataFrame:
        """One row per run folder (metric columns dropped)."""
        cols = [c for c in self.frame.columns if c not in ("metric", "filter", "value", "stderr", "scale", "score")]
        return self.frame[cols].drop_duplicates("path").reset_index(drop=True)

    @property
    def problems(self) -> pd.DataFrame:
        """Failed and incomplete runs: run_id, status, error, path."""
        runs = self.runs
        bad = runs[runs["status"] != STATUS_OK]
        return bad[["run_id", "status", "model", "method", "budget", "task", "error", "path"]].reset_index(drop=True)

    @property
    def ok(self) -> pd.DataFrame:
        """Metric rows of complete, successful runs."""
        return self.frame[(self.frame["status"] == STATUS_OK) & self.frame["metric"].notna()]


def collect(results_dir: str | Path) -> pd.DataFrame:
    """The tidy frame of a results directory (see :data:`COLUMNS`)."""
    return load_results(results_dir).frame


def runs_folder(results_dir: str | Path) -> Path:
    root = Path(results_dir)
    if not root.is_dir():
        raise ValueError(f"results directory {root} does not exist")
    runs = root / records.RUNS_DIR
    if not runs.is_dir():
        raise ValueError(
            f"{root} has no runs/ folder: pass the directory given to `visionzip-eval sweep --output-dir`"
        )
    return runs


def load_results(results_dir: str | Path) -> Results:
    root = Path(results_dir)
    runs = runs_folder(root)
    metric_rows: list[dict] = []
    request_frames: list[pd.DataFrame] = []
    sample_rows: list[dict] = []
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        parsed = _read_run_folder(records.RunFolder(folder))
        if parsed is None:
            continue
        rows, requests, samples = parsed
        metric_rows.extend(rows)
        sample_rows.extend(samples)
        if requests is not None and len(requests):
            request_frames.append(requests)
    if not metric_rows:
        raise ValueError(f"no run folders under {runs}")
    frame = pd.DataFrame.from_records(metric_rows)
    for column in COLUMNS:
        if column not in frame.columns:
            frame[column] = np.nan
    frame = _with_noise(frame[COLUMNS])
    requests = (
        pd.concat(request_frames, ignore_index=True) if request_frames else pd.DataFrame(columns=REQUEST_COLUMNS)
    )
    _add_full_token_counts(frame, requests)
    samples = pd.DataFrame.from_records(sample_rows, columns=SAMPLE_COLUMNS)
    return Results(root=root, frame=frame, requests=requests, samples=samples)


# -- one run folder ------------------------------------------------------------------------------


def _budget_total(label) -> float:
    try:
        total = Budget.parse(str(label)).total
    except ValueError:
        return math.nan
    return math.nan if total is None else float(total)


def _read_run_folder(folder: records.RunFolder) -> tuple[list[dict], pd.DataFrame | None, list[dict]] | None:
    """One run folder, each file read once: its metric rows (one row without a value for a
    failed or incomplete run), its requests, and what its samples say (``SAMPLE_COLUMNS``)."""
    run_id = folder.run_id
    if run_id is None:
        return None  # ``.<id>.replaced-*``: an old attempt being swapped out, not a run
    info = None if folder.is_partial else folder.record()
    status, error = _status(folder, info)
    base = _run_row(folder, run_id, status, error, info, folder.config())
    requests = _labelled_requests(folder.requests(), base)
    base.update(_roofline(requests, info, base))
    base.update(_efficiency_aggregates(requests, (info or {}).get("efficiency") or {}))
    if status != STATUS_OK:
        return [base], requests, []
    samples = [dict(row, path=base["path"]) for row in _sample_facts(folder, base["task"], base["benchmark"])]
    return _metric_rows(base, info, folder.results()), requests, samples


def _status(folder: records.RunFolder, info: dict | None) -> tuple[str, str | None]:
    """(status, error): ok, failed (with its error), or incomplete (with why)."""
    if folder.is_partial:
        return STATUS_INCOMPLETE, "partial folder: the run was interrupted or is still running"
    if info is None:
        if not (Path(folder.path) / records.RUN_JSON).exists():
            return STATUS_INCOMPLETE, "no run.json: the run was interrupted or is still running"
        return STATUS_INCOMPLETE, "run.json is unreadable (interrupted while writing?)"
    status, error = info.get("status"), info.get("error")
    if status not in (STATUS_OK, STATUS_FAILED):
        return STATUS_FAILED, error or f"unknown run status {info.get('status')!r}"
    if status == STATUS_FAILED and not error:
        error = "failed (no error recorded)"
    return status, error


def _run_row(folder: records.RunFolder, run_id: str, status: str, error: str | None, info: dict | None,
             config: dict) -> dict:
    """The columns every row of the run shares: identity (run.json over config.yaml over the
    folder name), model, device, machine probe, tuning provenance."""
    identity = records.parse_run_id(run_id)
    identity.update({k: v for k, v in (config.get("run") or {}).items() if k in IDENTITY})
    if info is not None:
        identity.update({k: v for k, v in (info.get("identity") or {}).items() if k in IDENTITY})
    identity["budget"] = None if identity["budget"] is None else str(identity["budget"])
    model_cfg = config.get("model") or {}
    return dict(
        run_id=str((info or {}).get("run_id") or run_id),
        status=status,
        error=error,
        **identity,
        pretrained=model_cfg.get("pretrained"),
        frames=(model_cfg.get("args") or {}).get("max_frames"),
        budget_total=_budget_total(identity["budget"]),
        benchmark=benchmark_key(identity["task"]) if identity["task"] else None,
        device=(info or {}).get("device") or config.get("device"),
        dtype=model_cfg.get("dtype"),
        attn_implementation=model_cfg.get("attn_implementation"),
        seconds=(info or {}).get("seconds"),
        **probe_columns((info or {}).get("machine")),
        **_tuning(info, model_cfg.get("pretrained")),
        path=str(folder.path),
    )


def _labelled_requests(rows: list[dict], base: dict) -> pd.DataFrame | None:
    """The run's requests with its identity on each (a request keeps its own task: a group run
    has several)."""
    requests = _requests_frame(rows)
    if requests is None:
        return None
    for key in ("run_id", "model", "method", "budget", "budget_total", "device", "frames"):
        requests[key] = base[key]
    if base["task"] and requests["task"].isna().all():
        requests["task"] = base["task"]
    requests["benchmark"] = requests["task"].map(lambda t: benchmark_key(t) if isinstance(t, str) else None)
    return requests.reindex(columns=REQUEST_COLUMNS)


def _metric_rows(base: dict, info: dict, results: dict | None) -> list[dict]:
    """One row per metric of a complete run: run.json's metrics (lmms-eval's results JSON's when
    run.json has none), with their standard errors and the benchmark's scale."""
    task = base["task"]
    metrics = dict(info.get("metrics") or {})
    task_results, n_samples = {}, math.nan
    if results is not None:
        task_results = (results.get("results") or {}).get(task) or {}
        effective = ((results.get("n-samples") or {}).get(task) or {}).get("effective")
        n_samples = float(effective) if isinstance(effective, (int, float)) else math.nan
        if not metrics:
            metrics = records.task_metrics(results, task)
    base = dict(base, n_samples=n_samples)
    rows = []
    for key, value in metrics.items():
        name, _, filt = key.partition(",")
        stderr = task_results.get(f"{name}_stderr,{filt or 'none'}")
        if not _is_number(stderr):  # "N/A" without bootstrap: lmms-eval's CLT estimate instead
            stderr = task_results.get(f"{name}_stderr_clt,{filt or 'none'}")
        value = float(value) if _is_number(value) else math.nan
        scale = metric_scale(name)
        rows.append(dict(
            base, metric=name, filter=filt or "none", value=value,
            stderr=float(stderr) if _is_number(stderr) else math.nan,
            scale=scale, score=value * scale,
        ))
    if not rows:
        rows.append(dict(base, status=STATUS_FAILED, error="run.json says ok but holds no metric"))
    return rows


def _tuning(info: dict | None, pretrained) -> dict:
    """What ``visionzip-eval tune`` recorded about the run's checkpoint, from run.json; a run
    whose run.json holds none (recorded before it carried one) reads the checkpoint folder (a
    relative one from the current directory, where the sweep ran)."""
    record = (info or {}).get("tuning")
    if record is None and pretrained and not str(pretrained).startswith("builtin:"):
        from visionzip_eval.tuning import read_tuning

        record = read_tuning(pretrained)
    if not isinstance(record, dict):
        return dict(tuned_from=None, tuned_method=None, tuned_budget=None)
    return dict(tuned_from=record.get("base_model"), tuned_method=record.get("method"),
                tuned_budget=None if record.get("budget") is None else str(record.get("budget")))


# -- what a run's lmms-eval samples say: MME categories present, MMBench rotations ------------------

MMB_ROTATION_STRIDE = 1_000_000  # lmms-eval MMBench: rotation k of question i has index i + k * 1e6
_OPTION_LETTERS = "ABCDEFGHI"
_MME_METRICS = ("mme_perception_score", "mme_cognition_score")
_MMB_METRIC = "gpt_eval_score"


def _n_options(item: dict) -> int:
    n = 0
    for letter in _OPTION_LETTERS:
        value = item.get(letter)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if str(value).strip().lower() in ("", "nan", "none"):
            continue
        n += 1
    return n if n >= 2 else 4


def sample_facts(samples: list[dict], bench_key: str) -> list[dict]:
    """What a run's lmms-eval samples say, as rows of ``SAMPLE_COLUMNS`` (less ``path``): MME,
    per score metric, how many categories are present; MMBench (``gpt_eval_score``), whether a
    question comes in several option rotations (``circular``) and what guessing scores on it
    (``chance``, a fraction). No rows for other benchmarks, or without samples."""
    if bench_key == "MME":
        categories = defaultdict(set)
        for row in samples:
            for metric in _MME_METRICS:
                entry = row.get(metric)
                if isinstance(entry, dict) and entry.get("category") is not None:
                    categories[metric].add(str(entry["category"]))
        return [dict(metric=metric, categories=float(len(found)), circular=None, chance=math.nan)
                for metric, found in categories.items()]
    if bench_key != "MMB":
        return []
    groups: dict[int, list[int]] = defaultdict(list)
    for row in samples:
        entry = row.get(_MMB_METRIC)
        if isinstance(entry, dict) and isinstance(entry.get("index"), (int, float)):
            groups[int(entry["index"]) % MMB_ROTATION_STRIDE].append(_n_options(entry))
    if not groups:
        return []
    # a question counts only if every rotation is right: a guesser gets it with prod(1 / options)
    chance = float(np.mean([np.prod([1.0 / n for n in options]) for options in groups.values()]))
    return [dict(metric=_MMB_METRIC, categories=math.nan, circular=any(len(g) > 1 for g in groups.values()),
                 chance=chance)]


def _sample_facts(folder: records.RunFolder, task, bench_key) -> list[dict]:
    """``sample_facts`` of the run's newest samples file, read only for the benchmarks it serves."""
    if bench_key not in ("MME", "MMB") or not task:
        return []
    return sample_facts(folder.samples(str(task)), bench_key)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _requests_frame(rows: list[dict]) -> pd.DataFrame | None:
    """``efficiency.jsonl``'s rows as a frame with derived columns; None without rows."""
    if not rows:
        return None
    frame = pd.DataFrame.from_records(rows)
    for column in REQUEST_COLUMNS:
        if column not in frame.columns:
            frame[column] = np.nan
    frame["warmup"] = frame["warmup"].fillna(False).astype(bool)
    frame["error"] = frame["error"].where(frame["error"].notna(), None)
    frame["measured"] = ~frame["warmup"] & frame["error"].isna()
    numeric = ["visual_tokens", "visual_tokens_after_pruning", "images", "videos", "tokens_per_image",
               "prompt_tokens", "generated_tokens", "vision_ms", "prefill_ms", "decode_ms", "ttft_ms", "total_ms",
               "peak_memory_bytes", "prefill_flops", "vision_flops", "batch_size"]
    for column in numeric:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    images = frame["images"].where(frame["images"] > 0)
    frame["input_tokens_per_image"] = (frame["visual_tokens"] / images).fillna(frame["tokens_per_image"])
    # the tokens per image the LLM keeps: after an in-LLM method's pruning (rows written before
    # in-LLM methods existed have no such field: nothing was pruned inside the LLM)
    kept = frame["visual_tokens_after_pruning"].fillna(frame["visual_tokens"])
    frame["tokens_per_image"] = (kept / images).fillna(frame["tokens_per_image"])
    # decode_ms spans the forwards after prefill: one per generated token after the first.
    steps = (frame["generated_tokens"] - 1).where(frame["generated_tokens"] > 1)
    frame["decode_ms_per_token"] = frame["decode_ms"] / steps
    return frame


def _roofline(requests: pd.DataFrame | None, info: dict | None, base: dict) -> dict:
    """Each request's roofline bounds (in place: the roofline columns of REQUEST_COLUMNS) from the
    run's recorded model facts and device; returns the run's device entry, or why it has none."""
    try:
        facts, device = roofline.for_run((info or {}).get("roofline"), base["probe_gflops"], base["probe_copy_gbs"])
    except ValueError as error:
        if requests is not None:
            requests["roofline_reason"] = str(error)
        return dict(roofline_device=None, roofline_reason=str(error))
    if requests is not None:
        bounds = [_request_bound(row, facts, device) for row in requests.itertuples(index=False)]
        requests["prefill_roofline_ms"] = [b.prefill_ms if b else math.nan for b in bounds]
        requests["ttft_roofline_ms"] = [b.ttft_ms if b else math.nan for b in bounds]
        requests["roofline_bound_by"] = [b.prefill.bound_by if b else None for b in bounds]
        # the prefill's work, so that a table can bound it at other device figures
        requests["prefill_roofline_flops"] = [b.prefill.flops if b else math.nan for b in bounds]
        requests["prefill_roofline_bytes"] = [b.prefill.nbytes if b else math.nan for b in bounds]
        requests["roofline_device"] = device.name
        requests["roofline_tflops"] = device.tflops
        requests["roofline_bandwidth_gbs"] = device.bandwidth_gbs
    return dict(roofline_device=device.describe(), roofline_reason=None)


def _request_bound(row, facts: roofline.ModelFacts, device: roofline.Device) -> roofline.RequestBound | None:
    """One efficiency.jsonl row's bound; None for a row without FLOPs or tokens (a failed request)."""
    if not (_is_number(row.prefill_flops) and _is_number(row.prompt_tokens)):
        return None
    visual = row.visual_tokens if _is_number(row.visual_tokens) else 0.0
    # an in-LLM method's cache holds the kept positions after its last pruning layer (a lower bound)
    kept = row.visual_tokens_after_pruning if _is_number(row.visual_tokens_after_pruning) else visual
    batch = int(row.batch_size) if _is_number(row.batch_size) and row.batch_size >= 1 else 1
    vision = float(row.vision_flops) if _is_number(row.vision_flops) else None
    return roofline.request_bound(facts, device, float(row.prefill_flops), float(row.prompt_tokens - visual + kept),
                                  vision, batch)


def _stat(values: pd.Series, q: float | None) -> float:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return math.nan
    return float(values.median() if q is None else np.percentile(values.to_numpy(dtype=float), q))


def _efficiency_aggregates(requests: pd.DataFrame | None, medians: dict) -> dict:
    """Medians and 90th percentiles over measured requests (warm-up and failed ones left out,
    failed ones counted); falls back to run.json's medians when efficiency.jsonl is missing."""
    out = {c: math.nan for c in _EFFICIENCY_COLUMNS}
    out["peak_memory_kind"] = None
    if requests is None or requests.empty:
        for key in ("requests", "warmup_requests", "failed_requests"):
            if _is_number(medians.get(key)):
                out[key] = float(medians[key])
        for key in ("vision_ms", "prefill_ms", "ttft_ms", "total_ms", "peak_memory_bytes",
                    "prefill_flops"):
            if _is_number(medians.get(f"median_{key}")):
                out[f"{key}_median"] = float(medians[f"median_{key}"])
        if _is_number(medians.get("median_visual_tokens")):
            out["visual_tokens"] = float(medians["median_visual_tokens"])
        return out
    measured = requests[requests["measured"]]
    out["requests"] = float(len(requests))
    out["warmup_requests"] = float(requests["warmup"].sum())
    out["failed_requests"] = float(requests["error"].notna().sum())
    counted = measured if len(measured) else requests[requests["error"].isna()]
    out["visual_tokens"] = _stat(counted["visual_tokens"], None)
    out["tokens_per_image"] = _stat(counted["tokens_per_image"], None)
    for key in ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "total_ms"):
        out[f"{key}_median"] = _stat(measured[key], None)
        out[f"{key}_p10"] = _stat(measured[key], 10)
        out[f"{key}_p90"] = _stat(measured[key], 90)
    out["total_ms_sum"] = float(measured["total_ms"].sum()) if len(measured) else math.nan
    out["peak_memory_bytes_median"] = _stat(measured["peak_memory_bytes"], None)
    out["peak_memory_bytes_max"] = float(measured["peak_memory_bytes"].max()) if len(measured) else math.nan
    kinds = requests["peak_memory_kind"].dropna()
    out["peak_memory_kind"] = str(kinds.mode().iloc[0]) if len(kinds) else None
    out["prefill_flops_median"] = _stat(measured["prefill_flops"], None)
    out["vision_flops_median"] = _stat(measured["vision_flops"], None)
    flops = measured["prefill_flops"].fillna(0) + measured["vision_flops"].fillna(0)
    out["tflops_median"] = _stat(flops[measured["prefill_flops"].notna()] / 1e12, None)
    out["prefill_roofline_ms_median"] = _stat(measured["prefill_roofline_ms"], None)
    out["ttft_roofline_ms_median"] = _stat(measured["ttft_roofline_ms"], None)
    return out


def _with_noise(frame: pd.DataFrame) -> pd.DataFrame:
    """``noisy`` / ``noise`` per run, judged over the complete runs read together."""
    per_run = frame.drop_duplicates("path")
    ok = flag_noisy(per_run[per_run["status"] == STATUS_OK])
    flags = ok.set_index("path")[list(_NOISE_COLUMNS)]
    frame = frame.drop(columns=list(_NOISE_COLUMNS)).join(flags, on="path")
    frame["noisy"] = frame["noisy"].fillna(False).astype(bool)
    frame["noise"] = frame["noise"].fillna("")
    return frame[COLUMNS]


def _add_full_token_counts(frame: pd.DataFrame, requests: pd.DataFrame) -> None:
    """The model's unreduced visual tokens per image, from its full-budget runs' requests,
    and every run's ratio to it (in place)."""
    full = {}
    if len(requests):
        full_rows = requests[(requests["budget"] == "full") & requests["error"].isna()]
        for model, rows in full_rows.groupby("model"):
            value = _stat(rows["tokens_per_image"], None)
            if not math.isnan(value):
                full[model] = value
    for model in frame["model"].dropna().unique():
        if model not in full:
            ok_full = frame[(frame["model"] == model) & (frame["budget"] == "full")]
            value = _stat(ok_full["tokens_per_image"], None)
            if not math.isnan(value):
                full[model] = value
    frame["full_tokens_per_image"] = frame["model"].map(full).astype(float)
    frame["token_ratio"] = frame["tokens_per_image"] / frame["full_tokens_per_image"]
