"""Judging an lmms-eval run by what it wrote, never by its exit code.

lmms-eval can exit 0 when a task failed (dataset unreachable, missing module): a run counts
as done only when its results JSON holds a metric for every task asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

from visionzip_eval.records import RESULTS_SUFFIX, newest_results_file, task_metrics


class RunFailed(RuntimeError):
    """An lmms-eval run did not produce what it was asked for."""


def latest_results_file(output_path: str | Path) -> Path:
    """The newest ``*_results.json`` lmms-eval wrote under ``output_path`` (the run folder's
    rule, ``records.newest_results_file``)."""
    path = newest_results_file(Path(output_path))
    if path is None:
        raise RunFailed(
            f"lmms-eval wrote no *{RESULTS_SUFFIX} under {output_path}: the run failed before scoring "
            "(see its log for the first error)"
        )
    return path


def check_results(results: dict, tasks: list[str]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for every task, or RunFailed naming the ones missing."""
    metrics = {task: task_metrics(results, task) for task in tasks}
    missing = [task for task, values in metrics.items() if not values]
    if missing:
        raise RunFailed(
            f"lmms-eval produced no metric for {', '.join(missing)} (it exits 0 when a task fails: "
            "check the task name, --include_path and the dataset files)"
        )
    return metrics


def load_checked(output_path: str | Path, tasks: list[str]) -> tuple[Path, dict]:
    path = latest_results_file(output_path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunFailed(f"{path} is not valid JSON ({error}): the run was interrupted while writing") from error
    check_results(results, tasks)
    return path, results
