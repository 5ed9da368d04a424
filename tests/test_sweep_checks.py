"""A sweep refuses, before anything runs, a method or budget its model cannot serve."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_sweep import write_config  # noqa: E402

from visionzip_eval.cli import main  # noqa: E402


def test_budget_larger_than_the_tower_is_one_line_before_any_run(tmp_path, capsys):
    path = write_config(tmp_path, budgets=["full", 600], tasks=["visionzip_smoke_pope"])
    assert main(["sweep", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "tiny / visionzip / 600: budget 506+94=600 exceeds the vision tower's 577 tokens" in err[0]
    assert "nothing was run" in err[0]
    runs = tmp_path / "out" / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # not even the valid full run started


def test_method_without_its_signal_is_refused_before_any_run(tmp_path, capsys):
    models = [{"name": "ov", "pretrained": "builtin:tiny-llava-onevision", "dtype": "float32"}]
    path = write_config(tmp_path, models=models, methods=["fastervlm"], budgets=[32],
                        tasks=["visionzip_smoke_pope"])
    assert main(["sweep", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ov / fastervlm / 32: method 'fastervlm' ranks patches by the [CLS] token's attention" in err
    assert "\n" not in err


def test_rerun_noisy_runs_only_the_noisy_complete_runs(tmp_path, capsys):
    import json

    from visionzip_eval.records import read_run_json
    from synthetic import quiet_machine
    from visionzip_eval.sweep import load_config, plan, run_sweep

    config = load_config(write_config(tmp_path, tasks=["visionzip_smoke_pope"], limit=2))
    assert run_sweep(config, progress=False).counts["ok"] == 2
    runs_dir = tmp_path / "out" / "runs"
    full, reduced = plan(config)
    for run, machine in ((full, quiet_machine()), (reduced, quiet_machine(other_cpu_share=0.7))):
        info = read_run_json(runs_dir / run.id)
        info["machine"] = machine
        (runs_dir / run.id / "run.json").write_text(json.dumps(info))
    before = read_run_json(runs_dir / reduced.id)["finished"]

    assert run_sweep(config, progress=False).counts == {}  # complete: nothing to do without the flag
    summary = run_sweep(config, progress=False, rerun_noisy=True)
    assert summary.rerun_noisy == 1 and [o.run_id for o in summary.outcomes] == [reduced.id]
    assert "1 noisy ones run again" in summary.describe()
    again = read_run_json(runs_dir / reduced.id)
    assert again["status"] == "ok" and again["finished"] > before
    assert read_run_json(runs_dir / full.id)["machine"] == quiet_machine()  # the quiet run was left alone
    assert sorted(p.name for p in runs_dir.iterdir()) == sorted([full.id, reduced.id])  # no leftovers


def test_loguru_handlers_added_during_a_run_do_not_outlive_its_log(tmp_path):
    """A library that adds a loguru handler to stdout while a run's output goes to its run.log
    (lmms-eval's models package does so on import) must not leave it writing to a closed file:
    every later run's log then held a "Logging error ... I/O operation on closed file"."""
    from loguru import logger

    from visionzip_eval.sweep import load_config, plan
    from visionzip_eval.sweep.runner import ModelCache, execute_run

    def evaluate(run, config, cache, work):
        logger.add(sys.stdout, level="INFO")  # stdout is this run's run.log now
        logger.info(f"evaluating {run.id}")
        return {"metrics": {"exact_match,none": 1.0}}

    import lmms_eval.models  # noqa: F401  (its import replaces every handler: before the snapshot)

    config = load_config(write_config(tmp_path, tasks=["visionzip_smoke_pope"]))
    before = set(logger._core.handlers)
    first, second = plan(config)
    for run in (first, second):
        assert execute_run(run, config, tmp_path / "out", ModelCache("cpu"), evaluate=evaluate).status == "ok"
    logs = [(tmp_path / "out" / "runs" / run.id / "run.log").read_text() for run in (first, second)]
    assert f"evaluating {second.id}" in logs[1]
    assert not any("Logging error" in log or "closed file" in log for log in logs)
    assert set(logger._core.handlers) == before


def test_odd_limit_with_mme_is_refused_before_any_run(tmp_path, capsys):
    """lmms-eval's MME aggregation asserts on an unpaired question, after the whole run."""
    path = write_config(tmp_path, tasks=["visionzip_smoke_mme", "visionzip_smoke_pope"], limit=3)
    assert main(["sweep", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "limit 3 is odd, and MME (visionzip_smoke_mme) scores its questions in pairs: use an even limit (4)" in err
    assert "\n" not in err
    assert not (tmp_path / "out").exists()
    path = write_config(tmp_path, tasks=["visionzip_smoke_pope"], limit=3)
    assert main(["sweep", str(path), "--dry-run"]) == 0
