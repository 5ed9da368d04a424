"""Judging an lmms-eval run by its files."""

import json
import time

import pytest

from visionzip_eval.sweep.results import RunFailed, check_results, latest_results_file, load_checked

RESULTS = {
    "results": {
        "mme": {"alias": "mme", "mme_perception_score,none": 1500.0, "mme_perception_score_stderr,none": "N/A"},
        "pope": {"alias": "pope", "pope_accuracy,none": 0.85},
    }
}


def test_check_results_returns_numeric_metrics():
    metrics = check_results(RESULTS, ["mme", "pope"])
    assert metrics == {"mme": {"mme_perception_score,none": 1500.0}, "pope": {"pope_accuracy,none": 0.85}}


def test_missing_task_is_named():
    with pytest.raises(RunFailed, match="no metric for gqa"):
        check_results(RESULTS, ["mme", "gqa"])


def test_latest_results_file_and_load(tmp_path):
    with pytest.raises(RunFailed, match="no \\*_results.json"):
        latest_results_file(tmp_path)
    old = tmp_path / "model" / "2026-01-01_results.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"results": {}}))
    time.sleep(0.01)
    new = tmp_path / "model" / "2026-01-02_results.json"
    new.write_text(json.dumps(RESULTS))
    path, results = load_checked(tmp_path, ["pope"])
    assert path == new and results == RESULTS
    new.write_text('{"results": ')
    with pytest.raises(RunFailed, match="not valid JSON"):
        load_checked(tmp_path, ["pope"])


def test_one_rule_for_the_newest_results_file_by_name_not_file_time(tmp_path):
    """The sweep's check and the report's reader pick the same file: the last by its dated name,
    at any depth, even when a copy left the older file with the newer modification time."""
    import os

    from visionzip_eval.records import RunFolder

    lmms = tmp_path / "lmms_eval" / "model"
    lmms.mkdir(parents=True)
    new = lmms / "20260102_000000_results.json"
    new.write_text(json.dumps(RESULTS))
    old = lmms / "20260101_000000_results.json"
    old.write_text(json.dumps({"results": {}}))
    os.utime(new, (1_000_000, 1_000_000))  # as `cp` without -p leaves them: the older file looks newer
    # lmms-eval's MMBench writes its submission file beside them, named without a date
    (lmms / "submissions").mkdir()
    (lmms / "submissions" / "mmbench_en_dev_static_results.json").write_text(json.dumps({"rows": []}))
    assert latest_results_file(tmp_path / "lmms_eval") == new
    assert RunFolder(tmp_path).results() == RESULTS
