"""Sweeps: models x methods x budgets x tasks from one YAML, resumable, on one device, many
local devices, or Slurm. ``config`` validates, ``plan`` expands, ``runner`` executes one run
under the folder protocol, ``executors`` decide where."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from visionzip_eval.sweep.config import ConfigError, SweepConfig, load_config
from visionzip_eval.sweep.plan import Run, format_plan, plan
from visionzip_eval.sweep.runner import Outcome, is_complete, noisy_runs
from visionzip_eval.sweep.tasks import check_tasks


@dataclass
class SweepSummary:
    planned: int
    already_complete: int
    outcomes: list[Outcome] = field(default_factory=list)
    rerun_noisy: int = 0  # complete runs run again because they were timed on a noisy machine

    @property
    def counts(self) -> Counter:
        return Counter(o.status for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in ("failed", "busy")]

    def describe(self) -> str:
        counts = self.counts
        parts = [f"{self.planned} planned", f"{self.already_complete} already complete (skipped)"]
        if self.rerun_noisy:
            parts.append(f"{self.rerun_noisy} noisy ones run again")
        parts += [f"{counts[k]} {k}" for k in ("ok", "failed", "busy", "skipped") if counts.get(k)]
        lines = [", ".join(parts)]
        for outcome in self.failed:
            why = outcome.error or "another sweep is running it (lock held)"
            lines.append(f"  {outcome.status}: {outcome.run_id}: {why}")
        return "\n".join(lines)


def run_sweep(config: SweepConfig, output_dir: str | Path | None = None, progress: bool = True,
              slurm_cluster: str | None = None, rerun_noisy: bool = False) -> SweepSummary:
    """Run what is not complete yet; with ``rerun_noisy`` also the complete runs timed on a noisy
    machine (each is replaced only once its new attempt has landed)."""
    from visionzip_eval.sweep.executors import run_local, run_slurm

    output_dir = Path(output_dir or config.output_dir)
    runs = plan(config)
    check_tasks(config)  # an unknown task is a one-line error here, not a KeyError per run after the model loads
    noisy = noisy_runs(output_dir, runs) if rerun_noisy else {}
    todo = [replace(run, redo=True) if run.id in noisy else run
            for run in runs if run.id in noisy or not is_complete(output_dir, run)]
    summary = SweepSummary(planned=len(runs), already_complete=len(runs) - len(todo), rerun_noisy=len(noisy))
    if not todo:
        return summary
    # file= binds the real stderr now: each run redirects stderr into its own run.log.
    bar = tqdm(total=len(todo), desc=f"sweep {config.name}", unit="run", disable=not progress, file=sys.stderr)

    def on_outcome(outcome: Outcome) -> None:
        bar.set_postfix_str(f"{outcome.status}: {outcome.run_id[:60]}")
        bar.update(1)

    try:
        if config.executor.kind == "slurm":
            summary.outcomes = run_slurm(config, output_dir, todo, on_outcome, cluster=slurm_cluster)
        else:
            summary.outcomes = run_local(config, output_dir, todo, on_outcome)
    finally:
        bar.close()
    return summary


__all__ = [
    "ConfigError", "Run", "SweepConfig", "SweepSummary", "check_tasks", "format_plan", "load_config", "plan",
    "run_sweep",
]
