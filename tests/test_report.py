"""The report: collection into a tidy frame, paper-layout tables, paper rows, figures, the command.

All on handcrafted results folders in the sweep runner's exact format (tests/synthetic.py):
no model runs here.
"""

import dataclasses
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from visionzip_eval.cli import main
from visionzip_eval.report import COLUMNS, TableOptions, load_results, score_tables, write_report
from visionzip_eval.benchmarks import benchmark_key, metric_scale
from visionzip_eval.benchmarks.paper import paper_model_for, paper_results
from visionzip_eval.report.render import block_latex, blocks_markdown
from synthetic import FAILED_ERROR, make_results, prefill_ms
from visionzip_eval.report.tables import efficiency_tables


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("results") / "sweep")


@pytest.fixture(scope="module")
def results(results_dir):
    return load_results(results_dir)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One full `report` render (with figures), shared by the output tests."""
    root = make_results(tmp_path_factory.mktemp("rendered") / "sweep")
    before = _snapshot(root)
    report = write_report(root)
    return root, report, before


def _snapshot(root):
    return {
        p.relative_to(root): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*") if "report" not in p.relative_to(root).parts
    }


def _row(block, label, group_prefix=None):
    frame = block.frame
    mask = frame["label"] == label
    if group_prefix:
        mask &= frame["group"].str.startswith(group_prefix)
    assert mask.sum() == 1, (label, group_prefix, frame[["group", "label"]])
    return frame[mask].iloc[0]


# -- collection ------------------------------------------------------------------------------------


def test_collect_is_tidy_and_keeps_failed_and_incomplete_runs(results):
    frame = results.frame
    assert list(frame.columns) == COLUMNS
    runs = results.runs
    assert len(runs) == 12 + 2  # 11 complete + 1 failed, a partial folder, a folder without run.json
    assert sorted(runs["status"].value_counts().items()) == [("failed", 1), ("incomplete", 2), ("ok", 11)]
    problems = results.problems
    failed = problems[problems["status"] == "failed"].iloc[0]
    assert (failed["method"], failed["budget"], failed["task"]) == ("random", "64", "gqa")
    assert failed["error"] == FAILED_ERROR
    incomplete = problems[problems["status"] == "incomplete"]
    assert set(incomplete["task"]) == {"mme", "pope"} and set(incomplete["budget"]) == {"128"}
    assert any(".partial-" in p for p in incomplete["path"])
    assert frame[frame["status"] != "ok"]["value"].isna().all()


def test_collect_scales_ids_and_tokens(results):
    ok = results.ok
    mme = ok[(ok["metric"] == "mme_perception_score") & (ok["budget"] == "64") & (ok["method"] == "visionzip")].iloc[0]
    assert mme["value"] == 1350.0 and mme["score"] == 1350.0 and mme["scale"] == 1.0  # MME stays in points
    assert mme["benchmark"] == "MME" and mme["pretrained"] == "llava-hf/llava-1.5-7b-hf"
    assert math.isnan(mme["stderr"])  # "N/A" in the results JSON
    f1 = ok[(ok["metric"] == "pope_f1_score") & (ok["budget"] == "64") & (ok["method"] == "visionzip")].iloc[0]
    assert f1["value"] == 0.80 and f1["score"] == pytest.approx(80.0) and f1["stderr"] == 0.01
    assert f1["n_samples"] == 8
    assert f1["visual_tokens"] == 64 and f1["tokens_per_image"] == 64
    assert f1["full_tokens_per_image"] == 576 and f1["token_ratio"] == pytest.approx(64 / 576)
    assert f1["budget_total"] == 64
    full = ok[ok["budget"] == "full"]
    assert (full["token_ratio"] == 1.0).all() and full["budget_total"].isna().all()


def test_collect_efficiency_excludes_warmup_and_failed_requests(results):
    row = results.ok[(results.ok["budget"] == "64") & (results.ok["method"] == "visionzip")].iloc[0]
    # 8 requests: 2 warm-up, 1 failed, measured i = 2..6 with prefill = base + i
    assert (row["requests"], row["warmup_requests"], row["failed_requests"]) == (8, 2, 1)
    base = prefill_ms(64)
    assert row["prefill_ms_median"] == pytest.approx(base + 4)
    assert row["prefill_ms_p90"] == pytest.approx(base + np.percentile([2, 3, 4, 5, 6], 90))
    assert row["decode_ms_per_token_median"] == pytest.approx(80.0 / 4)  # 5 tokens: 4 decode steps
    assert row["total_ms_median"] == pytest.approx(base + 4 + 96)
    assert row["peak_memory_kind"] == "cuda_max_allocated"
    assert row["tflops_median"] == pytest.approx((7e9 * 2 * 124 + 3.5e11) / 1e12)
    requests = results.requests
    assert len(requests) == 11 * 8  # the failed run wrote none
    assert (requests[requests["budget"] == "full"]["method"] == "none").all()  # identity wins over the row


def test_benchmark_mapping_and_scales():
    assert benchmark_key("visionzip_smoke_videomme") == "VideoMME"  # not MME
    assert benchmark_key("visionzip_local_mme") == "MME"
    assert benchmark_key("mmbench_en_dev_static") == "MMB"
    assert benchmark_key("scienceqa_img") == "SQA"
    assert benchmark_key("my_custom_task") == "my_custom_task"
    assert metric_scale("exact_match") == 100 and metric_scale("gpt_eval_score") == 1
    assert metric_scale("mme_perception_score,none") == 1


def test_missing_results_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no runs/ folder"):
        load_results(tmp_path)


# -- score table -----------------------------------------------------------------------------------


def test_score_table_layout_avg_and_native_scales(results):
    (block,) = score_tables(results, TableOptions(paper=False))
    frame = block.frame
    assert list(dict.fromkeys(frame["group"])) == [
        "Upper bound, 576 tokens (100%)", "Retain 192 tokens (↓ 66.7%)", "Retain 64 tokens (↓ 88.9%)"]
    assert [c.key for c in block.columns] == ["GQA", "MME", "POPE", "Avg"]
    vanilla = _row(block, "Vanilla")
    assert vanilla["MME"] == 1500.0 and vanilla["GQA"] == pytest.approx(62.0) and vanilla["POPE"] == pytest.approx(86.0)
    assert vanilla["Avg"] == pytest.approx(100.0)
    vz64 = _row(block, "VisionZip", "Retain 64")
    expected = 100 * np.mean([1350 / 1500, 0.80 / 0.86, 0.55 / 0.62])
    assert vz64["Avg"] == pytest.approx(expected)
    assert vz64["MME"] == 1350.0 and vz64["POPE"] == pytest.approx(80.0) and vz64["GQA"] == pytest.approx(55.0)
    vz192 = _row(block, "VisionZip", "Retain 192")
    assert vz192["Avg"] == pytest.approx(100 * np.mean([1450 / 1500, 0.85 / 0.86, 0.60 / 0.62]))
    random = _row(block, "Random", "Retain 64")  # its GQA run failed: Avg over MME and POPE
    assert math.isnan(random["GQA"])
    assert random["Avg"] == pytest.approx(100 * np.mean([1200 / 1500, 0.70 / 0.86]))
    # within the 64 group: Random first, VisionZip last (paper layout); VisionZip best everywhere
    group64 = frame[frame["group"].str.startswith("Retain 64")]
    assert list(group64["label"]) == ["Random", "VisionZip"]
    pos = frame.index.get_loc(group64.index[1])
    assert {(pos, c) for c in ("MME", "POPE", "Avg")} <= block.bold
    assert not any(p == frame.index.get_loc(group64.index[0]) for p, _ in block.bold)
    md = blocks_markdown([block])
    # GQA: Random's run failed, so VisionZip has no competitor there and is not bold
    assert "| VisionZip | 55.0 | **1350.0** | **80.0** | **" in md
    assert f"{expected:.1f}%" in md
    assert "MME perception score, points (0-2000)" in md


def test_score_table_options(results):
    (block,) = score_tables(results, TableOptions(paper=False, pope_metric="accuracy", mme="total"))
    vz64 = _row(block, "VisionZip", "Retain 64")
    assert vz64["POPE"] == pytest.approx(82.0)
    assert vz64["MME"] == pytest.approx(1350.0 + 320.0)
    with pytest.raises(ValueError, match="pope_metric"):
        TableOptions(pope_metric="recall")


def test_paper_reference_rows_and_delta(results):
    (block,) = score_tables(results)
    frame = block.frame
    paper = frame[frame["source"] == "paper"]
    assert set(paper["label"]) == {"Vanilla (paper†)", "VisionZip (paper†)", "FastV (in-LLM) (paper†)", "SparseVLM (in-LLM) (paper†)"}
    vanilla_paper = _row(block, "Vanilla (paper†)")
    assert vanilla_paper["MME"] == 1862 and vanilla_paper["GQA"] == 61.9 and vanilla_paper["POPE"] == 85.9
    # paper rows only in the groups measured here (128 has no complete run)
    assert set(paper["budget"]) == {"full", "192", "64"}
    assert not frame["group"].str.contains("128").any()
    vz64_paper = _row(block, "VisionZip (paper†)", "Retain 64")
    paper_avg = 100 * np.mean([55.1 / 61.9, 1690.0 / 1862, 77.0 / 85.9])
    assert vz64_paper["Avg"] == pytest.approx(paper_avg)
    vz64 = _row(block, "VisionZip", "Retain 64")
    assert vz64["delta"] == pytest.approx(vz64["Avg"] - paper_avg)
    assert math.isnan(_row(block, "Random", "Retain 64")["delta"])  # no paper row for Random
    assert not any(frame.index.get_loc(i) == p for i in paper.index for p, _ in block.bold)  # never bold
    md = blocks_markdown([block])
    assert "approximate" in md and "arXiv 2412.04467" in md and "Δ Avg vs paper" in md
    assert "perception + cognition" in md  # the MME definition caveat
    # no paper rows for another checkpoint
    assert paper_model_for("builtin:tiny-llava") is None
    assert paper_model_for("/models/llava-1.5-7b-hf") == "llava-1.5-7b"


def test_paper_data_matches_the_published_table():
    table = paper_results()
    vanilla = table[(table["paper_model"] == "llava-1.5-7b") & (table["budget"] == "full")].iloc[0]
    assert [vanilla[k] for k in ("GQA", "MMB", "MME", "POPE", "SQA", "VQAv2", "TextVQA", "MMMU", "SEED")] == [
        61.9, 64.7, 1862, 85.9, 69.5, 78.5, 58.2, 36.3, 58.6]
    vz64 = table[(table["paper_model"] == "llava-1.5-7b") & (table["method"] == "visionzip") & (table["budget"] == "64")]
    assert vz64.iloc[0]["MME"] == 1690.0 and vz64.iloc[0]["avg_reported"] == 94.0


def test_efficiency_table(results):
    blocks = efficiency_tables(results)
    titles = [b.title for b in blocks]
    assert titles[0] == "llava-1.5-7b: all image tasks" and "llava-1.5-7b: pope" in titles
    pooled = blocks[0].frame
    full = pooled[pooled["budget"] == "full"].iloc[0]
    vz64 = pooled[(pooled["budget"] == "64") & (pooled["method"] == "visionzip")].iloc[0]
    assert full["tokens"] == 576 and vz64["tokens"] == 64
    assert vz64["prefill_p50"] == pytest.approx(prefill_ms(64) + 4)
    assert vz64["prefill_speedup"] == pytest.approx((prefill_ms(576) + 4) / (prefill_ms(64) + 4))
    assert vz64["peak_gib"] == pytest.approx((14e9 + 64e6) / 2**30)
    assert vz64["requests"] == 15 and vz64["failed"] == 3  # 3 tasks x (5 measured, 1 failed)
    assert full["prefill_speedup"] == pytest.approx(1.0)


def test_requests_per_second_counts_a_batch_wall_time_once(results):
    """Requests of one batch each carry the batch's end-to-end time: wall time counts it once, so
    the same requests at batch 4 show 4x the requests/s of batch 1 (and 'Total time' a quarter)."""
    requests = results.requests
    measured = requests["measured"].astype(bool)
    single = efficiency_tables(results)[0].frame.set_index(["method", "budget"])
    quad = efficiency_tables(dataclasses.replace(results, requests=requests.assign(batch_size=4.0)))[0].frame
    quad = quad.set_index(["method", "budget"])
    rows = requests[measured & (requests["method"] == "visionzip") & (requests["budget"] == "64")
                    & requests["task"].notna()]
    wall = rows["total_ms"].sum() / 1e3
    vz = single.loc[("visionzip", "64")]
    assert vz["batch"] == 1 and vz["total_s"] == pytest.approx(wall)
    assert vz["requests_per_s"] == pytest.approx(len(rows) / wall)
    assert quad.loc[("visionzip", "64"), "batch"] == 4
    assert quad.loc[("visionzip", "64"), "requests_per_s"] == pytest.approx(4 * vz["requests_per_s"])
    full = single.loc[("none", "full")]
    assert vz["throughput_speedup"] == pytest.approx(vz["requests_per_s"] / full["requests_per_s"])


# -- rendered report -------------------------------------------------------------------------------


def test_report_writes_only_inside_report_and_lists_failed_runs(rendered):
    root, report, before = rendered
    assert _snapshot(root) == before  # run folders untouched
    assert {p.name for p in root.iterdir()} == {"runs", "locks", "report"}
    for path in report.paths:
        assert path.resolve().parent == (root / "report").resolve()
    names = {p.name for p in report.paths}
    assert {"table.md", "table.tex", "table.csv", "efficiency.md", "efficiency.tex", "efficiency.csv"} <= names
    assert {f"{s}.{e}" for s in ("retention", "pareto", "memory", "latency") for e in ("png", "pdf")} <= names
    table_md = (root / "report" / "table.md").read_text()
    assert "Runs not in the tables (3)" in table_md
    assert "llava-1.5-7b__random__64__gqa__limit-all__seed-0" in table_md and "no metric for gqa" in table_md
    assert table_md.count("| incomplete |") == 2
    assert "Runs not in the tables" in report.main_table


def test_csv_holds_the_table_numbers(rendered):
    root, _, _ = rendered
    table = pd.read_csv(root / "report" / "table.csv")
    row = table[(table["method"] == "visionzip") & (table["budget"].astype(str) == "64") & (table["source"] == "measured")]
    assert row.iloc[0]["MME"] == 1350.0
    assert row.iloc[0]["Avg"] == pytest.approx(100 * np.mean([1350 / 1500, 0.80 / 0.86, 0.55 / 0.62]))
    eff = pd.read_csv(root / "report" / "efficiency.csv")
    assert {"Prefill ms p50", "TTFT ms p50", "Peak memory GiB", "TFLOPs/request", "Prefill speed-up"} <= set(eff.columns)


def _tabular_rows(tex):
    """(column count of each tabular, cell counts of its rows)."""
    out = []
    for spec, body in re.findall(r"\\begin\{tabular\}\{([^}]*)\}(.*?)\\end\{tabular\}", tex, flags=re.S):
        ncols = len(re.sub(r"[^lrcp]", "", spec))
        counts = []
        for line in body.strip().splitlines():
            line = line.strip()
            if not line.endswith(r"\\"):
                continue
            if line.startswith(r"\multicolumn"):
                counts.append(int(re.match(r"\\multicolumn\{(\d+)\}", line).group(1)))
            else:
                counts.append(len(re.split(r"(?<!\\)&", line)))
        out.append((ncols, counts))
    return out


@pytest.mark.parametrize("name", ["table.tex", "efficiency.tex"])
def test_latex_is_balanced_booktabs(rendered, name):
    root, _, _ = rendered
    tex = (root / "report" / name).read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") >= 1
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}")
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == tex.count(r"\begin{tabular}")
    for ncols, counts in _tabular_rows(tex):
        assert counts and all(c == ncols for c in counts), (ncols, counts)
    braces = re.sub(r"\\[{}]", "", tex)
    assert braces.count("{") == braces.count("}")
    assert r"\textbf{" in tex
    assert "%" not in re.sub(r"\\%", "", "\n".join(l for l in tex.splitlines() if not l.startswith("%")))


def test_latex_escapes_and_bolds(results):
    (block,) = score_tables(results)
    tex = block_latex(block)
    assert r"$\downarrow$ 88.9\%" in tex and r"(paper$^\dagger$)" in tex
    assert r"\textbf{1350.0}" in tex


@pytest.mark.parametrize("stem", ["retention", "pareto", "memory", "latency"])
def test_figures_open_and_are_not_blank(rendered, stem):
    root, _, _ = rendered
    with Image.open(root / "report" / f"{stem}.png") as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 10  # not a blank canvas
    assert (pixels < 128).mean() > 0.005  # some ink
    assert (root / "report" / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"


def test_report_command_prints_the_table(tmp_path, capsys):
    root = make_results(tmp_path / "sweep", problems=False)
    assert main(["report", str(root), "--no-plots", "--no-paper"]) == 0
    out = capsys.readouterr().out
    assert "Retain 64 tokens (↓ 88.9%)" in out and "| VisionZip |" in out
    assert (root / "report" / "table.md").is_file() and not (root / "report" / "retention.png").exists()


def test_report_command_bad_directory_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visionzip-eval: error:") and err.count("\n") == 1


def test_report_on_smoke_like_zero_scores(tmp_path):
    """All-zero scores (the tiny random model): Avg undefined, not a division error."""
    root = make_results(tmp_path / "sweep", problems=False, pretrained="builtin:tiny-llava", model="tiny-llava")
    for path in (root / "runs").glob("*/run.json"):

        info = json.loads(path.read_text())
        info["metrics"] = {k: 0.0 for k in info["metrics"]}
        path.write_text(json.dumps(info))
    results = load_results(root)
    (block,) = score_tables(results)
    assert block.frame["Avg"].isna().all() and not (block.frame["source"] == "paper").any()
    assert "retention is undefined" in blocks_markdown([block])
    assert not block.bold  # ties everywhere: nothing is best


def test_in_llm_rows_group_by_budget_compare_with_the_paper_and_show_tokens_in_and_kept(tmp_path):
    """FastV counted as the paper counts it (count=average): its row sits in the 64-token
    group beside the published FastV row with a delta, and the efficiency table shows the 576
    tokens entering the LLM and the 30 it keeps from layer 2 on."""
    from synthetic import MODEL, PRETRAINED, SCORES, write_run

    root = make_results(tmp_path / "sweep", problems=False)
    for task, metrics in SCORES[("visionzip", "64")].items():
        folder = write_run(root / "runs", MODEL, PRETRAINED, "fastv,count=average", "64", task, metrics, tokens=576)
        efficiency = folder / "efficiency.jsonl"
        rows = [dict(json.loads(line), visual_tokens_after_pruning=30) for line in efficiency.read_text().splitlines()]
        efficiency.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = load_results(root)
    (block,) = score_tables(results)
    fastv = _row(block, "FastV (in-LLM, count=average)", "Retain 64")
    vz64 = _row(block, "VisionZip", "Retain 64")
    paper = _row(block, "FastV (in-LLM) (paper†)", "Retain 64")
    assert fastv["Avg"] == pytest.approx(vz64["Avg"])  # the same scores were written
    assert fastv["delta"] == pytest.approx(fastv["Avg"] - paper["Avg"])
    (efficiency_block, *_) = efficiency_tables(results)
    row = efficiency_block.frame[efficiency_block.frame["method"] == "fastv,count=average"].iloc[0]
    assert (row["input_tokens"], row["tokens"]) == (576, 30)
    vz = efficiency_block.frame[(efficiency_block.frame["method"] == "visionzip")
                                & (efficiency_block.frame["budget"] == "64")].iloc[0]
    assert (vz["input_tokens"], vz["tokens"]) == (64, 64)
