"""report/stats.py against reference computations: Wilson from the closed form, exact McNemar
on a hand-made table, MME's pair grouping and score, POPE F1 as lmms-eval aggregates it,
MMBench's circular groups, bootstrap intervals that cover the point and are reproducible."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from visionzip_eval.report import stats as S


def _binary(correct, ids=None):
    rows = [dict(doc_id=i if ids is None else ids[i], exact_match=float(c)) for i, c in enumerate(correct)]
    return S.units_from_samples(rows, "GQA", "exact_match")


def test_wilson_interval_equals_the_closed_form():
    units = _binary([1] * 13 + [0] * 7)
    got = S.interval(units)
    n, p, z = 20, 13 / 20, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (got.score, got.n, got.method) == (65.0, 20, "wilson")
    assert got.low == pytest.approx(100 * (centre - half), abs=1e-9)
    assert got.high == pytest.approx(100 * (centre + half), abs=1e-9)


def test_mcnemar_exact_on_a_hand_made_table():
    # A right / B wrong on 6 questions, B right / A wrong on 1: p = 2 * P(X <= 1), X ~ Bin(7, 1/2)
    assert S.mcnemar(6, 1) == pytest.approx(2 * (1 + 7) / 2**7)
    assert S.mcnemar(0, 0) == 1.0
    a = _binary([1] * 6 + [0] * 1 + [1] * 10 + [0] * 3)
    b = _binary([0] * 6 + [1] * 1 + [1] * 10 + [0] * 3)
    result = S.paired(a, b)
    assert (result.a_only, result.b_only, result.n, result.test) == (6, 1, 20, "McNemar (exact)")
    assert result.p_value == pytest.approx(0.125)
    assert result.difference == pytest.approx(-25.0) and not result.distinguishable
    assert result.low <= result.difference <= result.high


def test_paired_uses_only_the_questions_both_answered():
    a = _binary([1, 1, 0, 0], ids=[0, 1, 2, 3])
    b = _binary([0, 1, 0], ids=[1, 2, 9])  # id 1: A only right; id 2: B only; 0, 3, 9 unpaired
    result = S.paired(a, b)
    assert result.n == 2 and (result.a_only, result.b_only) == (1, 1)
    assert (result.score_a, result.score_b) == (50.0, 50.0)


def test_clear_difference_is_distinguishable():
    a = _binary([0] * 200)
    b = _binary([1] * 60 + [0] * 140)
    result = S.paired(a, b)
    assert result.distinguishable and result.p_value < 1e-15 and result.difference == pytest.approx(30.0)


def _mme_rows(pairs):
    """pairs: (category, question_id, first right, second right)."""
    rows = []
    for category, qid, *scores in pairs:
        for score in scores:
            rows.append(dict(doc_id=len(rows), mme_perception_score=dict(
                question_id=qid, category=category, score=float(score))))
    return rows


def test_mme_units_are_image_pairs_and_score_as_lmms_eval():
    rows = _mme_rows([("color", "a.png", 1, 1), ("color", "b.png", 1, 0),
                      ("count", "a.png", 0, 0), ("count", "c.png", 1, 1), ("count", "d.png", 0, 1)])
    units = S.units_from_samples(rows, "MME", "mme_perception_score")
    assert units.n == 5 and units.unit == "pairs"
    assert sorted(units.values[:, 0].tolist()) == [0.0, 50.0, 50.0, 200.0, 200.0]
    # color: (200 + 50) / 2 = 125; count: (0 + 200 + 50) / 3 = 83.33: lmms-eval's mme_aggregate_results
    from lmms_eval.tasks.mme.utils import mme_aggregate_results
    reference = mme_aggregate_results([r["mme_perception_score"] for r in rows])
    assert units.score() == pytest.approx(reference) == pytest.approx(125 + 250 / 3)
    got = S.interval(units)
    assert got.method == "bootstrap" and got.low <= got.score <= got.high
    assert S.interval(units) == got  # fixed seed: reproducible


def test_mme_refuses_an_unpaired_question():
    rows = _mme_rows([("color", "a.png", 1)])
    with pytest.raises(ValueError, match="unpaired"):
        S.units_from_samples(rows, "MME", "mme_perception_score")


def test_pope_f1_matches_lmms_eval_aggregation():
    from lmms_eval.tasks.pope.utils import pope_aggregate_f1_score
    preds = ["yes", "yes", "no", "no", "yes", "maybe", "no", "yes"]
    truth = ["yes", "no", "yes", "no", "yes", "yes", "no", "no"]
    entries = [dict(question_id=i, score=float(p == t), prediction=p, ground_truth=t)
               for i, (p, t) in enumerate(zip(preds, truth))]
    rows = [dict(doc_id=i, pope_f1_score=e, pope_accuracy=e) for i, e in enumerate(entries)]
    f1 = S.units_from_samples(rows, "POPE", "pope_f1_score")
    assert f1.score() == pytest.approx(100 * pope_aggregate_f1_score(entries))
    acc = S.units_from_samples(rows, "POPE", "pope_accuracy")
    assert acc.kind == "binary" and acc.score() == pytest.approx(100 * 4 / 8)
    assert S.paired(f1, f1).test == "paired bootstrap" and S.paired(f1, f1).p_value == 1.0


def test_mmbench_units_are_circular_groups():
    def entry(index, answer, prediction):
        return dict(gpt_eval_score=dict(index=index, question="q", answer=answer, prediction=prediction, hint="",
                                        source="s", split="dev", category="c", **{"L2-category": "l"},
                                        A="x", B="y", C="z", D="w"))
    rows = [entry(1, "A", "A"), entry(1_000_001, "B", "B"),   # group 1: both rotations right
            entry(2, "C", "C"), entry(1_000_002, "D", "A"),   # group 2: one rotation wrong
            entry(3, "B", "B")]                                # group 3: single, right
    units = S.units_from_samples(rows, "MMB", "gpt_eval_score")
    assert units.unit == "circular groups" and units.n == 3
    assert units.ids.tolist() == [1, 2, 3] and units.values[:, 0].tolist() == [1.0, 0.0, 1.0]


def test_retention_interval_covers_its_point_and_is_one_for_identical_runs():
    full = _binary([1] * 15 + [0] * 5)
    half = _binary([1] * 8 + [0] * 12)
    point, low, high = S.retention_interval([(half, full)])
    assert point == pytest.approx(100 * 8 / 15) and low < point < high
    same = S.retention_interval([(full, full)])
    assert same == pytest.approx((100.0, 100.0, 100.0))


def test_retention_interval_survives_draws_where_the_full_model_scores_zero():
    """With n=2 many resamples leave the full-budget run 0 right (the demo at --limit 2 crashed on
    a division by zero); those draws are dropped, and a full score of 0 itself gives no Avg."""
    full = _binary([1, 0])
    reduced = _binary([1, 1])
    point, low, high = S.retention_interval([(reduced, full)])
    assert point == pytest.approx(200.0) and low <= point <= high
    assert all(math.isnan(x) for x in S.retention_interval([(reduced, _binary([0, 0]))]))


def test_interval_width_shrinks_with_n():
    small = S.interval(_binary([1, 0] * 10))
    large = S.interval(_binary([1, 0] * 1000))
    assert large.half_width < small.half_width / 5
    assert np.isclose(small.score, large.score)


# -- the report and `compare` on a handcrafted sweep with per-sample results ------------------------

from visionzip_eval.cli import main  # noqa: E402
from synthetic import MODEL, make_results, run_id  # noqa: E402
from visionzip_eval.report.tables import TableOptions, limit_caption  # noqa: E402

N_GQA = 200
# correctness per question: full 130/200; VisionZip 64 = full minus 4 (not separable); Random 64 = full minus 40
GQA_RIGHT = {("none", "full"): list(range(130)), ("visionzip", "64"): list(range(4, 130)),
             ("random", "64"): list(range(40, 130)), ("visionzip", "192"): list(range(130))}
MME_PAIRS = [("color", f"{i}.png") for i in range(12)] + [("count", f"{i}.png") for i in range(8)]


def _samples(folder, task, rows):
    (path,) = (folder / "lmms_eval").glob(f"*_samples_{task}.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = make_results(tmp_path_factory.mktemp("stats") / "sweep", problems=False)
    for (method, budget), right in GQA_RIGHT.items():
        folder = root / "runs" / run_id(MODEL, method, budget, "gqa")
        _samples(folder, "gqa", [dict(doc_id=i, exact_match=float(i in right)) for i in range(N_GQA)])
        wrong = 0 if budget in ("full", "192") else 3 if method == "visionzip" else 9
        mme = []
        for k, (category, image) in enumerate(MME_PAIRS):
            for q in range(2):
                mme.append(dict(doc_id=len(mme), mme_perception_score=dict(
                    question_id=image, category=category, score=float(not (k < wrong and q == 0)))))
        _samples(root / "runs" / run_id(MODEL, method, budget, "mme"), "mme", mme)
        pope = []
        for i in range(100):  # the first 10 / 20 / 40 answers flipped
            truth = "yes" if i % 2 else "no"
            flip = i < {"none": 10, "visionzip": 20, "random": 40}[method]
            entry = dict(question_id=i, prediction=("no" if truth == "yes" else "yes") if flip else truth,
                         ground_truth=truth, score=float(not flip))
            pope.append(dict(doc_id=i, pope_f1_score=entry, pope_accuracy=entry))
        _samples(root / "runs" / run_id(MODEL, method, budget, "pope"), "pope", pope)
    return root


def test_report_carries_n_and_intervals_parsed_back(sweep):
    from visionzip_eval.report import write_report
    report = write_report(sweep, TableOptions(intervals=True), plots=False)
    table = pd.read_csv(report.directory / "table.csv")
    vz64 = table[(table["method"] == "visionzip") & (table["budget"].astype(str) == "64")].iloc[0]
    wilson = S.interval(_binary([i in GQA_RIGHT[("visionzip", "64")] for i in range(N_GQA)]))
    assert vz64["GQA n"] == N_GQA and vz64["MME n"] == len(MME_PAIRS)
    assert (vz64["GQA low"], vz64["GQA high"]) == pytest.approx((wilson.low, wilson.high))
    assert vz64["Avg low"] < vz64["Avg"] < vz64["Avg high"]
    md = (report.directory / "table.md").read_text()
    assert f"GQA (n={N_GQA})" in md and f"MME (n={len(MME_PAIRS)})" in md
    # the cell is lmms-eval's aggregate (0.55 in this fixture's results JSON), the ± from the samples
    assert f"55.0 ± {wilson.half_width:.1f}" in md
    tex = (report.directory / "table.tex").read_text()
    assert f"GQA (n={N_GQA})" in tex and r"$\pm$" in tex
    assert "not distinguishable at this n" in md and "## Paired comparisons" in md


def test_limit_caption_names_the_limit_and_n():
    import pandas as pd
    cells = pd.DataFrame(dict(benchmark=["GQA", "POPE"], n=[20, 20], unit=["questions"] * 2, limit=[20, 20]))
    assert limit_caption(cells) == "limit 20 (n=20 per benchmark): for testing, not for comparison."
    cells = pd.DataFrame(dict(benchmark=["GQA", "MME"], n=[20, 10], unit=["questions", "pairs"], limit=[20, 20]))
    assert limit_caption(cells) == "limit 20 (n: GQA 20 questions, MME 10 pairs): for testing, not for comparison."
    assert limit_caption(cells.assign(limit=[None, None])) == ""
    # a benchmark without per-sample units (Video-MME): its unit is NaN, not a name (it printed "? nan")
    cells = pd.DataFrame(dict(benchmark=["GQA", "VideoMME"], n=[20, 12], unit=["questions", float("nan")],
                              limit=[20, 20]))
    assert limit_caption(cells) == "limit 20 (n: GQA 20 questions, Video-MME 12 questions): for testing, not for comparison."


def test_compare_command_prints_paired_differences(sweep, capsys):
    assert main(["compare", str(sweep), "visionzip@64", "random@64"]) == 0
    out = capsys.readouterr().out
    gqa = next(line for line in out.splitlines() if "| GQA |" in line)
    # B - A = 90/200 - 126/200 = -18.0 pp; 36 right under VisionZip only, 0 under Random only
    assert "-18.0 [" in gqa and "McNemar (exact) (36 vs 0 discordant)" in gqa and "VisionZip @64 higher" in gqa
    close = main(["compare", str(sweep), "vanilla", "visionzip@64"])
    out = capsys.readouterr().out
    assert close == 0
    gqa = next(line for line in out.splitlines() if "| GQA |" in line)
    assert "not distinguishable at this n" in gqa and "(4 vs 0 discordant)" in gqa


def test_compare_bad_selector_is_one_line(sweep, capsys):
    assert main(["compare", str(sweep), "visionzip@32", "random@64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "visionzip-eval: error: visionzip has no run at budget 32: it ran at 192, 64"
    assert main(["compare", str(sweep), "bogus", "random"]) == 2
    assert "no complete run of method 'bogus'" in capsys.readouterr().err
