"""Executing runs: model loaded once per worker, every run in its own folder, atomically.

Folder protocol under ``OUTPUT/runs/``:
- a run works in ``.<id>.partial-<pid>-<time>/`` while holding ``OUTPUT/locks/<id>.lock``;
- it writes ``config.yaml``, ``run.log``, lmms-eval's results and samples, ``efficiency.jsonl``,
  then ``run.json`` (``records.RunRecord``: status, identity, metrics, timings, versions, and
  the machine's speed and load around the run, and the roofline facts) last, by atomic rename;
- then the folder is renamed to ``<id>/`` (atomic). A run is complete when ``<id>/run.json``
  says ``ok``. A killed run leaves only a partial folder, which the next attempt deletes
  (it can tell the folder is stale: nobody holds the lock). A failed run lands with status
  ``failed`` and its error, and is redone by the next sweep.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from visionzip_eval import records
from visionzip_eval.records import STATUS_FAILED, STATUS_OK, RunRecord, read_run_json
from visionzip_eval.sweep.config import ModelSpec, SweepConfig
from visionzip_eval.sweep.plan import Run, model_spec
from visionzip_eval.sweep.tasks import task_manager


@dataclass
class Outcome:
    run_id: str
    status: str  # ok, failed, skipped (already complete), busy (another sweep holds it)
    seconds: float = 0.0
    error: str | None = None


def _loguru_handlers(logger) -> set[int]:
    """Ids of the loguru handlers installed now."""
    return set(logger._core.handlers)  # no public accessor; stable since loguru 0.4


def run_dir(output_dir: Path, run: Run) -> Path:
    return Path(output_dir) / records.RUNS_DIR / run.id


def noisy_runs(output_dir: Path, runs: list[Run]) -> dict[str, str]:
    """Run id -> why, for the complete runs of ``runs`` timed on a noisy machine (judged as the
    report judges them: against the median probe of these runs)."""
    import pandas as pd

    from visionzip_eval.noise import flag_noisy, probe_columns

    rows = []
    for run in runs:
        info = read_run_json(run_dir(output_dir, run))
        if info is not None and info.get("status") == STATUS_OK:
            rows.append(dict(run_id=run.id, device=info.get("device"), **probe_columns(info.get("machine"))))
    if not rows:
        return {}
    flagged = flag_noisy(pd.DataFrame(rows))
    return dict(zip(flagged.loc[flagged["noisy"], "run_id"], flagged.loc[flagged["noisy"], "noise"]))


def is_complete(output_dir: Path, run: Run) -> bool:
    info = read_run_json(run_dir(output_dir, run))
    return info is not None and info.get("status") == STATUS_OK


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("visionzip-eval", "torch", "transformers", "lmms-eval"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


class ModelCache:
    """Keeps the last loaded model of this worker; a new model replaces it."""

    def __init__(self, device: str):
        self.device = device
        self.loads = 0
        self._name: str | None = None
        self._loaded = None

    def get(self, spec: ModelSpec):
        if self._name != spec.name:
            from visionzip_eval.loading import load_pretrained, resolve_device, resolve_dtype

            self._loaded = None  # free the previous model first
            device = resolve_device(self.device)
            self._loaded = load_pretrained(
                spec.pretrained, resolve_dtype(spec.dtype, device), device, spec.attn_implementation
            )
            self._name = spec.name
            self.loads += 1
        return self._loaded


def resolve_device(device: str) -> str:
    """A worker's device, as its name (``loading.resolve_device``)."""
    from visionzip_eval.loading import resolve_device as resolve

    return str(resolve(device))


def model_args(config: SweepConfig, run: Run, work: Path) -> dict:
    """The adapter's model_args for one run, as plain values (what ``--model_args`` carries):
    the one place both executors, in-process and ``accelerate launch``, take them from.
    ``batch_size`` is not among them: lmms-eval passes its own ``--batch_size`` to the adapter."""
    spec = model_spec(config, run.model)
    return {
        "pretrained": spec.pretrained,
        "budget": run.budget.label,
        "method": run.method.name,
        **dict(run.method.options),
        "dtype": spec.dtype,
        "seed": run.seed,
        "max_new_tokens": config.lmms_eval.max_new_tokens,
        "warmup": config.lmms_eval.warmup,
        "output_dir": str(work),
        **({"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}),
        **spec.args,
    }


def evaluate_in_process(run: Run, config: SweepConfig, cache: ModelCache, work: Path) -> dict:
    """lmms-eval's simple_evaluate on this worker's cached model; returns metrics."""
    from lmms_eval import evaluator
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.utils import get_datetime_str

    from visionzip_eval.lmms.adapter import VisionZipLMM
    from visionzip_eval.sweep.results import check_results

    options = config.lmms_eval
    lm = VisionZipLMM(
        model=cache.get(model_spec(config, run.model)),
        device=cache.device,
        batch_size=options.batch_size,
        **model_args(config, run, work),
    )
    try:
        tracker = EvaluationTracker(output_path=str(work / records.LMMS_EVAL_DIR))
        stamp = get_datetime_str()
        results = evaluator.simple_evaluate(
            model=lm,
            tasks=[run.task],
            limit=run.limit,
            log_samples=options.log_samples,
            evaluation_tracker=tracker,
            task_manager=task_manager(config.include_path),
            gen_kwargs=options.gen_kwargs,
            bootstrap_iters=options.bootstrap_iters,
            random_seed=run.seed,
            numpy_random_seed=run.seed,
            torch_random_seed=run.seed,
            fewshot_random_seed=run.seed,
            verbosity="WARNING",
            datetime_str=stamp,
            # what lmms-eval's CLI would pass: task aggregations write submission files under
            # output_path (MMBench), never into the current directory
            cli_args=argparse.Namespace(output_path=str(work / records.LMMS_EVAL_DIR), process_with_media=False),
        )
        if results is None:
            raise RuntimeError("lmms-eval returned no results")
        samples = results.pop("samples", None)
        tracker.save_results_aggregated(results=results, samples=samples, datetime_str=stamp)
        if samples:
            for task_name in results.get("configs", {}):
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        metrics = check_results(results, [run.task])[run.task]
        return {"metrics": metrics, "efficiency": lm.efficiency.summary(), "roofline": _roofline_facts(lm)}
    finally:
        lm.engine.close()  # removes the hooks: the cached model is clean for the next run


def _roofline_facts(lm) -> dict:
    """What the report's roofline needs about this model (``roofline.describe``); {} if the
    model defies description: a bound is never worth a failed run."""
    from loguru import logger

    from visionzip_eval.roofline import describe

    try:
        return describe(lm.engine.backend, lm.engine.device)
    except Exception as error:  # noqa: BLE001
        logger.warning(f"no roofline facts recorded: {type(error).__name__}: {error}")
        return {}


def _tuning(pretrained: str) -> dict | None:
    """What ``visionzip-eval tune`` recorded in the checkpoint folder, read now (a relative folder
    resolves against this directory, where the sweep runs), so the report needs no checkpoint."""
    if pretrained.startswith("builtin:"):
        return None
    from visionzip_eval.tuning import read_tuning

    return read_tuning(pretrained)


def execute_run(run: Run, config: SweepConfig, output_dir: Path, cache: ModelCache, evaluate=None) -> Outcome:
    """Run once under the folder protocol; ``evaluate(run, config, cache, work)`` does the work."""
    evaluate = evaluate or evaluate_in_process
    from loguru import logger

    output_dir = Path(output_dir)
    final = run_dir(output_dir, run)
    if is_complete(output_dir, run) and not run.redo:
        return Outcome(run.id, "skipped")
    (output_dir / records.LOCKS_DIR).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(output_dir / records.LOCKS_DIR / f"{run.id}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return Outcome(run.id, "busy")
    try:
        if is_complete(output_dir, run) and not run.redo:  # finished by another sweep while we waited
            return Outcome(run.id, "skipped")
        for stale in final.parent.glob(records.partial_name(run.id, "*", "*")):
            shutil.rmtree(stale, ignore_errors=True)  # we hold the lock: nobody is writing it
        work = final.parent / records.partial_name(run.id, os.getpid(), int(time.time()))
        work.mkdir(parents=True)
        spec = model_spec(config, run.model)
        resolved = {
            "run": run.identity(),
            "model": spec.model_dump(),
            "include_path": config.include_path,
            "lmms_eval": config.lmms_eval.model_dump(),
            "device": cache.device,
            "sweep": config.name,
        }
        (work / records.CONFIG_YAML).write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
        import lmms_eval.models  # noqa: F401  (its import removes every loguru handler: do it first)

        from visionzip_eval.profiling import machine_probe, machine_record

        probe_device = cache.device if cache.device != "launcher" else "cpu"  # accelerate: runs elsewhere
        probe = machine_probe(probe_device)
        started = time.time()
        outcome = {"status": STATUS_OK, "error": None}
        # The run's own output (lmms-eval's logs and progress bars) goes to its run.log; the
        # console keeps the sweep's progress bar only.
        with open(work / records.RUN_LOG, "a", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log):
            handlers = _loguru_handlers(logger)
            logger.add(log, level="INFO", enqueue=False)
            try:
                outcome.update(evaluate(run, config, cache, work))
            except Exception as error:  # one failed run never stops the sweep
                outcome.update(status=STATUS_FAILED, error=f"{type(error).__name__}: {error}")
                logger.error(f"run {run.id} failed:\n{traceback.format_exc()}")
            finally:
                # ours, and any a library added while stdout/stderr were this run's log: each
                # would outlive the file and fail every later run's logging
                for handler in _loguru_handlers(logger) - handlers:
                    logger.remove(handler)
        finished = time.time()
        record = RunRecord(
            status=outcome["status"],
            error=outcome["error"],
            metrics=outcome.get("metrics") or {},
            efficiency=outcome.get("efficiency") or {},
            identity=run.identity(),
            run_id=run.id,
            started=started,
            finished=finished,
            seconds=finished - started,
            device=cache.device,
            versions=_versions(),
            machine=machine_record(probe, machine_probe(probe_device)),
            roofline=outcome.get("roofline") or {},
            tuning=_tuning(spec.pretrained),
        )
        records.write_atomic(work / records.RUN_JSON, record.to_json())
        if final.exists():  # an earlier failed attempt: replaced only now that this one landed
            old = final.parent / records.replaced_name(run.id, int(time.time()))
            os.rename(final, old)
            os.rename(work, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(work, final)
        return Outcome(run.id, record.status, record.seconds, record.error)
    finally:
        lock.release()
