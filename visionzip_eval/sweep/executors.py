"""Where runs execute: in this process, one worker process per local device, Slurm jobs
(submitit), or `accelerate launch` per run. Every path ends in ``execute_run`` (or, for
accelerate, the same folder protocol around a subprocess), so results look the same."""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

from visionzip_eval import records
from visionzip_eval.sweep.config import SweepConfig
from visionzip_eval.sweep.plan import Run, model_spec
from visionzip_eval.sweep.runner import ModelCache, Outcome, execute_run, model_args, resolve_device


def shard(runs: list[Run], count: int) -> list[list[Run]]:
    """Split into ``count`` contiguous shards: runs of one model stay together, so each
    worker loads as few models as possible."""
    count = max(1, min(count, len(runs)))
    size, extra = divmod(len(runs), count)
    shards, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        shards.append(runs[start:end])
        start = end
    return [s for s in shards if s]


def budget_problems(config: SweepConfig, cache: ModelCache, runs: list[Run]) -> dict[str, str]:
    """Run id -> why the model cannot serve the run's method and budget (a budget larger than
    its tower, a method whose signal its tower lacks); ``runs`` are of one model, loaded here
    (the cache keeps it for the runs)."""
    from visionzip_eval.backends import backend_for

    backend = backend_for(cache.get(model_spec(config, runs[0].model))[0])
    problems = {}
    for run in runs:
        try:
            run.method.build(run.budget, seed=run.seed).check(backend)
        except ValueError as error:
            problems[run.id] = f"{run.model} / {run.method.label} / {run.budget.label}: {error}"
    return problems


def execute_runs(config: SweepConfig, output_dir: Path, runs: list[Run], cache: ModelCache,
                 emit: Callable[[Outcome], None]) -> list[Outcome]:
    """A worker's runs in order. Each model's methods and budgets are checked against its tower
    when it loads: a problem with the first model is an error before anything runs; with a later
    one, its impossible runs fail with the reason and the rest go on."""
    outcomes, checked = [], {}

    def record(outcome: Outcome) -> None:
        outcomes.append(outcome)
        emit(outcome)

    for run in runs:
        if run.model not in checked:
            problems = budget_problems(config, cache, [r for r in runs if r.model == run.model])
            if problems and not outcomes:
                first = next(iter(problems.values()))
                more = f" (and {len(problems) - 1} more runs)" if len(problems) > 1 else ""
                raise ValueError(f"{first}{more}: fix the config's methods or budgets; nothing was run")
            checked[run.model] = problems
        if run.id in checked[run.model]:
            record(Outcome(run.id, "failed", error=checked[run.model][run.id]))
            continue
        record(execute_run(run, config, Path(output_dir), cache))
    return outcomes


def run_shard(config: SweepConfig, output_dir: str, runs: list[Run], device: str, queue=None) -> list[Outcome]:
    """A worker: one model cache, its runs in order. Picklable (multiprocessing, submitit)."""
    emit = queue.put if queue is not None else (lambda outcome: None)
    try:
        return execute_runs(config, Path(output_dir), runs, ModelCache(resolve_device(device)), emit)
    except ValueError as error:  # this worker's first model cannot serve its runs
        outcomes = [Outcome(run.id, "failed", error=str(error)) for run in runs]
        for outcome in outcomes:
            emit(outcome)
        return outcomes


def run_local(
    config: SweepConfig, output_dir: Path, runs: list[Run], on_outcome: Callable[[Outcome], None]
) -> list[Outcome]:
    devices = config.executor.devices
    if config.executor.accelerate:
        return run_accelerate(config, output_dir, runs, on_outcome)
    if len(devices) == 1:
        return execute_runs(config, output_dir, runs, ModelCache(resolve_device(devices[0])), on_outcome)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=run_shard, args=(config, str(output_dir), part, device, queue))
        for part, device in zip(shard(runs, len(devices)), devices)
    ]
    for worker in workers:
        worker.start()
    outcomes: list[Outcome] = []
    while len(outcomes) < len(runs):
        try:
            outcome = queue.get(timeout=1.0)
        except queue_module.Empty:
            if not any(w.is_alive() for w in workers) and queue.empty():
                break
            continue
        outcomes.append(outcome)
        on_outcome(outcome)
    for worker in workers:
        worker.join()
    done = {o.run_id for o in outcomes}
    for run in runs:  # a worker that died (e.g. killed by the OOM killer) leaves its runs undone
        if run.id not in done:
            outcome = Outcome(run.id, "failed", error="worker process died before finishing this run")
            outcomes.append(outcome)
            on_outcome(outcome)
    return outcomes


def run_slurm(
    config: SweepConfig,
    output_dir: Path,
    runs: list[Run],
    on_outcome: Callable[[Outcome], None],
    cluster: str | None = None,
) -> list[Outcome]:
    """One Slurm array task per shard through submitit; ``cluster="debug"`` or ``"local"``
    runs the same jobs on this machine (tests, dry rehearsals)."""
    import submitit

    options = config.executor.slurm
    executor = submitit.AutoExecutor(folder=str(Path(output_dir) / "slurm" / "%j"), cluster=cluster)
    parameters = dict(timeout_min=options.time_min, slurm_array_parallelism=options.array_parallelism)
    if executor.cluster == "slurm":
        parameters.update(
            slurm_partition=options.partition,
            gpus_per_node=options.gpus_per_job,
            cpus_per_task=options.cpus_per_task,
            mem_gb=options.mem_gb,
            **({"slurm_account": options.account} if options.account else {}),
            **options.extra,
        )
    executor.update_parameters(name=f"visionzip-{config.name}", **parameters)
    parts = shard(runs, options.jobs)
    jobs = executor.map_array(
        run_shard, [config] * len(parts), [str(output_dir)] * len(parts), parts, ["auto"] * len(parts)
    )
    outcomes = []
    for job, part in zip(jobs, parts):
        try:
            results = job.result()
        except Exception as error:  # the whole job failed (preempted, timed out)
            results = [Outcome(run.id, "failed", error=f"slurm job {job.job_id}: {error}") for run in part]
        for outcome in results:
            on_outcome(outcome)
            outcomes.append(outcome)
    return outcomes


def accelerate_command(config: SweepConfig, run: Run, work: Path) -> list[str]:
    """``accelerate launch -m lmms_eval ...`` for one run (data parallel over the processes)."""
    args = model_args(config, run, work)
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(config.executor.accelerate_processes),
        "-m", "lmms_eval",
        "--model", "visionzip",
        "--model_args", ",".join(f"{k}={v}" for k, v in args.items()),
        "--tasks", run.task,
        "--batch_size", str(config.lmms_eval.batch_size),
        "--output_path", str(work / records.LMMS_EVAL_DIR),
        "--seed", str(run.seed),
    ]
    if config.lmms_eval.log_samples:
        command.append("--log_samples")
    if run.limit is not None:
        command += ["--limit", str(run.limit)]
    if config.include_path:
        command += ["--include_path", config.include_path]
    if config.lmms_eval.gen_kwargs:
        command += ["--gen_kwargs", config.lmms_eval.gen_kwargs]
    return command


def evaluate_with_accelerate(run: Run, config: SweepConfig, cache: ModelCache, work: Path) -> dict:
    from visionzip_eval.sweep.results import check_results, load_checked

    command = accelerate_command(config, run, work)
    (work / "command.txt").write_text(shlex.join(command) + "\n")
    with open(work / records.RUN_LOG, "a") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    _, results = load_checked(work / records.LMMS_EVAL_DIR, [run.task])  # judged by files, not exit code
    return {"metrics": check_results(results, [run.task])[run.task]}


def run_accelerate(
    config: SweepConfig, output_dir: Path, runs: list[Run], on_outcome: Callable[[Outcome], None]
) -> list[Outcome]:
    """Each run in its own ``accelerate launch`` (the model loads per run in this mode)."""
    outcomes = []
    for run in runs:
        outcome = execute_run(run, config, output_dir, ModelCache("launcher"), evaluate=evaluate_with_accelerate)
        on_outcome(outcome)
        outcomes.append(outcome)
    return outcomes
