"""Expanding a sweep config into runs, each with a stable identity and folder name."""

from __future__ import annotations

from dataclasses import dataclass

from visionzip_eval import records
from visionzip_eval.budget import Budget
from visionzip_eval.methods.registry import NONE, MethodSpec
from visionzip_eval.sweep.config import ModelSpec, SweepConfig


@dataclass(frozen=True)
class Run:
    """One (model, method, budget, task, limit, seed): one lmms-eval evaluation. Method and
    budget are typed; their labels name the run (``method`` carries non-default options:
    ``vispruner,important_ratio=0.3``)."""

    model: str
    method: MethodSpec
    budget: Budget
    task: str
    limit: int | None
    seed: int
    redo: bool = False  # run again even if complete (``--rerun-noisy``); not part of the identity

    @property
    def id(self) -> str:
        return records.run_id(self.model, self.method.label, self.budget.label, self.task, self.limit, self.seed)

    def identity(self) -> dict:
        """The identity as plain values (run.json, config.yaml, --dry-run --json)."""
        return dict(model=self.model, method=self.method.label, budget=self.budget.label, task=self.task,
                    limit=self.limit, seed=self.seed)

    def method_options(self) -> dict:
        return dict(self.method.options)


def plan(config: SweepConfig) -> list[Run]:
    """All runs, ordered so each model loads once and budgets switch as rarely as possible.
    ``full`` does not depend on the method: it is planned once, with method ``none``."""
    runs: list[Run] = []
    seen: set[Run] = set()
    for model in config.models:
        for seed in config.seeds:
            for budget in config.budgets:
                for method in config.methods:
                    method = MethodSpec(NONE) if budget.is_full else method
                    for task in config.tasks:
                        run = Run(model.name, method, budget, task, config.limit, seed)
                        if run not in seen:
                            seen.add(run)
                            runs.append(run)
    return runs


def model_spec(config: SweepConfig, name: str) -> ModelSpec:
    for spec in config.models:
        if spec.name == name:
            return spec
    raise KeyError(name)


def format_plan(runs: list[Run]) -> str:
    lines = ["| # | model | method | budget | task | limit | seed | folder |", "|" + "---|" * 8]
    for index, run in enumerate(runs, 1):
        lines.append(
            f"| {index} | {run.model} | {run.method.label} | {run.budget.label} | {run.task} "
            f"| {run.limit if run.limit is not None else 'all'} | {run.seed} | runs/{run.id} |"
        )
    return "\n".join(lines)
