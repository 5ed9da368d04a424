"""A handcrafted results directory in the sweep runner's exact format (run.json, config.yaml,
run.log, efficiency.jsonl, lmms-eval's results and samples files, all through
``visionzip_eval.records``), for tests and examples: no model, no GPU, milliseconds to write.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from visionzip_eval import records

MODEL = "llava-1.5-7b"
PRETRAINED = "llava-hf/llava-1.5-7b-hf"
FULL_TOKENS = 576

# lmms-eval values (fractions for GQA/POPE, points for MME), per (method, budget).
SCORES: dict[tuple[str, str], dict[str, dict[str, float]]] = {
    ("none", "full"): {
        "gqa": {"exact_match": 0.62},
        "mme": {"mme_perception_score": 1500.0, "mme_cognition_score": 350.0},
        "pope": {"pope_accuracy": 0.87, "pope_f1_score": 0.86, "pope_precision": 0.9, "pope_recall": 0.82,
                 "pope_yes_ratio": 0.45},
    },
    ("visionzip", "192"): {
        "gqa": {"exact_match": 0.60},
        "mme": {"mme_perception_score": 1450.0, "mme_cognition_score": 340.0},
        "pope": {"pope_accuracy": 0.86, "pope_f1_score": 0.85, "pope_precision": 0.89, "pope_recall": 0.81,
                 "pope_yes_ratio": 0.45},
    },
    ("visionzip", "64"): {
        "gqa": {"exact_match": 0.55},
        "mme": {"mme_perception_score": 1350.0, "mme_cognition_score": 320.0},
        "pope": {"pope_accuracy": 0.82, "pope_f1_score": 0.80, "pope_precision": 0.85, "pope_recall": 0.76,
                 "pope_yes_ratio": 0.44},
    },
    ("random", "64"): {
        "gqa": {"exact_match": 0.50},
        "mme": {"mme_perception_score": 1200.0, "mme_cognition_score": 300.0},
        "pope": {"pope_accuracy": 0.74, "pope_f1_score": 0.70, "pope_precision": 0.8, "pope_recall": 0.62,
                 "pope_yes_ratio": 0.40},
    },
}
FAILED = ("random", "64", "gqa")  # lands with status failed
INCOMPLETE_PARTIAL = ("visionzip", "128", "pope")  # a .<id>.partial-* folder
INCOMPLETE_NO_RUN_JSON = ("visionzip", "128", "mme")  # a folder without run.json
FAILED_ERROR = "RunFailed: lmms-eval produced no metric for gqa (it exits 0 when a task fails)"


def run_id(model: str, method: str, budget: str, task: str, limit=None, seed: int = 0) -> str:
    return records.run_id(model, method, budget, task, limit, seed)


def _identity(model, method, budget, task, seed=0):
    return dict(model=model, method=method, budget=budget, task=task, limit=None, seed=seed)


def _config(model, pretrained, method, budget, task, device):
    return {
        "run": _identity(model, method, budget, task),
        "model": {"name": model, "pretrained": pretrained, "dtype": "float16", "attn_implementation": "sdpa",
                  "args": {}},
        "include_path": None,
        "lmms_eval": {"batch_size": 1, "log_samples": True, "bootstrap_iters": 0},
        "device": device,
        "sweep": "synthetic",
    }


def prefill_ms(tokens: int) -> float:
    """The synthetic latency model: prefill grows with the visual tokens."""
    return 20.0 + tokens / 10.0


def efficiency_rows(task: str, method: str, budget: str, tokens: int, n: int = 8, warmup: int = 2,
                    failed: int = 1, device: str = "cuda:0") -> list[dict]:
    rows = []
    for i in range(n):
        error = "ValueError: cannot identify image file" if i == n - 1 and failed else None
        is_warmup = error is None and i < warmup
        base = prefill_ms(tokens) + i  # measured requests: i = warmup .. n-2
        measured = {} if error else dict(
            visual_tokens=tokens, prompt_tokens=tokens + 60, generated_tokens=5, vision_ms=15.0, prefill_ms=base,
            decode_ms=4 * 20.0, ttft_ms=base + 16.0, total_ms=base + 96.0, peak_memory_bytes=int(14e9 + tokens * 1e6),
            prefill_flops=int(7e9 * 2 * (tokens + 60)), vision_flops=int(3.5e11),
        )
        rows.append(records.efficiency_row(
            task=task, doc_id=i, method=method, budget=budget, **measured, peak_memory_kind="cuda_max_allocated",
            warmup=is_warmup, device=device, attn_implementation="sdpa", error=error,
            tokens_per_image=tokens, images=1, batch_size=1, videos=0,
        ))
    return rows


def quiet_machine(matmul_gflops: float = 100.0, other_cpu_share: float = 0.02) -> dict:
    """``run.json``'s machine record of a run on a quiet machine (or, with other figures, a busy one)."""
    probe = {"time": 1.0e9, "matmul_gflops": matmul_gflops, "copy_gbs": 10.0, "cores": 2, "load_per_core": 0.1}
    return {"before": probe, "after": dict(probe, time=1.0e9 + 60), "other_cpu_share": other_cpu_share}


def _results_json(task: str, metrics: dict[str, float], n: int, date: str) -> dict:
    entry = {"alias": task}
    for name, value in metrics.items():
        entry[f"{name},none"] = value
        entry[f"{name}_stderr,none"] = 0.01 if name != "mme_perception_score" else "N/A"
    return {
        "results": {task: entry},
        "group_subtasks": {task: []},
        "configs": {task: {"task": task}},
        "versions": {task: 0.0},
        "n-samples": {task: {"original": n, "effective": n}},
        "config": {"model": "VisionZipLMM", "bootstrap_iters": 0},
        "date": date,
    }


def write_run(runs: Path, model: str, pretrained: str, method: str, budget: str, task: str,
              metrics: dict[str, float] | None, status: str = "ok", error: str | None = None,
              tokens: int | None = None, device: str = "cuda:0", write_run_json: bool = True,
              folder_name: str | None = None, n: int = 8, machine: dict | None = None) -> Path:
    rid = run_id(model, method, budget, task)
    folder = runs / (folder_name or rid)
    folder.mkdir(parents=True)
    (folder / records.CONFIG_YAML).write_text(
        yaml.safe_dump(_config(model, pretrained, method, budget, task, device), sort_keys=False), encoding="utf-8")
    (folder / records.RUN_LOG).write_text("", encoding="utf-8")
    if tokens is not None and status == "ok":
        rows = efficiency_rows(task, method, budget, tokens, n=n, device=device)
        (folder / records.EFFICIENCY_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if status == "ok" and metrics is not None:
        date = "20260101_120000"
        out = folder / records.LMMS_EVAL_DIR
        out.mkdir()
        (out / f"{date}_results.json").write_text(json.dumps(_results_json(task, metrics, n, date), indent=2),
                                                   encoding="utf-8")
        (out / f"{date}_samples_{task}.jsonl").write_text(
            "".join(json.dumps({"doc_id": i, "target": "yes", "resps": [["yes"]]}) + "\n" for i in range(n)),
            encoding="utf-8")
    if write_run_json:
        measured = [r for r in efficiency_rows(task, method, budget, tokens or 0, n=n) if not r["warmup"] and not r["error"]]
        record = records.RunRecord(
            status=status,
            error=error,
            metrics={f"{k},none": v for k, v in (metrics or {}).items()} if status == "ok" else {},
            efficiency={"requests": n, "failed_requests": 1, "warmup_requests": 2,
                        "median_prefill_ms": sorted(r["prefill_ms"] for r in measured)[len(measured) // 2]}
            if status == "ok" else {},
            identity=_identity(model, method, budget, task),
            run_id=rid,
            started=1.0e9,
            finished=1.0e9 + 60,
            seconds=60.0,
            device=device,
            versions={"python": "3.11", "visionzip-eval": "0.1.0", "torch": "2.x", "transformers": "5.x",
                      "lmms-eval": "0.7.3"},
            machine=machine if machine is not None else quiet_machine(),
        )
        (folder / records.RUN_JSON).write_text(record.to_json(), encoding="utf-8")
    return folder


def make_results(root: str | Path, problems: bool = True, model: str = MODEL, pretrained: str = PRETRAINED,
                 device: str = "cuda:0") -> Path:
    """Write a results directory: full, VisionZip 192/64 and Random 64 on GQA, MME and POPE; with
    ``problems``, also one failed run (Random 64 GQA) and two incomplete ones (VisionZip 128:
    a ``.partial`` folder and a folder without run.json)."""
    root = Path(root)
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    (root / "locks").mkdir(exist_ok=True)
    for (method, budget), tasks in SCORES.items():
        tokens = FULL_TOKENS if budget == "full" else int(budget)
        for task, metrics in tasks.items():
            if problems and (method, budget, task) == FAILED:
                write_run(runs, model, pretrained, method, budget, task, None, status="failed",
                          error=FAILED_ERROR, device=device)
                continue
            write_run(runs, model, pretrained, method, budget, task, metrics, tokens=tokens, device=device)
    if problems:
        method, budget, task = INCOMPLETE_PARTIAL
        write_run(runs, model, pretrained, method, budget, task, None, status="incomplete", write_run_json=False,
                  folder_name=records.partial_name(run_id(model, method, budget, task), 4242, 1767000000))
        method, budget, task = INCOMPLETE_NO_RUN_JSON
        write_run(runs, model, pretrained, method, budget, task, None, status="incomplete", write_run_json=False)
    return root
