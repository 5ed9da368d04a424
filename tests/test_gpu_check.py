"""scripts/gpu_check.sh's control flow on a CPU (CUDA faked off): each step ends passed, failed
or skipped with its reason, one failing never stops the next, the summary is on disk after every
step, and the accuracy sweep (tiny trained model when the 7B weights are absent) writes a
baselines/gpu_ci.json candidate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # gpu_check.py is a script of the checkout, not in the package
import gpu_check  # noqa: E402


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "cached_weights", lambda: None)


def test_without_a_gpu_the_cuda_steps_are_skipped_with_the_reason(tmp_path, no_cuda):
    code = gpu_check.run_checks(tmp_path, ["cuda", "parity", "realsize"], progress=lambda msg: None)
    assert code == 2  # nothing could be checked: never a vacuous pass
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["device"] == "cpu" and record["weights"] is None
    assert [(s["name"], s["status"]) for s in record["steps"]] == [
        ("cuda", "skipped"), ("parity", "skipped"), ("realsize", "skipped")]
    assert all("no CUDA GPU" in s["detail"] for s in record["steps"])
    page = (tmp_path / "summary.md").read_text()
    assert "| cuda | skipped |" in page and "NOT in the cache" in page


def test_a_failing_step_does_not_stop_the_next_and_the_summary_follows_each_step(tmp_path, no_cuda, monkeypatch):
    seen = []

    def broken(ctx):
        raise RuntimeError("the GPU caught fire")

    def fine(ctx):
        seen.append(json.loads((tmp_path / "gpu_check.json").read_text())["steps"][0]["status"])
        return {"answer": 42}

    monkeypatch.setattr(gpu_check, "STEPS", {"cuda": broken, "parity": fine})
    assert gpu_check.run_checks(tmp_path, progress=lambda msg: None) == 1
    assert seen == ["failed"]  # written to disk before the next step began
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["status"], s["detail"]) for s in record["steps"]] == [
        ("failed", "RuntimeError: the GPU caught fire"), ("passed", "")]
    assert "the GPU caught fire" in (tmp_path / "cuda.traceback.txt").read_text()
    assert '"answer": 42' in (tmp_path / "summary.md").read_text()


def test_steps_past_the_time_budget_are_skipped(tmp_path, no_cuda, monkeypatch):
    monkeypatch.setattr(gpu_check, "STEPS", {"cuda": lambda ctx: {}})
    assert gpu_check.run_checks(tmp_path, budget_s=10, progress=lambda msg: None) == 2
    assert "out of time" in json.loads((tmp_path / "gpu_check.json").read_text())["steps"][0]["detail"]
    with pytest.raises(ValueError, match="unknown step"):
        gpu_check.run_checks(tmp_path, ["warp-drive"])
    with pytest.raises(ValueError, match="positive even number"):
        gpu_check.run_checks(tmp_path, limit=3)


def test_accuracy_config_degrades_to_the_tiny_model_and_synthetic_tasks(tmp_path):
    ctx = gpu_check.Context(tmp_path, torch.device("cpu"), None, 7, print)
    config = gpu_check.accuracy_config(ctx)
    assert config["models"][0]["pretrained"] == gpu_check.TINY
    assert config["tasks"] == ["visionzip_synth_mme", "visionzip_synth_pope"]
    assert config["budgets"] == ["full", 64] and config["limit"] == 7
    assert config["executor"]["devices"] == ["cpu"] and Path(config["include_path"]).is_dir()
    real = gpu_check.accuracy_config(gpu_check.Context(tmp_path, torch.device("cuda"), "llava-hf/llava-1.5-7b-hf", 200, print))
    assert real["models"][0]["pretrained"] == "llava-hf/llava-1.5-7b-hf" and real["tasks"] == ["mme", "pope"]
    assert real["models"][0]["dtype"] == "float16" and real["executor"]["devices"] == ["0"]


def test_the_script_runs_the_accuracy_step_on_a_cpu_and_writes_a_candidate_baseline(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--output-dir", str(out), "--device", "cpu",
                           "--limit", "4", "--steps", "cuda", "accuracy"],
                          capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin",
                                                               "PYTHON": sys.executable, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert [(s["name"], s["status"]) for s in steps] == [("cuda", "skipped"), ("accuracy", "passed")]
    candidate = json.loads((out / "gpu_ci.candidate.json").read_text())
    assert candidate["placeholder"] is False and len(candidate["runs"]) == 4  # 2 tasks x (full, 64)
    assert sorted(run["visual_tokens"] for run in candidate["runs"].values()) == [64, 64, 576, 576]
    placeholder = json.loads((REPO / "baselines" / "gpu_ci.json").read_text())
    assert candidate["tolerances"] == placeholder["tolerances"]


def test_parity_step_compares_fp16_with_the_same_weights_in_float32(tmp_path, monkeypatch):
    """The step's own arithmetic, run on the CPU (half precision works there for the tiny model)."""
    monkeypatch.setattr(gpu_check, "_need_cuda", lambda ctx: None)
    figures = gpu_check.step_parity(gpu_check.Context(tmp_path, torch.device("cpu"), None, 200, print))
    assert figures["model"] == gpu_check.TINY and figures["images"] == 4 and not figures["real_weights"]
    for precision in ("float32", "reference"):
        overlap = figures[f"fp16_{precision}_overlap_with_fp32"]
        assert 0.9 <= overlap["min"] <= overlap["mean"] <= 1.0


def test_the_serve_step_is_skipped_with_its_reason(tmp_path, no_cuda, monkeypatch):
    assert gpu_check.run_checks(tmp_path, ["serve"], progress=lambda msg: None) == 2
    step = json.loads((tmp_path / "gpu_check.json").read_text())["steps"][0]
    assert (step["name"], step["status"]) == ("serve", "skipped") and "no CUDA GPU" in step["detail"]
    # a GPU without vLLM: skipped, saying how to get it
    monkeypatch.setattr(gpu_check, "_need_cuda", lambda ctx: None)
    monkeypatch.setattr("visionzip_eval.serving.served.vllm_unavailable", lambda: "vLLM is not importable here")
    assert gpu_check.run_checks(tmp_path, ["serve"], progress=lambda msg: None) == 2
    step = json.loads((tmp_path / "gpu_check.json").read_text())["steps"][0]
    assert step["status"] == "skipped" and step["detail"] == "vLLM is not importable here"
