"""``visionzip-eval lmms ARGS...``: lmms-eval's own command line, judged by the files it wrote.

``python -m lmms_eval`` exits 0 when a task failed or the model raised (it prints the traceback
and carries on), so CI cannot trust its exit code. This runs the same command in a subprocess
(ARGS unchanged; lmms-eval keeps its process-wide state -- loguru handlers, seeds, ``sys.argv``,
which the adapter reads for ``--output_path`` -- to itself, and its ``sys.exit`` calls end only
it), passes its output through with Python tracebacks held back, and then checks the
``*_results.json`` this run wrote: a metric for every task asked for. The verdict is one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from visionzip_eval.records import task_metrics
from visionzip_eval.sweep.results import RunFailed

_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


class TracebackFilter:
    """Passes text through line by line, dropping Python traceback blocks; remembers the last
    exception line (``ValueError: ...``) so the verdict can name it."""

    def __init__(self, write) -> None:
        self.write = write
        self.skipping = False
        self.after_exception = False
        self.last_exception: str | None = None

    def feed(self, segment: str) -> None:
        line = segment.rstrip("\r\n")
        if self.skipping:
            if not line or line[0].isspace():
                return
            self.last_exception, self.skipping, self.after_exception = line.strip(), False, True
            return
        if line.lstrip().startswith(("Traceback (most recent call last):", "+ Exception Group Traceback")):
            self.skipping = True
            return
        if self.after_exception and (not line.strip() or line.startswith(_CHAINED)):
            return  # the blank line and the "During handling..." between chained tracebacks
        self.after_exception = False
        self.write(segment)


def _pump(stream, sink: TracebackFilter) -> None:
    """Copy ``stream`` (binary) through ``sink`` as it arrives, split after every \\n or \\r so
    progress bars still move."""
    pending = b""
    while chunk := stream.read1(65536):
        pending += chunk
        *parts, pending = re.split(rb"(?<=[\r\n])", pending)
        for part in parts:
            sink.feed(part.decode("utf-8", "replace"))
    if pending:
        sink.feed(pending.decode("utf-8", "replace"))


def _eval_args(argv: list[str]) -> argparse.Namespace | None:
    """The few lmms-eval options the verdict needs, or None when ARGS ask for no evaluation
    (``--help``, ``tasks``, ``--tasks list``, ...). Values from ``--config`` fill what the command
    line leaves out, as lmms-eval does."""
    parser = argparse.ArgumentParser(add_help=False)
    for name in ("--tasks", "--output_path", "--config", "--verbosity"):
        parser.add_argument(name, default=None)
    parser.add_argument("--predict_only", "-x", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        import yaml

        try:
            loaded = yaml.safe_load(Path(known.config).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"--config {known.config}: cannot read it ({error})") from None
        for entry in loaded if isinstance(loaded, list) else [loaded]:
            for key in ("tasks", "output_path"):
                if isinstance(entry, dict) and getattr(known, key) is None and entry.get(key) is not None:
                    value = entry[key]
                    setattr(known, key, ",".join(value) if isinstance(value, list) else str(value))
    if known.help or not known.tasks or known.tasks.startswith("list") or (argv and not argv[0].startswith("-")
                                                                          and argv[0] != "eval"):
        return None
    return known


def _results_files(output_path: str) -> dict[Path, float]:
    root = Path(output_path)
    return {path: path.stat().st_mtime for path in root.rglob("*_results.json")} if root.is_dir() else {}


def judge(results: dict, tasks: list[str], predict_only: bool = False) -> None:
    """RunFailed (one line) unless every task asked for ran and (unless predict-only) scored.
    A name may be a task, a group (judged by its subtasks) or a tag of the tasks that ran."""
    configs = results.get("configs") or {}
    groups = results.get("group_subtasks") or {}
    tags = {tag for config in configs.values() if isinstance(config, dict)
            for tag in ([config["tag"]] if isinstance(config.get("tag"), str) else config.get("tag") or [])}
    known = set(results.get("results") or {}) | set(groups) | set(configs) | tags
    missing = [task for task in tasks if "*" not in task and not os.path.exists(task) and task not in known]
    if missing:
        raise RunFailed(f"lmms-eval wrote results without {', '.join(missing)}: the task failed to load "
                        "(check the task name, --include_path and the dataset files)")
    if not configs:
        raise RunFailed("lmms-eval wrote results for no task")
    unscored = [] if predict_only else [task for task in configs if not task_metrics(results, task)]
    if unscored:
        raise RunFailed(f"lmms-eval produced no metric for {', '.join(unscored)}")


def run_lmms_eval(argv: list[str], python: str = sys.executable) -> int:
    """Run ``python -m lmms_eval ARGV``; 0 when it wrote a fresh results file with a metric for
    every task asked for, else RunFailed (one line). ARGS that ask for no evaluation (help,
    listings) return lmms-eval's own exit code."""
    known = _eval_args(argv)
    if known is not None and not known.output_path:
        raise ValueError("visionzip-eval lmms judges a run by the results file lmms-eval writes: add "
                         "--output_path DIR")
    before = _results_files(known.output_path) if known else {}
    debug = known is not None and (known.verbosity or "").upper() == "DEBUG"
    process = subprocess.Popen([python, "-m", "lmms_eval", *argv], stderr=None if debug else subprocess.PIPE)
    stderr = TracebackFilter(lambda text: (sys.stderr.write(text), sys.stderr.flush()))
    try:
        if process.stderr is not None:
            _pump(process.stderr, stderr)
        code = process.wait()
    except KeyboardInterrupt:  # the child got the same SIGINT: let it finish dying
        process.wait()
        raise
    if known is None:
        return code
    reason = f" ({stderr.last_exception})" if stderr.last_exception else ""
    hint = "" if debug else "; add --verbosity DEBUG for lmms-eval's traceback" if reason else ""
    if code != 0:
        raise RunFailed(f"lmms-eval exited with status {code}{reason}{hint}")
    fresh = sorted((path for path, mtime in _results_files(known.output_path).items() if before.get(path) != mtime),
                   key=lambda path: path.stat().st_mtime)
    if not fresh:
        raise RunFailed(f"lmms-eval wrote no results file under {known.output_path}: the run failed before "
                        f"scoring{reason}{hint}")
    try:
        results = json.loads(fresh[-1].read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunFailed(f"{fresh[-1]} is not valid JSON ({error}): the run was interrupted while writing") from None
    judge(results, [task.strip() for task in known.tasks.split(",") if task.strip()], known.predict_only)
    print(f"visionzip-eval lmms: ok, results in {fresh[-1]}", file=sys.stderr)
    return 0
