"""The sweep runner: config validation, planning, execution, resumption, failure handling."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from visionzip_eval.cli import main
from visionzip_eval.sweep import load_config, plan, run_sweep
from visionzip_eval.sweep.config import ConfigError
from visionzip_eval.sweep.executors import accelerate_command, shard
from visionzip_eval.sweep.runner import read_run_json

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path, **overrides):
    config = {
        "name": "t",
        "models": [{"name": "tiny", "pretrained": "builtin:tiny-llava", "dtype": "float32"}],
        "methods": ["visionzip"],
        "budgets": ["full", 64],
        "tasks": ["visionzip_smoke_pope", "visionzip_smoke_mme"],
        "include_path": str(REPO / "tasks"),
        "limit": 4,
        "output_dir": str(tmp_path / "out"),
        "lmms_eval": {"gen_kwargs": "max_new_tokens=2", "bootstrap_iters": 0, "warmup": 1},
    }
    config.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def complete_runs(out):
    return sorted(p.name for p in (Path(out) / "runs").iterdir() if (read_run_json(p) or {}).get("status") == "ok")


def test_shipped_configs_validate_and_plan():
    counts = {p.name: len(plan(load_config(p))) for p in sorted((REPO / "configs").glob("*.yaml"))}
    assert counts["smoke.yaml"] == 20
    assert counts["llava15_7b_paper.yaml"] == 4 * (1 + 6 * 3)  # full once, 6 methods x 3 budgets
    assert all(n > 0 for n in counts.values())


def test_dry_run_prints_the_plan(tmp_path, capsys):
    path = write_config(tmp_path, methods=["visionzip", "random"])
    assert main(["sweep", str(path), "--dry-run", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) == 2 * (1 + 2)  # full planned once for both methods
    assert {r["method"] for r in runs if r["budget"] == "full"} == {"none"}
    assert runs[0]["id"] == "tiny__none__full__visionzip_smoke_pope__limit-4__seed-0"
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "6 runs" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "mutation, message",
    [
        ({"budgetz": [64]}, "budgetz: unknown key"),
        ({"models": [{"name": "m", "pretrained": "p", "dtpye": "float16"}]}, "models.0.dtpye: unknown key"),
        ({"budgets": ["54+0"]}, "contextual must be >= 1"),
        ({"methods": ["fastvv"]}, "unknown method 'fastvv'"),
        ({"tasks": []}, "tasks: Value error, must list at least one entry"),
    ],
)
def test_malformed_config_is_a_one_line_error(tmp_path, capsys, mutation, message):
    path = write_config(tmp_path, **mutation)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and message in err[0]


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_sweep_runs_once_loads_model_once_and_resumes(tmp_path, monkeypatch):
    import visionzip_eval.loading as backends

    loads = []
    real = backends.load_pretrained
    monkeypatch.setattr(backends, "load_pretrained", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    config = load_config(write_config(tmp_path))
    summary = run_sweep(config, progress=False)
    assert summary.counts["ok"] == 4 and not summary.failed
    assert loads == ["builtin:tiny-llava"]  # one load for all four runs
    out = tmp_path / "out"
    assert complete_runs(out) == sorted(r.id for r in plan(config))
    run = out / "runs" / "tiny__visionzip__64__visionzip_smoke_pope__limit-4__seed-0"
    info = read_run_json(run)
    assert info["identity"]["budget"] == "64" and info["versions"]["torch"]
    assert set(info["metrics"]) >= {"pope_accuracy,none", "pope_f1_score,none"}
    assert (run / "config.yaml").is_file() and (run / "run.log").stat().st_size > 0
    assert list((run / "lmms_eval").rglob("*_results.json")) and list((run / "lmms_eval").rglob("*_samples_*.jsonl"))
    rows = [json.loads(line) for line in (run / "efficiency.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["visual_tokens"] for r in rows} == {64}
    # again: nothing to do, and it says so
    again = run_sweep(config, progress=False)
    assert again.already_complete == 4 and again.outcomes == []
    assert "4 already complete" in again.describe()


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    # a task lmms-eval fails at run time (the plan-time name check is what would catch this one)
    monkeypatch.setattr("visionzip_eval.sweep.tasks.unknown_tasks", lambda tasks, include_path=None: [])
    path = write_config(tmp_path, tasks=["visionzip_smoke_pope", "no_such_task_anywhere"], budgets=[64])
    assert main(["sweep", str(path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "1 ok" in out and "1 failed" in out and "no_such_task_anywhere" in out
    failed = read_run_json(tmp_path / "out" / "runs" / "tiny__visionzip__64__no_such_task_anywhere__limit-4__seed-0")
    assert failed["status"] == "failed" and failed["error"]
    assert complete_runs(tmp_path / "out") == ["tiny__visionzip__64__visionzip_smoke_pope__limit-4__seed-0"]


def test_a_run_locked_by_another_sweep_is_not_run_twice(tmp_path):
    config = load_config(write_config(tmp_path, tasks=["visionzip_smoke_pope"], budgets=[64]))
    run = plan(config)[0]
    (tmp_path / "out" / "locks").mkdir(parents=True)
    lock_path = tmp_path / "out" / "locks" / f"{run.id}.lock"
    ready = tmp_path / "ready"
    holder = subprocess.Popen([  # another process (another sweep) holds the run's lock
        sys.executable, "-c",
        "import sys, time, pathlib; from filelock import FileLock; "
        "l = FileLock(sys.argv[1]); l.acquire(); pathlib.Path(sys.argv[2]).touch(); time.sleep(60)",
        str(lock_path), str(ready),
    ])
    try:
        while not ready.exists():
            time.sleep(0.05)
        summary = run_sweep(config, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert [o.status for o in summary.outcomes] == ["busy"]
    assert not (tmp_path / "out" / "runs" / run.id).exists()
    assert "another sweep is running it" in summary.describe()


@pytest.mark.slow
def test_sigkill_midway_then_resume_gives_exactly_one_complete_run_each(tmp_path):
    path = write_config(tmp_path, budgets=["full", 128, 64])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, "-m", "visionzip_eval.cli", "sweep", str(path), "--quiet"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs_dir = tmp_path / "out" / "runs"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if runs_dir.is_dir() and len(complete_runs(tmp_path / "out")) >= 2:
            if any(p.name.startswith(".") for p in runs_dir.iterdir()):  # caught mid-run
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = complete_runs(tmp_path / "out")
    assert 2 <= len(done_before) < 6
    assert main(["sweep", str(path), "--quiet"]) == 0
    planned = sorted(r.id for r in plan(load_config(path)))
    assert complete_runs(tmp_path / "out") == planned
    assert sorted(p.name for p in runs_dir.iterdir()) == planned  # no partial folder left over
    for run_id in done_before:  # finished runs were not redone
        assert read_run_json(runs_dir / run_id)["finished"] < time.time()


def test_slurm_executor_through_submitit_debug(tmp_path):
    path = write_config(
        tmp_path, tasks=["visionzip_smoke_pope"], executor={"kind": "slurm", "slurm": {"jobs": 2, "time_min": 5}}
    )
    summary = run_sweep(load_config(path), progress=False, slurm_cluster="debug")
    assert summary.counts["ok"] == 2
    assert complete_runs(tmp_path / "out") == sorted(r.id for r in plan(load_config(path)))
    assert (tmp_path / "out" / "slurm").is_dir()


def test_shards_keep_runs_in_order_and_cover_all():
    runs = list(range(7))
    parts = shard(runs, 3)
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard(runs, 10) == [[r] for r in runs]


def test_accelerate_command(tmp_path):
    config = load_config(write_config(tmp_path, executor={"accelerate": True, "accelerate_processes": 4}))
    run = plan(config)[1]
    command = accelerate_command(config, run, tmp_path / "w")
    assert command[1:4] == ["-m", "accelerate.commands.launch", "--num_processes"] and command[4] == "4"
    assert "pretrained=builtin:tiny-llava,budget=full,method=none" in command[command.index("--model_args") + 1]
    assert command[command.index("--tasks") + 1] == run.task and "--log_samples" in command
    assert command[command.index("--include_path") + 1] == str(REPO / "tasks")


def test_both_executors_give_the_adapter_the_same_model_args(tmp_path, monkeypatch):
    """Non-default max_new_tokens and warmup reach the adapter under accelerate too (they were
    dropped there), and the in-process executor passes exactly what accelerate's command line does."""
    from visionzip_eval.lmms import adapter
    from visionzip_eval.sweep.runner import evaluate_in_process

    methods = [{"name": "vispruner", "important_ratio": 0.25}]
    config = load_config(write_config(
        tmp_path, methods=methods, budgets=[64], tasks=["visionzip_smoke_pope"],
        lmms_eval={"max_new_tokens": 7, "warmup": 3, "batch_size": 2},
        models=[{"name": "tiny", "pretrained": "builtin:tiny-llava", "dtype": "float32",
                 "attn_implementation": "eager", "args": {"max_frames": 5}}],
    ))
    (run,) = plan(config)
    command = accelerate_command(config, run, tmp_path / "w")
    launched = dict(pair.split("=", 1) for pair in command[command.index("--model_args") + 1].split(","))
    assert launched["max_new_tokens"] == "7" and launched["warmup"] == "3"
    assert command[command.index("--batch_size") + 1] == "2"

    received = {}

    class Stop(Exception):
        pass

    def recorder(**kwargs):
        received.update(kwargs)
        raise Stop

    class Cache:
        device = "cpu"

        def get(self, spec):
            return "the cached model"

    monkeypatch.setattr(adapter, "VisionZipLMM", recorder)
    with pytest.raises(Stop):
        evaluate_in_process(run, config, Cache(), tmp_path / "w")
    assert received.pop("model") == "the cached model" and received.pop("device") == "cpu"
    assert received.pop("batch_size") == 2
    assert {key: str(value) for key, value in received.items()} == launched


def test_method_options_travel_typed_from_config_to_run_folder_and_adapter(tmp_path):
    from visionzip_eval.lmms.adapter import VisionZipLMM
    from visionzip_eval.backends.llava_hf import build_tiny_llava

    methods = ["visionzip", {"name": "vispruner", "important_ratio": 0.25}, {"name": "vispruner"}]
    config = load_config(write_config(tmp_path, methods=methods, budgets=["full", 64], tasks=["visionzip_smoke_pope"],
                                      executor={"accelerate": True}))
    runs = plan(config)
    assert [r.id.split("__")[1] for r in runs] == ["none", "visionzip", "vispruner,important_ratio=0.25", "vispruner"]
    tuned = runs[2]
    assert tuned.method.options == (("important_ratio", 0.25),) and tuned.budget.total == 64
    assert tuned.identity()["method"] == "vispruner,important_ratio=0.25"
    args = accelerate_command(config, tuned, tmp_path / "w")
    model_args = args[args.index("--model_args") + 1]
    assert "method=vispruner,important_ratio=0.25" in model_args
    parsed = dict(pair.split("=", 1) for pair in model_args.split(","))  # as lmms-eval splits model_args
    lm = VisionZipLMM(model=build_tiny_llava(), **{k: parsed[k] for k in ("budget", "method", "important_ratio")})
    try:
        assert lm.method == tuned.method and lm.engine.tokens_per_image == 64
    finally:
        lm.engine.close()
    with pytest.raises(ConfigError, match="method 'vispruner' has no option ratio"):
        load_config(write_config(tmp_path, methods=[{"name": "vispruner", "ratio": 0.2}]))


@pytest.mark.slow
def test_local_executor_with_two_worker_processes(tmp_path):
    path = write_config(tmp_path, tasks=["visionzip_smoke_pope"], executor={"devices": ["cpu", "cpu"]})
    summary = run_sweep(load_config(path), progress=False)
    assert summary.counts["ok"] == 2
    assert complete_runs(tmp_path / "out") == sorted(r.id for r in plan(load_config(path)))
