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
