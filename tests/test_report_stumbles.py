"""Report stumbles on small runs: Avg over benchmarks where the full-budget model is at chance,
footnote scales that do not match the run (synthetic MME, MMBench without circular rows), and
figures drawn from zero complete runs.

All on handcrafted results folders in the sweep runner's format (tests/synthetic.py),
with lmms-eval samples files written the way its MME and MMBench tasks log them.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest

from visionzip_eval.report import TableOptions, load_results, score_tables, write_report
from visionzip_eval.report.render import blocks_markdown
from synthetic import run_id, write_run

MODEL, PRETRAINED = "tiny-llava-synth", "builtin:tiny-llava-synth"
TOKENS = {"full": 576, "64": 64}
MME_CATEGORIES = ("existence", "count", "position", "color")  # the synthetic MME: 4 x 200 = 800 points


def _mme_samples(categories=MME_CATEGORIES, images=3):
    rows = []
    for category in categories:
        for i in range(images):
            for answer in ("Yes", "No"):  # MME scores each image's two questions as a pair
                qid = f"{category}/{i:05d}.jpg"
                rows.append({"doc_id": len(rows), "target": answer, "filtered_resps": "Yes",
                             "mme_perception_score": {"question_id": qid, "category": category, "score": 1.0}})
    return rows


def _mmbench_samples(questions=48, rotations=1):
    """Rows as lmms-eval's MMBench logs them; rotation k of question i has index i + k * 1e6."""
    rows = []
    for k in range(rotations):
        for i in range(questions):
            item = {"index": i + k * 1_000_000, "question": "What shape is the red object?", "answer": "B",
                    "prediction": "B", "A": "circle", "B": "triangle", "C": "square", "D": "cross", "E": "nan",
                    "category": "attribute_recognition"}
            rows.append({"doc_id": len(rows), "target": "B", "gpt_eval_score": item, "submission": item})
    return rows


def _write_samples(runs, method, budget, task, rows):
    (path,) = (runs / run_id(MODEL, method, budget, task) / "lmms_eval").glob(f"*_samples_{task}.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_small_results(root, scores, samples=None):
    """``scores``: {(method, budget): {task: {metric: value}}}; ``samples``: {task: rows} for every run."""
    runs = root / "runs"
    runs.mkdir(parents=True)
    for (method, budget), tasks in scores.items():
        for task, metrics in tasks.items():
            write_run(runs, MODEL, PRETRAINED, method, budget, task, metrics, tokens=TOKENS[budget], device="cpu")
            if samples and task in samples:
                _write_samples(runs, method, budget, task, samples[task])
    return root


SMOKE_SCORES = {
    ("none", "full"): {
        "visionzip_synth_gqa": {"exact_match": 0.40},
        "visionzip_synth_mmbench": {"gpt_eval_score": 50.0},
        "visionzip_synth_mme": {"mme_perception_score": 600.0},
        "visionzip_synth_pope": {"pope_f1_score": 0.70, "pope_accuracy": 0.72},
        "visionzip_smoke_videomme": {"videomme_perception_score": 25.0},  # chance: 4 options
    },
    ("visionzip", "64"): {
        "visionzip_synth_gqa": {"exact_match": 0.36},
        "visionzip_synth_mmbench": {"gpt_eval_score": 45.0},
        "visionzip_synth_mme": {"mme_perception_score": 540.0},
        "visionzip_synth_pope": {"pope_f1_score": 0.65, "pope_accuracy": 0.66},
        "visionzip_smoke_videomme": {"videomme_perception_score": 29.25},  # "117% retention"
    },
}


@pytest.fixture
def smoke(tmp_path):
    samples = {"visionzip_synth_mme": _mme_samples(), "visionzip_synth_mmbench": _mmbench_samples(48, 1)}
    return make_small_results(tmp_path / "smoke", SMOKE_SCORES, samples)


def _row(block, label):
    frame = block.frame
    (index,) = np.flatnonzero((frame["label"] == label).to_numpy())
    return frame.iloc[index]


# -- 1. Avg leaves out benchmarks at chance at full budget -------------------------------------------


def test_avg_leaves_out_a_benchmark_at_chance_at_full_budget(smoke):
    (block,) = score_tables(load_results(smoke), TableOptions(paper=False))
    assert [c.key for c in block.columns] == ["GQA", "MMB", "MME", "POPE", "VideoMME", "Avg"]
    vz = _row(block, "VisionZip")
    assert vz["VideoMME"] == pytest.approx(29.25)  # the column stays
    expected = 100 * np.mean([0.36 / 0.40, 45 / 50, 540 / 600, 0.65 / 0.70])  # Video-MME left out
    assert vz["Avg"] == pytest.approx(expected)
    assert _row(block, "Vanilla")["Avg"] == pytest.approx(100.0)
    md = blocks_markdown([block])
    assert "at chance at full budget: Video-MME (25.0, chance 25.0)" in md
    assert "Avg over the benchmarks present only" not in md  # leaving one out is no missing score
    csv_row = pd.read_csv(_written(smoke, "table.csv")).query("method == 'visionzip'").iloc[0]
    assert csv_row["Avg"] == pytest.approx(expected)


def _written(root, name):
    write_report(root, TableOptions(paper=False), plots=False)
    return root / "report" / name


def test_chance_levels_per_benchmark(tmp_path):
    """MME: half its maximum (200 per category present); POPE: 50%; GQA: open answers, never left out;
    MMBench: 25% for 4 options asked once each."""
    scores = {
        ("none", "full"): {
            "visionzip_synth_gqa": {"exact_match": 0.02},
            "visionzip_synth_mmbench": {"gpt_eval_score": 20.0},
            "visionzip_synth_mme": {"mme_perception_score": 380.0},  # of 800: chance 400
            "visionzip_synth_pope": {"pope_f1_score": 0.50, "pope_accuracy": 0.80},
        },
        ("visionzip", "64"): {
            "visionzip_synth_gqa": {"exact_match": 0.01},
            "visionzip_synth_mmbench": {"gpt_eval_score": 30.0},
            "visionzip_synth_mme": {"mme_perception_score": 420.0},
            "visionzip_synth_pope": {"pope_f1_score": 0.60, "pope_accuracy": 0.70},
        },
    }
    samples = {"visionzip_synth_mme": _mme_samples(), "visionzip_synth_mmbench": _mmbench_samples(48, 1)}
    root = make_small_results(tmp_path / "chance", scores, samples)
    results = load_results(root)
    (block,) = score_tables(results, TableOptions(paper=False))
    assert _row(block, "VisionZip")["Avg"] == pytest.approx(100 * 0.01 / 0.02)  # GQA only
    md = blocks_markdown([block])
    assert "at chance at full budget: MMB (20.0, chance 25.0); MME (380.0, chance 400.0); POPE (50.0, chance 50.0)" in md
    at_chance = next(line for line in md.splitlines() if "at chance at full budget" in line)
    assert "GQA (" not in at_chance  # the header says "GQA (n=8)": GQA is not at chance
    # POPE accuracy 80% is above chance: with --pope-metric accuracy it counts again
    (block,) = score_tables(results, TableOptions(paper=False, pope_metric="accuracy"))
    assert _row(block, "VisionZip")["Avg"] == pytest.approx(100 * np.mean([0.01 / 0.02, 0.70 / 0.80]))


def test_circular_mmbench_is_judged_against_circular_chance(tmp_path):
    """Circular evaluation (each question in 4 rotations, all must be right): guessing scores
    100 * 0.25^4 = 0.4%, so 20% is far above chance and stays in Avg."""
    scores = {
        ("none", "full"): {"visionzip_synth_mmbench": {"gpt_eval_score": 20.0},
                           "visionzip_synth_gqa": {"exact_match": 0.40}},
        ("visionzip", "64"): {"visionzip_synth_mmbench": {"gpt_eval_score": 15.0},
                              "visionzip_synth_gqa": {"exact_match": 0.30}},
    }
    root = make_small_results(tmp_path / "circular", scores, {"visionzip_synth_mmbench": _mmbench_samples(12, 4)})
    (block,) = score_tables(load_results(root), TableOptions(paper=False))
    assert _row(block, "VisionZip")["Avg"] == pytest.approx(100 * np.mean([15 / 20, 0.30 / 0.40]))
    assert "at chance at full budget" not in blocks_markdown([block])


# -- 2. footnotes state the scales of the run ---------------------------------------------------------


def test_footnote_scales_follow_the_run(smoke):
    (block,) = score_tables(load_results(smoke), TableOptions(paper=False))
    (scales,) = [n for n in block.notes if n.startswith("Scales:")]
    assert "MME perception score, points (0-800: 200 per category x 4 categories)" in scales
    assert "2000" not in scales
    mmb = scales.split("MMB ", 1)[1].split(";")[0]
    assert mmb.startswith("accuracy") and "circular" not in mmb  # 48 distinct indices: asked once each


def test_footnote_says_circular_when_rotations_are_present(tmp_path):
    scores = {key: {"visionzip_synth_mmbench": {"gpt_eval_score": v}} for key, v in
              ((("none", "full"), 30.0), (("visionzip", "64"), 25.0))}
    root = make_small_results(tmp_path / "circ", scores, {"visionzip_synth_mmbench": _mmbench_samples(6, 4)})
    (block,) = score_tables(load_results(root), TableOptions(paper=False))
    (scales,) = [n for n in block.notes if n.startswith("Scales:")]
    assert "MMB accuracy (circular evaluation" in scales


def test_mme_scale_with_all_ten_categories(tmp_path):
    categories = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
    scores = {key: {"mme": {"mme_perception_score": v}} for key, v in
              ((("none", "full"), 1500.0), (("visionzip", "64"), 1400.0))}
    root = make_small_results(tmp_path / "mme10", scores, {"mme": _mme_samples(categories, 1)})
    (block,) = score_tables(load_results(root), TableOptions(paper=False))
    assert "MME perception score, points (0-2000: 200 per category x 10 categories)" in block.notes[0]


# -- 3. no figures from zero complete runs ------------------------------------------------------------


def test_no_figures_from_zero_complete_runs(tmp_path):
    root = tmp_path / "allfailed"
    runs = root / "runs"
    runs.mkdir(parents=True)
    for method, budget in (("none", "full"), ("visionzip", "64")):
        for task in ("visionzip_synth_gqa", "visionzip_synth_pope"):
            write_run(runs, MODEL, PRETRAINED, method, budget, task, None, status="failed",
                      error="RuntimeError: out of memory", device="cpu")
    report = write_report(root)
    written = sorted(p.name for p in (root / "report").iterdir())
    assert not [n for n in written if n.endswith((".png", ".pdf"))], written
    assert not [p for p in report.paths if p.suffix in (".png", ".pdf")]
    assert report.figures == []
    assert {"table.md", "table.csv", "runs.csv", "efficiency.md"} <= set(written)
    assert report.problems == 4
    runs_csv = pd.read_csv(root / "report" / "runs.csv")
    assert sorted(runs_csv["status"]) == ["failed"] * 4
    assert "No figures" in report.main_table
    table_md = (root / "report" / "table.md").read_text()
    assert "Runs not in the tables (4)" in table_md and "No figures" in table_md


def test_figures_still_written_when_runs_are_complete(smoke):
    report = write_report(smoke, TableOptions(paper=False))
    names = {p.name for p in report.figures}
    assert {"retention.png", "retention.pdf", "pareto.png", "latency.png", "memory.png"} <= names
    assert all(p.is_file() for p in report.figures) and set(report.figures) <= set(report.paths)
    assert not math.isnan(pd.read_csv(smoke / "report" / "table.csv")["Avg"].iloc[0])


def test_figures_average_leaves_out_the_same_benchmarks(smoke):
    from visionzip_eval.report.plots import _avg_retention, _cell_means

    means = _cell_means(load_results(smoke), TableOptions(paper=False))
    assert set(means[means["at_chance"]]["benchmark"]) == {"VideoMME"}
    avg = _avg_retention(means[means["model"] == MODEL])
    vz = avg[(avg["method"] == "visionzip") & (avg["budget"] == "64")].iloc[0]
    assert vz["retention"] == pytest.approx(100 * np.mean([0.36 / 0.40, 45 / 50, 540 / 600, 0.65 / 0.70]))
