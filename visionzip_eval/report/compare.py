"""Paired comparisons of methods in one sweep: they answered the same questions, so each
difference is judged on the questions both answered (report/stats.py's paired tests).

``visionzip-eval compare RESULTS A B`` prints :func:`compare_markdown`; the report's
``table.md`` carries :func:`comparison_section` (the headline ordering per budget, ties it
cannot separate marked, and every method against VisionZip per benchmark).

Selectors: ``METHOD[@BUDGET]``. METHOD is the run's method label as the run folders name it
(``visionzip``, ``random``, ``fastv,count=average``; ``none`` or ``vanilla``: the unreduced
model); BUDGET a budget label (``64``, ``54+10``, ``full``). Without ``@BUDGET`` a side is taken
at every budget both sides ran, or, when it ran one budget only (``vanilla``: full), at that one
against each of the other side's.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from visionzip_eval import benchmarks as B
from visionzip_eval.report import stats
from visionzip_eval.report.collect import Results
from visionzip_eval.report.tables import TableOptions, chance_exclusions, score_cells

NOT_DISTINGUISHABLE = "not distinguishable at this n"
TIE = "≈"


@dataclass(frozen=True)
class Selector:
    method: str
    budget: str | None = None

    @classmethod
    def parse(cls, text: str) -> Selector:
        method, at, budget = str(text).rpartition("@") if "@" in str(text) else (str(text), "", "")
        method = method.strip()
        if not method or (at and not budget.strip()):
            raise ValueError(f"bad selector {text!r}: write METHOD[@BUDGET], e.g. visionzip@64, random, vanilla@full")
        method = "none" if method.lower() in ("vanilla", "none") else method
        return cls(method, budget.strip() or None)

    def __str__(self) -> str:
        return self.method + (f"@{self.budget}" if self.budget else "")


def _label(method: str, budget: str) -> str:
    return f"{B.method_name(method)} @{budget}"


def _verdict(result: stats.Paired, name_a: str, name_b: str) -> str:
    if not result.distinguishable:
        return NOT_DISTINGUISHABLE
    return f"{name_b} higher" if result.difference > 0 else f"{name_a} higher"


def _cells(results: Results, options: TableOptions, model: str | None) -> pd.DataFrame:
    cells = score_cells(results, options)
    if cells.empty:
        raise ValueError(f"{results.root} holds no complete run to compare")
    models = sorted(cells["model"].dropna().unique())
    if model is None and len(models) > 1:
        raise ValueError(f"the results hold several models ({', '.join(models)}): choose one with --model")
    if model is not None:
        if model not in models:
            raise ValueError(f"no model {model!r} in the results: choose one of {', '.join(models)}")
        cells = cells[cells["model"] == model]
    return cells


def _budget_pairs(cells: pd.DataFrame, a: Selector, b: Selector) -> list[tuple[str, str]]:
    def budgets(sel: Selector) -> list[str]:
        mine = cells[cells["method"] == sel.method]
        if mine.empty:
            known = ", ".join(sorted(cells["method"].astype(str).unique()))
            raise ValueError(f"no complete run of method {sel.method!r}: the results hold {known}")
        found = sorted(mine["budget"].astype(str).unique())
        if sel.budget is None:
            return found
        if sel.budget not in found:
            raise ValueError(f"{sel.method} has no run at budget {sel.budget}: it ran at {', '.join(found)}")
        return [sel.budget]

    left, right = budgets(a), budgets(b)
    if a.budget is None and b.budget is None:
        common = [x for x in left if x in right]
        if common:
            return [(x, x) for x in common]
    if len(left) == 1 or len(right) == 1 or a.budget or b.budget:
        return [(x, y) for x in left for y in right]
    raise ValueError(f"{a} and {b} share no budget: name one with @BUDGET")


def compare(results: Results, a: Selector, b: Selector, options: TableOptions = TableOptions(),
            model: str | None = None) -> pd.DataFrame:
    """One row per (budget pair, benchmark) plus an Avg-retention row per budget pair: B - A on
    the units both answered, its 95% interval, the paired test, its p-value and the verdict."""
    return compare_cells(_cells(results, options, model), a, b)


def compare_cells(cells: pd.DataFrame, a: Selector, b: Selector) -> pd.DataFrame:
    """:func:`compare` on one model's :func:`score_cells`."""
    full = cells[cells["budget"] == "full"]
    rows = []
    for budget_a, budget_b in _budget_pairs(cells, a, b):
        side_a = cells[(cells["method"] == a.method) & (cells["budget"].astype(str) == budget_a)]
        side_b = cells[(cells["method"] == b.method) & (cells["budget"].astype(str) == budget_b)]
        name_a, name_b = _label(a.method, budget_a), _label(b.method, budget_b)
        triples = []
        for key in sorted(set(side_a["benchmark"]) & set(side_b["benchmark"]), key=B.sort_key):
            ua, ub = side_a[side_a["benchmark"] == key], side_b[side_b["benchmark"] == key]
            if len(ua) != 1 or len(ub) != 1 or ua["units"].iloc[0] is None or ub["units"].iloc[0] is None:
                rows.append(dict(a=name_a, b=name_b, benchmark=key, verdict="no per-sample results to pair"))
                continue
            result = stats.paired(ua["units"].iloc[0], ub["units"].iloc[0])
            rows.append(_row(name_a, name_b, key, ua["unit"].iloc[0], result))
            fk = full[full["benchmark"] == key]
            if len(fk) == 1 and fk["units"].iloc[0] is not None and key not in chance_exclusions(cells):
                triples.append((ua["units"].iloc[0], ub["units"].iloc[0], fk["units"].iloc[0]))
        if len(triples) >= 2:
            rows.append(_row(name_a, name_b, "Avg", "questions per benchmark (fewest)",
                             stats.retention_difference(triples)))
    return pd.DataFrame(rows)


def _row(name_a: str, name_b: str, key: str, unit: str, result: stats.Paired) -> dict:
    return dict(a=name_a, b=name_b, benchmark=key, n=result.n, unit=unit, score_a=result.score_a,
                score_b=result.score_b, difference=result.difference, low=result.low, high=result.high,
                test=result.test, p_value=result.p_value, a_only=result.a_only, b_only=result.b_only,
                verdict=_verdict(result, name_a, name_b))


def _fmt(value, digits=1) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def compare_markdown(frame: pd.DataFrame) -> str:
    """The comparison as a Markdown table, one line per benchmark (Avg: retention, pp)."""
    lines = ["| A | B | benchmark | n | A | B | B − A [95% CI] | test | p | verdict |",
             "|---|---|---|---:|---:|---:|---|---|---:|---|"]
    for _, r in frame.iterrows():
        if pd.isna(r.get("difference")):
            lines.append(f"| {r['a']} | {r['b']} | {r['benchmark']} | – | – | – | – | – | – | {r['verdict']} |")
            continue
        n = f"{int(r['n'])} {r['unit']}" if r["benchmark"] != "Avg" else f"{int(r['n'])}"
        discordant = (f" ({int(r['a_only'])} vs {int(r['b_only'])} discordant)"
                      if not pd.isna(r.get("a_only")) else "")
        name = "Avg retention (pp)" if r["benchmark"] == "Avg" else (B.get(r["benchmark"]).name
                                                                    if B.get(r["benchmark"]) else r["benchmark"])
        lines.append(
            f"| {r['a']} | {r['b']} | {name} | {n} | {_fmt(r['score_a'])} | {_fmt(r['score_b'])} | "
            f"{r['difference']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}] | {r['test']}{discordant} | "
            f"{r['p_value']:.3g} | {r['verdict']} |")
    return "\n".join(lines)


COMPARE_NOTE = (
    "Paired on the units both runs answered (questions; MME image pairs; MMBench circular groups). B − A: "
    "the difference of the benchmark's score (Avg: of the retention against the same full-budget run, in "
    "percentage points) with its 95% paired-bootstrap interval (fixed seed). Test: exact McNemar on the "
    "discordant units where the score is a share of units right (GQA, MMBench, POPE accuracy), else the paired "
    "bootstrap's two-sided p. \"" + NOT_DISTINGUISHABLE + "\": p ≥ 0.05, so this sweep cannot tell the two apart; "
    "not a finding that they are equal (docs/statistics.md). No correction for comparing many pairs."
)


def comparison_section(results: Results, options: TableOptions = TableOptions()) -> str:
    """table.md's section: per model and reduced budget, methods ordered by Avg retention with
    ties the paired test cannot separate marked, then every method against VisionZip."""
    cells = score_cells(results, options)
    if cells.empty or cells["units"].isna().all():
        return ""
    parts = ["## Paired comparisons", ""]
    for model, mcells in cells.groupby("model", sort=True):
        full = mcells[mcells["budget"] == "full"]
        keys = [k for k in sorted(mcells["benchmark"].unique(), key=B.sort_key)
                if k not in chance_exclusions(mcells) and (full["benchmark"] == k).sum() == 1]
        if not keys:
            continue
        budgets = sorted({str(b) for b in mcells["budget"] if str(b) != "full"},
                         key=lambda b: -float(mcells.loc[mcells["budget"] == b, "budget_total"].iloc[0] or 0))
        for budget in budgets:
            line = _headline(mcells[mcells["budget"].astype(str) == budget], full, keys)
            if line:
                parts.append(f"- {model}, {budget} tokens: {line}")
        reference = "visionzip" if (mcells["method"] == "visionzip").any() else None
        if reference:
            frames = []
            for method in sorted(mcells["method"].astype(str).unique(), key=B.method_sort_key):
                if method in (reference, "none"):
                    continue
                for budget in budgets:
                    has = lambda m: ((mcells["method"] == m) & (mcells["budget"].astype(str) == budget)).any()  # noqa: E731
                    if has(method) and has(reference):
                        frames.append(compare_cells(mcells, Selector(reference, budget), Selector(method, budget)))
            if frames:
                parts += ["", f"### {model}: each method against VisionZip at its budget", "",
                          compare_markdown(pd.concat(frames, ignore_index=True))]
    if len(parts) == 2:
        return ""
    parts += ["", COMPARE_NOTE]
    return "\n".join(parts)


def _headline(cells: pd.DataFrame, full: pd.DataFrame, keys: list[str]) -> str:
    """``VisionZip 95.1% > Pool 90.2% ≈ Random 89.7%``: by Avg retention; ≈ where the paired
    retention difference to the previous method is not distinguishable at this n."""
    runs = {}
    for method, rows in cells.groupby("method", sort=False):
        units = {k: rows.loc[rows["benchmark"] == k, "units"] for k in keys}
        if all(len(u) == 1 and u.iloc[0] is not None for u in units.values()):
            runs[str(method)] = {k: u.iloc[0] for k, u in units.items()}
    fulls = {k: full.loc[full["benchmark"] == k, "units"].iloc[0] for k in keys}
    if len(runs) < 2 or any(u is None for u in fulls.values()):
        return ""
    avg = {m: 100 * sum(u[k].score() / fulls[k].score() for k in keys) / len(keys) for m, u in runs.items()}
    order = sorted(runs, key=lambda m: -avg[m])
    text = f"{B.method_name(order[0])} {avg[order[0]]:.1f}%"
    for prev, method in zip(order, order[1:]):
        diff = stats.retention_difference([(runs[prev][k], runs[method][k], fulls[k]) for k in keys])
        text += f" {'>' if diff.distinguishable else TIE} {B.method_name(method)} {avg[method]:.1f}%"
    return (text + f" (Avg retention over {', '.join(keys)}; {TIE}: not distinguishable from the method before it "
            "at this n by a paired bootstrap, 95%)")
