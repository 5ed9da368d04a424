"""Task names checked when a sweep is planned, against lmms-eval's task index.

lmms-eval resolves a task name only when a run starts (after the model loads), and an unknown
one fails every run with ``KeyError: 'name'``. ``check_tasks`` looks the names up first: in
lmms-eval's built-in tasks plus the config's ``include_path`` (tasks, groups and tags alike),
and suggests close matches. Building the index takes several seconds (it imports lmms-eval and
reads every task YAML), so it is built once per process and ``include_path``.
"""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path

from visionzip_eval.sweep.config import ConfigError, SweepConfig


@cache
def task_manager(include_path: str | None = None):
    """lmms-eval's task index for ``include_path``, built once per process and shared by the
    name check and every run of the process (built per run, it was most of a small run's time)."""
    from lmms_eval.tasks import TaskManager
    from loguru import logger

    logger.disable("lmms_eval")  # the index logs a DEBUG line per YAML it cannot read as a task
    try:
        return TaskManager("WARNING", include_path=include_path)
    finally:
        logger.enable("lmms_eval")


def known_tasks(include_path: str | None = None) -> frozenset[str]:
    """Every name lmms-eval can run with this ``include_path``: tasks, groups and tags."""
    return frozenset(task_manager(include_path).all_tasks)


def unknown_tasks(tasks: list[str], include_path: str | None = None) -> list[str]:
    known = known_tasks(include_path)
    return [task for task in dict.fromkeys(tasks) if task not in known]


def check_tasks(config: SweepConfig, source: str | None = None) -> None:
    """ConfigError (one line, naming ``source``: the config file) unless every task of
    ``config`` is one lmms-eval knows, with the closest known names as suggestions."""
    unknown = unknown_tasks(config.tasks, config.include_path)
    if not unknown:
        return
    known = sorted(known_tasks(config.include_path))
    guesses = {task: difflib.get_close_matches(task, known, n=1) for task in unknown}
    if len(unknown) == 1:
        task = unknown[0]
        what = f"unknown task '{task}'" + (f": did you mean {guesses[task][0]}?" if guesses[task] else "")
    else:
        what = "unknown tasks " + ", ".join(
            f"'{task}'" + (f" (did you mean {guesses[task][0]}?)" if guesses[task] else "") for task in unknown
        )
    if config.include_path is None:
        where = "include_path, which this config does not set"
    elif not Path(config.include_path).is_dir():
        where = f"include_path {config.include_path}, which is not a folder"
    else:
        where = f"include_path {config.include_path}"
    raise ConfigError(
        f"{source or f'sweep {config.name}'}: {what} "
        f"(tasks come from lmms-eval and {where}; fix the name or add its YAML under include_path)"
    )
