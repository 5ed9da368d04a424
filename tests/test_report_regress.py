"""`visionzip-eval regress`: tolerances, exit codes, JUnit XML, baselines (committed ones included)."""

import json
import shutil
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from visionzip_eval.cli import main
from visionzip_eval.report.regress import (
    CPU_TOLERANCES, DEFAULT_TOLERANCES, compare_value, load_baseline, regress, tolerance_for, write_baseline,
)
from synthetic import make_results

REPO = Path(__file__).resolve().parents[1]
RUN = "llava-1.5-7b__visionzip__64__{task}__limit-all__seed-0"
KEY = "llava-1.5-7b/visionzip/64/{task}/limit-all/seed-0"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Results without failed runs and their baseline (GPU defaults: device cuda)."""
    base = tmp_path_factory.mktemp("clean")
    root = make_results(base / "sweep", problems=False)
    baseline = base / "baseline.json"
    write_baseline(root, baseline)
    return root, baseline


@pytest.fixture
def results_copy(clean, tmp_path):
    root, baseline = clean
    copy = tmp_path / "sweep"
    shutil.copytree(root, copy)
    return copy, baseline


def _set_metric(root, task, name, value):
    path = root / "runs" / RUN.format(task=task) / "run.json"
    info = json.loads(path.read_text())
    info["metrics"][f"{name},none"] = value
    path.write_text(json.dumps(info))


def _scale_latency(root, task, factor):
    path = root / "runs" / RUN.format(task=task) / "efficiency.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        if row["prefill_ms"] is not None:
            row["prefill_ms"] *= factor
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _junit(path):
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    failed = [case for case in suite.iter("testcase") if case.find("failure") is not None]
    return root, suite, failed


def test_baseline_file_format(clean):
    root, baseline = clean
    data = json.loads(baseline.read_text())
    assert data["format"] == "visionzip-eval-baseline" and data["version"] == 1 and not data["placeholder"]
    assert data["tolerances"]["latency"] == DEFAULT_TOLERANCES["latency"]  # not CPU: device cuda:0
    values = data["runs"][KEY.format(task="mme")]
    assert values["mme_perception_score,none"] == 1350.0 and values["visual_tokens"] == 64
    assert values["n_samples"] == 8 and values["failed_requests"] == 1
    assert {"prefill_ms_median", "peak_memory_bytes_median", "prefill_flops_median"} <= set(values)


def test_unchanged_results_pass(clean, tmp_path):
    root, baseline = clean
    junit = tmp_path / "out" / "regress.xml"
    outcome = regress(root, baseline, junit)
    assert outcome.exit_code == 0 and outcome.failures == 0
    xml_root, suite, failed = _junit(junit)
    assert xml_root.tag == "testsuites" and suite.get("failures") == "0" and not failed
    assert int(suite.get("tests")) == len(outcome.checks) > 100


def test_score_beyond_tolerance_fails_with_one_junit_failure(results_copy, capsys):
    root, baseline = results_copy
    _set_metric(root, "mme", "mme_perception_score", 1350.0 - 25.0)  # GPU default for MME: ±10 points
    assert main(["regress", str(root), "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "regress FAILED" in out and "1 failed" in out
    xml_root, suite, failed = _junit(root / "report" / "regress.xml")  # the default path
    assert suite.get("failures") == xml_root.get("failures") == "1" and len(failed) == 1
    assert failed[0].get("name") == "mme_perception_score,none"
    assert failed[0].get("classname") == KEY.format(task="mme")
    assert "allowed ±10" in failed[0].find("failure").get("message")


def test_score_within_tolerance_passes(results_copy, tmp_path):
    root, baseline = results_copy
    _set_metric(root, "mme", "mme_perception_score", 1350.0 + 9.0)
    _set_metric(root, "gqa", "exact_match", 0.55 - 0.009)  # 0.9 points on the % scale, tolerance 1.0
    junit = tmp_path / "r.xml"
    assert main(["regress", str(root), "--baseline", str(baseline), "--junit", str(junit)]) == 0
    assert _junit(junit)[1].get("failures") == "0"


def test_percent_tolerance_is_in_points_of_the_report_scale(results_copy):
    root, baseline = results_copy
    _set_metric(root, "gqa", "exact_match", 0.55 + 0.02)  # +2 points: beyond ±1
    outcome = regress(root, baseline, root / "report" / "x.xml")
    assert [(c.name, c.status) for c in outcome.checks if c.failed] == [("exact_match,none", "fail")]


def test_latency_is_one_sided_and_relative(results_copy):
    root, baseline = results_copy
    _scale_latency(root, "pope", 2.0)  # twice as slow: beyond +25%
    outcome = regress(root, baseline, root / "report" / "x.xml")
    assert {c.name for c in outcome.checks if c.failed} == {"prefill_ms_median"}
    _scale_latency(root, "pope", 0.5 * 0.5)  # now twice as fast as the baseline: not a regression
    assert regress(root, baseline, root / "report" / "x.xml").exit_code == 0


def test_token_counts_are_exact_and_failed_runs_fail(results_copy):
    root, baseline = results_copy
    data = json.loads(baseline.read_text())
    data["runs"][KEY.format(task="pope")]["visual_tokens"] = 65.0
    changed = root / "changed.json"
    changed.write_text(json.dumps(data))
    run = root / "runs" / RUN.format(task="gqa") / "run.json"
    info = json.loads(run.read_text())
    info.update(status="failed", error="RuntimeError: CUDA out of memory")
    run.write_text(json.dumps(info))
    outcome = regress(root, changed, root / "report" / "x.xml")
    failed = {(c.run, c.name): c.message for c in outcome.checks if c.failed}
    assert set(failed) == {(KEY.format(task="pope"), "visual_tokens"), (KEY.format(task="gqa"), "run")}
    assert "CUDA out of memory" in failed[(KEY.format(task="gqa"), "run")]
    assert outcome.exit_code == 1


def test_missing_runs_fail_and_new_runs_are_listed(results_copy):
    root, baseline = results_copy
    shutil.rmtree(root / "runs" / RUN.format(task="mme"))
    outcome = regress(root, baseline, root / "report" / "x.xml")
    assert [(c.run, c.message) for c in outcome.checks if c.failed] == [
        (KEY.format(task="mme"), "run missing from the results")]
    data = json.loads(baseline.read_text())
    del data["runs"][KEY.format(task="pope")]
    smaller = root / "smaller.json"
    smaller.write_text(json.dumps(data))
    outcome = regress(root, smaller, root / "report" / "y.xml")
    new = [c for c in outcome.checks if c.status == "new"]
    assert [(c.run, c.name) for c in new] == [(KEY.format(task="pope"), "run")]
    suite = ET.parse(root / "report" / "y.xml").getroot().find("testsuite")
    assert suite.get("skipped") == "1"


def test_missing_and_placeholder_baselines_are_errors(clean, tmp_path, capsys):
    root, _ = clean
    assert main(["regress", str(root), "--baseline", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--update-baseline" in err and err.count("\n") == 1
    placeholder = tmp_path / "gpu.json"
    shutil.copy(REPO / "baselines" / "gpu_ci.json", placeholder)
    assert main(["regress", str(root), "--baseline", str(placeholder)]) == 2
    assert "placeholder" in capsys.readouterr().err
    # --update-baseline fills the placeholder and keeps its tolerances
    tolerances = json.loads(placeholder.read_text())["tolerances"]
    assert main(["regress", str(root), "--baseline", str(placeholder), "--update-baseline"]) == 0
    data = load_baseline(placeholder)
    assert data["tolerances"] == tolerances and len(data["runs"]) == 12
    assert main(["regress", str(root), "--baseline", str(placeholder)]) == 0


def test_update_baseline_refuses_failed_runs(tmp_path):
    root = make_results(tmp_path / "sweep", problems=True)
    with pytest.raises(ValueError, match="failed or incomplete runs"):
        write_baseline(root, tmp_path / "b.json")
    assert not (tmp_path / "b.json").exists()


def test_compare_value_rules():
    tol = {"abs": 1.0, "rel": 0.1, "direction": "both"}
    assert compare_value("prefill_ms_median", 100.0, 109.0, tol)[0]
    assert not compare_value("prefill_ms_median", 100.0, 111.0, tol)[0]
    assert not compare_value("prefill_ms_median", 100.0, 89.0, tol)[0]
    assert compare_value("visual_tokens", 64, 64, {"exact": True})[0]
    assert not compare_value("visual_tokens", 64, 64.5, {"exact": True})[0]
    assert compare_value("decode_ms_per_token_median", None, float("nan"), tol)[0]  # both undefined
    assert not compare_value("exact_match,none", 0.5, None, tol)[0]
    assert tolerance_for("mme_perception_score,none", DEFAULT_TOLERANCES)["abs"] == 10.0
    assert tolerance_for("pope_f1_score,none", DEFAULT_TOLERANCES)["abs"] == 1.0


def test_committed_baselines():
    cpu = load_baseline(REPO / "baselines" / "cpu_smoke.json")
    assert len(cpu["runs"]) == 20
    assert {k: v for k, v in cpu["tolerances"].items()} == CPU_TOLERANCES
    full_pope = cpu["runs"]["tiny-llava/none/full/visionzip_smoke_pope/limit-all/seed-0"]
    assert full_pope["visual_tokens"] == 576 and full_pope["n_samples"] == 24
    assert cpu["runs"]["tiny-llava/visionzip/64/visionzip_smoke_videomme/limit-all/seed-0"]["tokens_per_image"] == 64
    with pytest.raises(ValueError, match="placeholder"):
        load_baseline(REPO / "baselines" / "gpu_ci.json")
    gpu = json.loads((REPO / "baselines" / "gpu_ci.json").read_text())
    assert "--update-baseline" in gpu["description"] and gpu["placeholder"] is True


def test_gpu_workflow_runs_the_documented_steps():
    text = (REPO / ".github" / "workflows" / "gpu-regression.yml").read_text()
    assert "runs-on: [self-hosted, gpu]" in text
    for step in ("visionzip-eval sweep configs/ci_gpu.yaml", "visionzip-eval regress",
                 "--baseline baselines/gpu_ci.json", "visionzip-eval report", "results/ci_gpu/report",
                 "actions/upload-artifact"):
        assert step in text, step


def test_update_baseline_refuses_runs_whose_every_request_failed(clean, tmp_path):
    """One failed sample is part of a run; a run where all failed (a broken model or
    tokenizer) would lock the failure into the baseline."""
    root = tmp_path / "sweep"
    shutil.copytree(clean[0], root)
    (efficiency,) = [p for p in (root / "runs").rglob("efficiency.jsonl") if "__none__" in str(p) and "_pope" in str(p)]
    rows = [json.loads(line) for line in efficiency.read_text().splitlines()]
    for row in rows:
        row.update(error="generation failed: ValueError: x", visual_tokens=None, prefill_ms=None, total_ms=None)
    efficiency.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="every request failed"):
        write_baseline(root, tmp_path / "b.json")
    assert not (tmp_path / "b.json").exists()
