"""The paper-layout tables: scores (grouped by budget, one row per method, ``Avg`` retention)
and efficiency (tokens, latency, memory, FLOPs, speed-up vs full). Built as :class:`TableBlock`
objects that ``render`` turns into Markdown, LaTeX and CSV.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from visionzip_eval import roofline
from visionzip_eval import benchmarks as B
from visionzip_eval.report import stats
from visionzip_eval.report.collect import Results
from visionzip_eval.noise import noise_summary
from visionzip_eval.benchmarks.paper import (
    MME_NOTE, PAPER_MARK, PAPER_NOTE, paper_efficiency_rows, paper_rows,
)

POPE_METRICS = {"f1": "pope_f1_score", "accuracy": "pope_accuracy"}
MME_MODES = ("perception", "total")


@dataclass(frozen=True)
class TableOptions:
    """``pope_metric``: ``f1`` (the lmms-eval/LLaVA convention) or ``accuracy``;
    ``mme``: ``perception`` (200 points per perception category present: 0-2000 with all 10)
    or ``total`` (perception + cognition, 0-2800 with all 14 categories, the paper's apparent
    convention); ``paper``: show the paper's rows when the model matches."""

    pope_metric: str = "f1"
    mme: str = "perception"
    paper: bool = True
    intervals: bool = False  # md/tex cells as "score ± half-width" of the 95% interval (the CSV always has them)

    def __post_init__(self) -> None:
        if self.pope_metric not in POPE_METRICS:
            raise ValueError(f"pope_metric must be one of {sorted(POPE_METRICS)}, got {self.pope_metric!r}")
        if self.mme not in MME_MODES:
            raise ValueError(f"mme must be one of {list(MME_MODES)}, got {self.mme!r}")


@dataclass
class Column:
    key: str
    header: str
    fmt: str  # score_pct, score_pts, avg, delta, int, ms, ms_sig, ratio, gib, tflops, speedup, seconds, rate
    better: str | None = None  # "max", "min" or None (never bold)
    sub: str = ""  # shown after the header in Markdown/LaTeX only (the sample size: " (n=240)")


@dataclass
class TableBlock:
    """One table: ``frame`` has ``group`` (header text), ``label``, ``source`` (measured /
    paper) and one column per :class:`Column`; ``bold`` holds (row position, column key)."""

    title: str
    frame: pd.DataFrame
    columns: list[Column]
    notes: list[str] = field(default_factory=list)
    bold: set[tuple[int, str]] = field(default_factory=set)
    csv_extra: list[str] = field(default_factory=list)  # identity columns written to the CSV
    csv_after: list[str] = field(default_factory=list)  # written to the CSV after the columns (n, intervals)
    plusminus: dict[str, str] = field(default_factory=dict)  # column key -> its half-width column (md/tex)


# -- scores ----------------------------------------------------------------------------------------


def _mme_scale_text(cells: pd.DataFrame, options: TableOptions) -> str:
    """MME's points scale from the categories the runs hold (200 per category present)."""
    what = "perception + cognition score" if options.mme == "total" else "perception score"
    counts = sorted({int(v) for v in cells["categories"] if not pd.isna(v)}) if len(cells) else []
    per = B.MME_POINTS_PER_CATEGORY
    if not counts:
        full = ("0-2800) if all 14 categories are present" if options.mme == "total"
                else "0-2000) if all 10 perception categories are present")
        return f"{what}, points ({full} ({per:.0f} per category; no samples file to count those of this run)"
    if len(counts) == 1:
        n = counts[0]
        return f"{what}, points (0-{per * n:.0f}: {per:.0f} per category x {n} categor{'y' if n == 1 else 'ies'})"
    ranges = ", ".join(f"0-{per * n:.0f} ({n} categories)" for n in counts)
    return f"{what}, points ({per:.0f} per category present; runs differ: {ranges})"


def _mmb_scale_text(cells: pd.DataFrame) -> str:
    """MMBench's evaluation as the runs hold it: circular only when a question comes in several
    option rotations (lmms-eval groups rows by ``index`` mod 1e6)."""
    values = [v for v in cells["circular"].tolist() if v is not None and not pd.isna(v)] if len(cells) else []
    if not values:
        return "accuracy, %"
    circular = sum(bool(v) for v in values)
    if circular == len(values):
        return ("accuracy (circular evaluation: a question counts only if every rotation of its options "
                "is answered right), %")
    if circular == 0:
        return "accuracy (single pass: each question asked once, in one option order), %"
    return f"accuracy (circular evaluation in {circular} of {len(values)} runs only), %"


def _scale_text(key: str, options: TableOptions, cells: pd.DataFrame | None = None) -> str:
    bench = B.get(key)
    name = bench.name if bench else key
    mine = cells[cells["benchmark"] == key] if cells is not None and "categories" in cells else None
    if key == "MME":
        text = _mme_scale_text(mine if mine is not None else pd.DataFrame(columns=["categories"]), options)
    elif key == "MMB" and mine is not None:
        text = _mmb_scale_text(mine)
    elif key == "POPE":
        text = "F1, %" if options.pope_metric == "f1" else "accuracy, %"
    else:
        text = bench.scale_text if bench else "its first metric, as lmms-eval reports it"
    return f"{name} {text}"


def _scale_and_chance(bench_key: str, metric: str | None, facts: pd.DataFrame) -> dict:
    """The run's maximum score and chance score on the report scale (NaN where unknown or none),
    the MME categories counted, and whether MMBench ran circular; ``facts``: the run's rows of
    ``Results.samples``."""
    bench = B.get(bench_key)
    out = dict(max_score=math.nan, chance=math.nan, categories=math.nan, circular=None)
    if bench is None:
        return out
    if bench_key == "MME":
        n = int(facts.loc[facts["metric"].isin(metric.split("+")), "categories"].sum()) if metric else 0
        if n:
            out["categories"] = float(n)
            out["max_score"] = B.MME_POINTS_PER_CATEGORY * n
    else:
        out["max_score"] = 100.0
    if bench_key == "MMB":
        if len(facts):
            out["circular"] = bool(facts["circular"].iloc[0])
            out["chance"] = 100.0 * float(facts["chance"].iloc[0])
    elif bench.chance is not None:
        out["chance"] = bench.chance * out["max_score"]
    return out


def _pick(metrics: dict[str, float], bench_key: str, options: TableOptions) -> tuple[float, str | None]:
    """The table's score for one run: (score on the report scale, metric name)."""
    if bench_key == "MME":
        perception = metrics.get("mme_perception_score")
        if options.mme == "total":
            cognition = metrics.get("mme_cognition_score")
            if perception is None or cognition is None:
                return math.nan, None
            return perception + cognition, "mme_perception_score+mme_cognition_score"
        return (math.nan, None) if perception is None else (perception, "mme_perception_score")
    if bench_key == "POPE":
        name = POPE_METRICS[options.pope_metric]
        return (metrics[name], name) if name in metrics else (math.nan, None)
    bench = B.get(bench_key)
    names = bench.metrics if bench else tuple(metrics)
    for name in names:
        if name in metrics:
            return metrics[name], name
    return math.nan, None


def score_cells(results: Results, options: TableOptions = TableOptions()) -> pd.DataFrame:
    """One row per complete run: model, method, budget, budget_total, benchmark, seed,
    tokens_per_image, metric (the one the table uses), score (report scale), max_score and
    chance (the score a guesser gets; NaN: none or unknown) on the same scale, categories (MME
    categories counted) and circular (MMBench), from what the run's samples say."""
    ok = results.ok
    samples = dict(tuple(results.samples.groupby("path")))
    no_samples = results.samples.iloc[:0]
    rows = []
    for _, run in ok.groupby("path", sort=False):
        first = run.iloc[0]
        metrics = dict(zip(run["metric"], run["score"]))
        score, metric = _pick(metrics, first["benchmark"], options)
        facts = samples.get(first["path"], no_samples)
        units = stats.run_units(first["path"], first["task"], first["benchmark"], metric)
        ci = stats.interval(units) if units is not None else None
        # no per-sample scoring for this metric (Video-MME, no samples file): lmms-eval's own count
        counted = float(first["n_samples"]) if ci is None and pd.notna(first["n_samples"]) else math.nan
        rows.append(dict(
            units=units, n=ci.n if ci else counted, unit=units.unit if units else None if math.isnan(counted) else "questions",
            ci_low=ci.low if ci else math.nan, ci_high=ci.high if ci else math.nan,
            limit=first["limit"],
            run_id=first["run_id"], model=first["model"], pretrained=first["pretrained"],
            method=first["method"], budget=first["budget"], budget_total=first["budget_total"],
            task=first["task"], benchmark=first["benchmark"], seed=first["seed"],
            tokens_per_image=first["tokens_per_image"], full_tokens_per_image=first["full_tokens_per_image"],
            metric=metric, score=score, **_scale_and_chance(first["benchmark"], metric, facts),
            tuned_from=first["tuned_from"] if isinstance(first["tuned_from"], str) else None,
            tuned_as=f"{B.method_name(first['tuned_method'])} {first['tuned_budget']}"
            if isinstance(first["tuned_from"], str) else None,
        ))
    return pd.DataFrame(rows)


def _with_tuned_rows(cells: pd.DataFrame) -> pd.DataFrame:
    """Runs of a checkpoint tuned under a reduction (``tuned_from``: the model it was tuned
    from) get the paper's mark on their method (``visionzip‡``) and join the table of the
    results' model with that ``pretrained``, when there is one, beside its untuned rows."""
    tuned = cells["tuned_from"].notna()
    if not tuned.any():
        return cells
    cells = cells.copy()
    cells.loc[tuned, "method"] = cells.loc[tuned, "method"].astype(str) + B.TUNED_MARK
    base = dict(cells.loc[~tuned, ["pretrained", "model"]].drop_duplicates("pretrained").itertuples(index=False))
    cells.loc[tuned, "model"] = [base.get(source, model) for source, model in
                                 zip(cells.loc[tuned, "tuned_from"], cells.loc[tuned, "model"])]
    return cells


def _group_key(budget: str, budget_total: float) -> float:
    return math.inf if budget == "full" else float(budget_total) if not pd.isna(budget_total) else -1.0


def _group_title(tokens: float, full: float, is_full: bool) -> str:
    t = "?" if pd.isna(tokens) else f"{int(round(tokens))}"
    if is_full:
        return f"Upper bound, {t} tokens (100%)"
    if pd.isna(full) or pd.isna(tokens) or full <= 0:
        return f"Retain {t} tokens"
    return f"Retain {t} tokens (↓ {100 * (1 - tokens / full):.1f}%)"


def chance_exclusions(cells: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """Benchmarks one model's full-budget score (mean over its runs) is at or below chance on:
    key -> (score, chance). Retention of a guessing model is noise, so Avg leaves them out."""
    out = {}
    if cells.empty or "chance" not in cells:
        return out
    full = cells[cells["budget"] == "full"]
    for key, rows in full.groupby("benchmark", sort=False):
        score, chance = rows["score"].mean(), rows["chance"].mean()
        if not pd.isna(score) and not pd.isna(chance) and score <= chance + 1e-9 * max(1.0, abs(chance)):
            out[str(key)] = (float(score), float(chance))
    return dict(sorted(out.items(), key=lambda kv: B.sort_key(kv[0])))


def _avg(scores: dict[str, float], full: dict[str, float], keys: list[str]) -> tuple[float, int]:
    """Mean of score / full-budget score over ``keys`` (in %), and how many entered it."""
    ratios = [
        scores[k] / full[k] for k in keys
        if not pd.isna(scores.get(k, math.nan)) and not pd.isna(full.get(k, math.nan)) and full[k] != 0
    ]
    return (100 * float(np.mean(ratios)) if ratios else math.nan), len(ratios)


def _same_accounting(measured: str, published: str) -> bool:
    """Whether a measured method label compares with a published row: the same method, counted
    the same way (the paper's in-LLM rows average the visual tokens over the layers)."""
    return measured in (published, f"{published},count=average")


def _row_label(method: str, budget: str, budget_total: float) -> str:
    name = B.method_name(method)
    if budget != "full" and not pd.isna(budget_total) and budget != str(int(budget_total)):
        name += f" ({budget})"
    return name


def score_tables(results: Results, options: TableOptions = TableOptions()) -> list[TableBlock]:
    """One block per model, in the paper's layout."""
    cells = score_cells(results, options)
    if cells.empty:
        return []
    cells = _with_tuned_rows(cells)
    blocks = []
    for model, mcells in cells.groupby("model", sort=True):
        blocks.append(_model_score_table(model, mcells, options))
    return blocks


def _budget_groups(cells: pd.DataFrame, bench_keys: list[str]) -> dict[float, dict]:
    """The measured rows by budget group (``_group_key``): each (method, budget)'s mean score
    per benchmark, and the tokens per image its runs kept."""
    mean = cells.groupby(["method", "budget", "benchmark"], sort=False)["score"].mean()
    groups: dict[float, dict] = {}
    for (method, budget), rows in cells.groupby(["method", "budget"], sort=False):
        total = rows["budget_total"].iloc[0]
        key = _group_key(budget, total)
        group = groups.setdefault(key, dict(rows=[], tokens=[], is_full=budget == "full", total=total))
        group["tokens"].extend(rows["tokens_per_image"].dropna().tolist())
        scores = {b: float(mean.get((method, budget, b), math.nan)) for b in bench_keys}
        group["rows"].append(dict(method=method, budget=budget, budget_total=total, scores=scores,
                                  stats=_cell_stats(rows, bench_keys)))
    return groups


def _best_in_group(records: list[dict], start: int, columns: list[str]) -> set[tuple[int, str]]:
    """(row, column) of the best value per column among the group's measured reduced rows
    (``records[start:]``), the paper's bold; none where fewer than two rows or values compete."""
    bold = set()
    candidates = [i for i in range(start, len(records))
                  if records[i]["source"] == "measured" and records[i]["budget"] != "full"]
    if len(candidates) >= 2:
        for column in columns:
            values = {i: records[i][column] for i in candidates if not pd.isna(records[i][column])}
            if len(set(values.values())) >= 2:
                best = max(values.values())
                bold |= {(i, column) for i, v in values.items() if v == best}
    return bold


def _score_notes(cells: pd.DataFrame, options: TableOptions, bench_keys: list[str], full_cells: dict,
                 at_chance: dict, partial_rows: list[str], has_paper: bool, labels: list[str]) -> list[str]:
    """The score table's notes: scales, what Avg is over and leaves out, seeds, bold, ‡, paper."""
    avg_keys = [b for b in bench_keys if b not in at_chance]
    notes = [note for note in [limit_caption(cells)] if note]
    notes.append("Scales: " + "; ".join(_scale_text(b, options, cells) for b in bench_keys) + ".")
    notes.append(n_note(cells, bench_keys, options.intervals))
    notes.append(
        "Avg: mean over the benchmarks of score / the same model's full-budget score, in %; "
        "'–' where a full-budget score is 0 or missing (retention is undefined)."
        if any(pd.isna(full_cells.get(b)) or full_cells.get(b) == 0 for b in avg_keys)
        else "Avg: mean over the benchmarks of score / the same model's full-budget score, in %."
    )
    if at_chance:
        named = "; ".join(f"{B.get(b).name if B.get(b) else b} ({score:.1f}, chance {chance:.1f})"
                          for b, (score, chance) in at_chance.items())
        notes.append(
            "Left out of Avg (the retention of a model that guesses is noise; their columns stay), "
            f"at chance at full budget: {named}."
        )
    if partial_rows:
        notes.append("Avg over the benchmarks present only: " + "; ".join(partial_rows) + ".")
    counts = cells.groupby(["method", "budget", "benchmark"], sort=False)["score"].size()
    if (counts > 1).any():
        notes.append(f"Cells are means over runs (seeds): up to {int(counts.max())} per cell.")
    notes.append("Bold (LaTeX, Markdown): best per column within a budget group among measured reduced rows.")
    if any("(in-LLM" in str(label) for label in labels):
        notes.append(
            "(in-LLM): the method prunes inside the LLM, so every visual token enters it and the row's token count is "
            "what its layers keep after the last pruning layer (the efficiency table's 'Visual tokens in' and "
            "'kept'); its prefill is not that of a pre-LLM method at the same count.")
    tuned = cells["method"].astype(str).str.endswith(B.TUNED_MARK)
    if tuned.any():
        sources = "; ".join(f"{source}: tuned under {tuned_as}" for source, tuned_as in sorted(
            set(zip(cells.loc[tuned, "pretrained"].astype(str), cells.loc[tuned, "tuned_as"].astype(str)))))
        notes.append(
            f"{B.TUNED_MARK} (the paper's notation): runs of a checkpoint fine-tuned under a reduction with "
            f"`visionzip-eval tune` ({sources}; its visionzip_tuning.json says what was trained, on what, for how "
            "long); the paper's VisionZip‡ is the row at the budget it was tuned at. Avg is against the untuned "
            "model's full budget where the results hold it."
        )
    if has_paper:
        notes.append(PAPER_NOTE)
        notes.append(
            "Δ Avg vs paper: this row's Avg minus the paper's, both over the benchmarks the paper reports "
            "among those shown, in percentage points."
        )
        if "MME" in bench_keys and options.mme == "perception":
            notes.append(MME_NOTE)
    return notes


def _model_score_table(model: str, cells: pd.DataFrame, options: TableOptions) -> TableBlock:
    tuned = cells["method"].astype(str).str.endswith(B.TUNED_MARK)
    untuned = cells[~tuned] if (~tuned).any() else cells  # the references: the untuned model's own runs
    pretrained = untuned["pretrained"].dropna().iloc[0] if untuned["pretrained"].notna().any() else None
    bench_keys = sorted(cells["benchmark"].dropna().unique(), key=B.sort_key)
    full_tokens = cells["full_tokens_per_image"].dropna()
    full_tokens = float(full_tokens.iloc[0]) if len(full_tokens) else math.nan

    full_cells = untuned[untuned["budget"] == "full"].groupby("benchmark")["score"].mean().to_dict()
    full_stats = _cell_stats(untuned[untuned["budget"] == "full"], bench_keys)
    at_chance = chance_exclusions(untuned)
    avg_keys = [b for b in bench_keys if b not in at_chance]  # the benchmarks Avg is over
    groups = _budget_groups(cells, bench_keys)

    paper = paper_rows(pretrained) if options.paper else paper_rows(None)
    paper_full = {}
    if len(paper):
        vanilla = paper[paper["budget"] == "full"]
        if len(vanilla):
            paper_full = {b: vanilla.iloc[0].get(b, math.nan) for b in bench_keys}

    records, bold = [], set()
    partial_rows: list[str] = []
    for key in sorted(groups, reverse=True):
        group = groups[key]
        tokens = float(np.median(group["tokens"])) if group["tokens"] else (
            full_tokens if group["is_full"] else group["total"])
        title = _group_title(tokens, full_tokens, group["is_full"])
        start = len(records)
        measured = sorted(group["rows"], key=lambda r: (B.method_sort_key(r["method"]), str(r["budget"])))
        group_paper = []
        if len(paper):
            label = "full" if group["is_full"] else None
            match = paper[paper["budget"] == label] if label else paper[
                pd.to_numeric(paper["budget"], errors="coerce") == group["total"]]
            group_paper = [r for _, r in match.iterrows()]
        for row in measured:
            avg, used = _avg(row["scores"], full_cells, avg_keys)
            if 0 < used < len(avg_keys) and not all(
                    pd.isna(full_cells.get(b)) or full_cells.get(b) == 0 for b in avg_keys):
                missing = [b for b in avg_keys if pd.isna(row["scores"][b])]
                if missing:
                    partial_rows.append(f"{_row_label(row['method'], row['budget'], row['budget_total'])} at "
                                        f"{row['budget']} (no {', '.join(missing)})")
            delta = math.nan
            for prow in group_paper:
                if _same_accounting(row["method"], prow["method"]) and not group["is_full"]:
                    common = [b for b in avg_keys if not pd.isna(prow.get(b, math.nan))]
                    ours, n_ours = _avg(row["scores"], full_cells, common)
                    theirs, n_theirs = _avg({b: prow[b] for b in common}, paper_full, common)
                    if common and n_ours == n_theirs == len(common):
                        delta = ours - theirs
            records.append(dict(
                model=model, pretrained=pretrained, group=title, tokens=tokens,
                token_ratio=tokens / full_tokens if full_tokens else math.nan,
                method=row["method"], budget=row["budget"], source="measured",
                label=_row_label(row["method"], row["budget"], row["budget_total"]),
                **{b: row["scores"][b] for b in bench_keys}, Avg=avg, delta=delta,
                **{k: v for k, v in row["stats"].items() if k != "units"},
                **_avg_interval(row["stats"], full_stats, avg_keys),
            ))
        for prow in group_paper:
            scores = {b: float(prow[b]) if b in prow and not pd.isna(prow[b]) else math.nan for b in bench_keys}
            common = [b for b in avg_keys if not pd.isna(scores[b])]
            if common:
                avg, _ = _avg(scores, paper_full, common)
                label = f"{B.method_name(prow['method'])} (paper{PAPER_MARK})"
            else:
                avg = float(prow["avg_reported"]) if not pd.isna(prow["avg_reported"]) else math.nan
                label = f"{B.method_name(prow['method'])} (paper{PAPER_MARK}, reported Avg)"
            records.append(dict(
                model=model, pretrained=pretrained, group=title, tokens=float(prow["tokens"]),
                token_ratio=float(prow["tokens"]) / full_tokens if full_tokens else math.nan,
                method=prow["method"], budget=prow["budget"], source="paper", label=label,
                **scores, Avg=avg, delta=math.nan,
            ))
        bold |= _best_in_group(records, start, [*bench_keys, "Avg"])

    frame = pd.DataFrame(records)
    columns = [
        Column(b, B.get(b).name if B.get(b) else b, "score_pts" if b == "MME" else "score_pct", "max",
               sub=_n_header(frame, b))
        for b in bench_keys
    ]
    columns.append(Column("Avg", "Avg", "avg", "max"))
    has_paper = (frame["source"] == "paper").any()
    if has_paper:
        columns.append(Column("delta", "Δ Avg vs paper (pp)", "delta", None))

    notes = _score_notes(cells, options, bench_keys, full_cells, at_chance, partial_rows, has_paper,
                         list(frame["label"]))
    title = f"{model}" + (f" ({pretrained})" if pretrained and pretrained != model else "")
    limit = _limit_of(cells)
    if limit is not None:
        title += f" (limit {limit}: for testing, not for comparison)"
    after = [f"{b} {k}" for b in bench_keys for k in ("n", "low", "high")] + ["Avg low", "Avg high"]
    for column in after:
        if column not in frame:
            frame[column] = math.nan
    plusminus = {}
    if options.intervals:
        for key in [*bench_keys, "Avg"]:
            frame[f"{key} ±"] = (frame[f"{key} high"] - frame[f"{key} low"]) / 2
            plusminus[key] = f"{key} ±"
    return TableBlock(
        title=title, frame=frame, columns=columns, notes=notes, bold=bold,
        csv_extra=["model", "pretrained", "group", "tokens", "token_ratio", "method", "budget", "source", "label"],
        csv_after=after, plusminus=plusminus,
    )


# -- sample sizes and intervals (report/stats.py) --------------------------------------------------


def _cell_stats(rows: pd.DataFrame, bench_keys: list[str]) -> dict:
    """``<bench> n/low/high`` of one (method, budget)'s runs, and their scoring units under
    ``units`` (one run per benchmark: with several seeds a cell is a mean and gets no interval)."""
    out: dict = {"units": {}}
    for key in bench_keys:
        mine = rows[rows["benchmark"] == key] if "n" in rows else rows.iloc[0:0]
        one = len(mine) == 1
        out[f"{key} n"] = float(mine["n"].iloc[0]) if one else (float(mine["n"].sum()) if len(mine) else math.nan)
        out[f"{key} low"] = float(mine["ci_low"].iloc[0]) if one else math.nan
        out[f"{key} high"] = float(mine["ci_high"].iloc[0]) if one else math.nan
        out["units"][key] = mine["units"].iloc[0] if one else None
    return out


def _avg_interval(row_stats: dict, full_stats: dict, avg_keys: list[str]) -> dict:
    pairs = [(row_stats["units"].get(k), full_stats["units"].get(k)) for k in avg_keys]
    if not pairs or any(r is None or f is None for r, f in pairs):
        return {"Avg low": math.nan, "Avg high": math.nan}
    _, low, high = stats.retention_interval(pairs)
    return {"Avg low": low, "Avg high": high}


def _limit_of(cells: pd.DataFrame):
    limits = sorted({int(v) for v in cells.get("limit", pd.Series(dtype=float)).dropna()})
    return None if not limits else limits[0] if len(limits) == 1 else "/".join(map(str, limits))


def limit_caption(cells: pd.DataFrame) -> str:
    """"limit 20 (n=20 per benchmark): for testing, not for comparison" for a limited run."""
    limit = _limit_of(cells)
    if limit is None:
        return ""
    ns = {b: sorted({int(v) for v in rows["n"].dropna()}) for b, rows in cells.groupby("benchmark", sort=False)}
    units = {b: next((u for u in rows["unit"] if isinstance(u, str)), "questions")
             for b, rows in cells.groupby("benchmark")}
    same = {tuple(v) for v in ns.values()}
    if len(same) == 1 and len(next(iter(same))) == 1 and set(units.values()) == {"questions"}:
        what = f"n={next(iter(same))[0]} per benchmark"
    else:
        what = "n: " + ", ".join(f"{B.get(b).name if B.get(b) else b} {'/'.join(map(str, v)) or '?'} {units[b]}"
                                 for b, v in sorted(ns.items(), key=lambda kv: B.sort_key(kv[0])))
    return f"limit {limit} ({what}): for testing, not for comparison."


def _n_header(frame: pd.DataFrame, key: str) -> str:
    """" (n=240)" for a column whose measured cells all count the same units; a range otherwise."""
    column = f"{key} n"
    values = sorted({int(v) for v in frame[column].dropna()}) if column in frame else []
    if not values:
        return ""
    return f" (n={values[0]})" if len(values) == 1 else f" (n={values[0]}-{values[-1]})"


def n_note(cells: pd.DataFrame, bench_keys: list[str], plusminus: bool) -> str:
    units = {b: next((u for u in cells.loc[cells["benchmark"] == b, "unit"] if isinstance(u, str)), None)
             for b in bench_keys}
    counted = "; ".join(f"{B.get(b).name if B.get(b) else b}: {u}" for b, u in units.items() if u)
    text = ("n: the units each score averages over, per benchmark cell (" + (counted or "no samples file") + "); "
            "the CSV has every cell's n and its 95% interval (`<benchmark> low/high`, `Avg low/high`): Wilson for "
            "proportions, else a bootstrap over the units (docs/statistics.md).")
    if plusminus:
        text += " Cells read score ± half-width of that interval."
    return text


# -- efficiency ------------------------------------------------------------------------------------

EFFICIENCY_COLUMNS = [
    Column("input_tokens", "Visual tokens in", "int", None),
    Column("tokens", "Visual tokens kept", "int", None),
    Column("prefill_p10", "Prefill ms p10", "ms", "min"),
    Column("prefill_p50", "Prefill ms p50", "ms", "min"),
    Column("prefill_p90", "Prefill ms p90", "ms", "min"),
    Column("ttft_p50", "TTFT ms p50", "ms", "min"),
    Column("decode_per_token_p50", "Decode ms/token p50", "ms", "min"),
    Column("e2e_p50", "End-to-end ms p50", "ms", "min"),
    Column("e2e_p90", "End-to-end ms p90", "ms", "min"),
    Column("total_s", "Total time s", "seconds", "min"),
    Column("batch", "Batch", "int", None),
    Column("requests_per_s", "Requests/s", "rate", "max"),
    Column("peak_gib", "Peak memory GiB", "gib", "min"),
    Column("tflops", "TFLOPs/request", "tflops", "min"),
    Column("prefill_speedup", "Prefill speed-up", "speedup", "max"),
    Column("e2e_speedup", "End-to-end speed-up", "speedup", "max"),
    Column("throughput_speedup", "Requests/s speed-up", "speedup", "max"),
    # roofline.py's lower bounds: what the device allows, and how far the measurement is from it
    Column("roofline_p50", "Prefill roofline ms", "ms_sig", None),
    Column("roofline_ratio", "Prefill measured / roofline", "ratio", None),
    Column("ttft_roofline_p50", "TTFT roofline ms", "ms_sig", None),
    Column("ttft_roofline_ratio", "TTFT measured / roofline", "ratio", None),
    Column("roofline_speedup", "Roofline speed-up", "speedup", None),
    Column("requests", "Requests", "int", None),
    Column("failed", "Failed", "int", None),
]


NOISY_MARK = "†"


def _efficiency_rows(requests: pd.DataFrame, full_tokens: float, noise: dict[str, str] | None = None) -> list[dict]:
    """One row per (method, budget); ``noise``: run id -> why its timing is noisy."""
    noise = noise or {}
    rows = []
    work: dict[tuple, pd.DataFrame] = {}  # (method, budget) -> its measured requests with a bound
    for (method, budget), reqs in requests.groupby(["method", "budget"], sort=False):
        measured = reqs[reqs["measured"]]
        flops = (measured["prefill_flops"].fillna(0) + measured["vision_flops"].fillna(0))[
            measured["prefill_flops"].notna()]

        def med(series):
            series = pd.to_numeric(series, errors="coerce").dropna()
            return float(series.median()) if len(series) else math.nan

        def pct(series, q):
            series = pd.to_numeric(series, errors="coerce").dropna()
            return float(np.percentile(series.to_numpy(dtype=float), q)) if len(series) else math.nan

        def ratio(measured_key, bound_key):
            return med(measured[measured_key] / measured[bound_key].where(measured[bound_key] > 0))

        total = reqs["budget_total"].iloc[0]
        # a batch's requests each carry the batch's end-to-end time: its wall time counts once
        batch = pd.to_numeric(measured["batch_size"], errors="coerce").fillna(1).clip(lower=1)
        wall_s = float((pd.to_numeric(measured["total_ms"], errors="coerce") / batch).sum()) / 1e3
        bound_by = measured["roofline_bound_by"].dropna()
        bounded = measured[measured["prefill_roofline_ms"].notna()]
        work[(method, budget)] = bounded
        rows.append(dict(
            method=method, budget=budget, budget_total=total,
            tokens=med(measured["tokens_per_image"]) if len(measured) else med(reqs["tokens_per_image"]),
            input_tokens=med(measured["input_tokens_per_image"]) if len(measured) else med(reqs["input_tokens_per_image"]),
            prefill_p10=pct(measured["prefill_ms"], 10), prefill_p50=med(measured["prefill_ms"]),
            prefill_p90=pct(measured["prefill_ms"], 90),
            ttft_p50=med(measured["ttft_ms"]),
            decode_per_token_p50=med(measured["decode_ms_per_token"]),
            e2e_p50=med(measured["total_ms"]), e2e_p90=pct(measured["total_ms"], 90),
            total_s=wall_s if len(measured) else math.nan,
            batch=med(batch), requests_per_s=len(measured) / wall_s if wall_s > 0 else math.nan,
            peak_gib=med(measured["peak_memory_bytes"]) / 2**30,
            tflops=med(flops / 1e12),
            roofline_p50=med(measured["prefill_roofline_ms"]),
            roofline_ratio=ratio("prefill_ms", "prefill_roofline_ms"),
            ttft_roofline_p50=med(measured["ttft_roofline_ms"]),
            ttft_roofline_ratio=ratio("ttft_ms", "ttft_roofline_ms"),
            bound_by=str(bound_by.mode().iloc[0]) if len(bound_by) else None,
            requests=float(len(measured)), failed=float(reqs["error"].notna().sum()),
            noise=sorted({noise[r] for r in reqs["run_id"].dropna().unique() if r in noise}),
        ))
    full = [r for r in rows if r["budget"] == "full"]
    for row in rows:
        row["prefill_speedup"] = full[0]["prefill_p50"] / row["prefill_p50"] if full and row["prefill_p50"] else math.nan
        row["e2e_speedup"] = full[0]["e2e_p50"] / row["e2e_p50"] if full and row["e2e_p50"] else math.nan
        row["throughput_speedup"] = (row["requests_per_s"] / full[0]["requests_per_s"]
                                     if full and full[0]["requests_per_s"] > 0 else math.nan)
        # the most the reduction can buy on this device: the bounds' ratio, not the FLOPs'
        row["roofline_speedup"] = _roofline_speedup(work[(full[0]["method"], "full")] if full else None,
                                                    work[(row["method"], row["budget"])])
        # a speed-up is as trustworthy as the noisier of its two measurements
        row["noisy"] = bool(row["noise"] or (full and full[0]["noise"]))
    rows.sort(key=lambda r: (-_group_key(r["budget"], r["budget_total"]), B.method_sort_key(r["method"])))
    for row in rows:
        row["group"] = _group_title(row["tokens"], full_tokens, row["budget"] == "full")
        row["label"] = _row_label(row["method"], row["budget"], row["budget_total"])
        if row["noisy"]:
            row["label"] += f" {NOISY_MARK}"
        row["source"] = "measured"
    return rows


def _roofline_speedup(full: pd.DataFrame | None, reduced: pd.DataFrame) -> float:
    """Median full-budget prefill bound / median reduced one, both at the reduced row's median
    device figures: on a CPU each run is bounded with its own probe, and a ratio of bounds
    taken at two probes would measure the probes, not the reduction."""
    if full is None or full.empty or reduced.empty:
        return math.nan
    device = roofline.Device("common", float(reduced["roofline_tflops"].median()),
                             float(reduced["roofline_bandwidth_gbs"].median()), "")

    def bound(reqs):
        return float(np.median([roofline.stage(f, b, device).ms for f, b in
                                zip(reqs["prefill_roofline_flops"], reqs["prefill_roofline_bytes"])]))

    low = bound(reduced)
    return bound(full) / low if low > 0 else math.nan


def _is_video(requests: pd.DataFrame) -> pd.Series:
    videos = pd.to_numeric(requests["videos"], errors="coerce")
    by_bench = requests["benchmark"].isin(B.VIDEO_BENCHMARKS)
    return videos.fillna(0).gt(0) | (videos.isna() & by_bench)


def efficiency_scopes(requests: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(scope id, title, requests) per model: image tasks pooled, then each task."""
    scopes = []
    if requests.empty:
        return scopes
    for model, reqs in requests.groupby("model", sort=True):
        images = reqs[~_is_video(reqs)]
        if images["task"].nunique() > 1:
            scopes.append((model, "all image tasks", images))
        for task, treqs in reqs.groupby("task", sort=True):
            scopes.append((model, str(task), treqs))
    return scopes


def efficiency_tables(results: Results) -> list[TableBlock]:
    blocks = []
    requests = results.requests
    if requests.empty:
        return blocks
    runs = results.runs
    noise = {r["run_id"]: r["noise"] for _, r in runs[runs["noisy"]].iterrows()}
    for model, scope, reqs in efficiency_scopes(requests):
        mruns = runs[runs["model"] == model]
        full_tokens = mruns["full_tokens_per_image"].dropna()
        full_tokens = float(full_tokens.iloc[0]) if len(full_tokens) else math.nan
        rows = _efficiency_rows(reqs, full_tokens, noise)
        frame = pd.DataFrame(rows)
        frame.insert(0, "model", model)
        frame.insert(1, "scope", scope)
        bold = set()
        for col in EFFICIENCY_COLUMNS:
            if col.better is None:
                continue
            values = frame[col.key].dropna()
            if values.nunique() >= 2:
                best = values.max() if col.better == "max" else values.min()
                bold |= {(i, col.key) for i, v in frame[col.key].items() if v == best}
        kinds = set(reqs["peak_memory_kind"].dropna())
        notes = [
            "Over measured requests (warm-up and failed requests left out; failed ones counted). "
            "Visual tokens: per image (per frame for video); in: entering the LLM, kept: after an in-LLM "
            "method's last pruning layer (the same for pre-LLM methods). Decode ms/token: decode time over the "
            "tokens generated after the first. Total time: the requests' wall time (a batch's end-to-end time "
            "counted once); Requests/s: requests over it, so it grows with the sweep's batch_size. TFLOPs: vision tower + "
            "LLM prefill, per request (decode not counted). Speed-ups: full-budget median / this row's median, "
            "both from this sweep."
        ]
        if any(row["noisy"] for row in rows):
            flagged = runs[runs["noisy"] & runs["run_id"].isin(set(reqs["run_id"].dropna()))]
            notes.append(
                f"{NOISY_MARK} This row or its full-budget reference was timed on a noisy machine "
                f"({noise_summary(flagged)}): its times and speed-ups are not to be trusted. "
                "`visionzip-eval sweep CONFIG --rerun-noisy` runs those runs again."
            )
        notes += roofline_notes(reqs, rows)
        if "process_peak_rss" in kinds:
            notes.append(
                "Peak memory on CPU is the process's peak RSS, which only grows during a process: runs that "
                "share a sweep process inherit earlier peaks, so it does not compare across budgets."
            )
        if "cuda_max_allocated" in kinds:
            notes.append("Peak memory: CUDA allocator peak, reset before each request.")
        pretrained = mruns["pretrained"].dropna()
        ref = paper_efficiency_rows(pretrained.iloc[0] if len(pretrained) else None)
        if len(ref):
            parts = [f"{B.method_name(r['method'])} {int(r['tokens'])} tokens: prefill {r['prefill_ms']} ms, "
                     f"total {r['total_s']} s" for _, r in ref.iterrows()]
            bench = ref.iloc[0]
            notes.append(
                f"Paper{PAPER_MARK} ({bench['benchmark']}, {bench['hardware']}; approximate transcription): "
                + "; ".join(parts) + "."
            )
        blocks.append(TableBlock(
            title=f"{model}: {scope}", frame=frame, columns=EFFICIENCY_COLUMNS, notes=notes, bold=bold,
            csv_extra=["model", "scope", "group", "method", "budget", "label"],
        ))
    return blocks


def _row_at_budget(row) -> str:
    """A row named in a note: "VisionZip 64", "Vanilla full", "VisionZip (54+10)"."""
    label = _row_label(row["method"], row["budget"], row["budget_total"])
    return label if label.endswith(f"({row['budget']})") else f"{label} {row['budget']}"


def roofline_notes(requests: pd.DataFrame, rows: list[dict]) -> list[str]:
    """What the roofline columns mean here: the device entry, what limits each row, the rows
    without a bound and why, and any measurement faster than its bound."""
    notes = [
        "Roofline: a lower bound on each request's time on this device (visionzip_eval/roofline.py, README "
        "*Roofline*). Prefill: max(decoder FLOPs / peak FLOP/s, (decoder weights + K/V written) / memory "
        "bandwidth); TTFT adds the vision tower + projector and the LM head, each bounded the same way. "
        "Measured / roofline: median over requests of measured time / its bound (1× = at the device's limit). "
        "Roofline speed-up: the full-budget bound / this row's, the most the reduction can speed the prefill "
        "up on this device (the FLOPs ratio holds only while compute is the limit)."
    ]
    bounded = requests[requests["prefill_roofline_ms"].notna()]
    for name, dev in bounded.groupby("roofline_device", sort=True):
        flops, gbs = dev["roofline_tflops"].astype(float), dev["roofline_bandwidth_gbs"].astype(float)
        entry = next((d for d in roofline.DEVICES if d.name == name), None)
        if entry is not None:
            notes.append(f"Device: {entry.describe()} (dense fp16/bf16; {entry.source}).")
        else:  # the CPU: each run bounded with its own probe
            def span(values, scale, unit):
                low, high = values.min() * scale, values.max() * scale
                return f"{low:.3g} {unit}" if math.isclose(low, high, rel_tol=0.005) else f"{low:.3g}-{high:.3g} {unit}"
            notes.append(
                f"Device: CPU, each run bounded with {roofline.CPU_SOURCE} ({span(flops, 1e3, 'GFLOP/s')}, "
                f"{span(gbs, 1, 'GB/s')} over these runs). A small matmul and a cache-sized copy are not the CPU's "
                "peaks: the bound is as good as the probe, and bounds of runs with different probes do not compare "
                "(the roofline speed-up takes both at one row's figures)."
            )
    limits = defaultdict(list)
    for row in rows:
        if row.get("bound_by"):
            limits[row["bound_by"]].append(_row_at_budget(row))
    if limits:
        notes.append("Prefill limited by: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(limits.items())) + ".")
    unbounded = requests[requests["prefill_roofline_ms"].isna() & requests["roofline_reason"].notna()]
    for reason, reqs in unbounded.groupby("roofline_reason", sort=True):
        runs = reqs.drop_duplicates(["method", "budget"])
        which = ", ".join(_row_at_budget(r) for _, r in runs.iterrows())
        notes.append(f"No roofline (–) for {which}: {reason}.")
    below = [_row_at_budget(row) for row in rows
             if any(row[key] < 1 for key in ("roofline_ratio", "ttft_roofline_ratio"))]  # NaN: False
    if below:
        notes.append(
            "Measured faster than the roofline for " + ", ".join(below) + ": the device figures understate this "
            "machine there (on a CPU: the probe read slow, or the machine sped up after it), so there the roofline "
            "is no bound."
        )
    if pd.to_numeric(bounded["batch_size"], errors="coerce").gt(1).any():
        notes.append("Batched requests: a batch of b is bounded as b requests like each one (weights read once), "
                     "the batch's time being what each of its requests records.")
    return notes


def problems_markdown(results: Results) -> str:
    """The failed and incomplete runs as a Markdown list (empty string when none)."""
    problems = results.problems
    if problems.empty:
        return ""
    lines = [f"## Runs not in the tables ({len(problems)})", ""]
    lines += ["| run | status | error |", "|---|---|---|"]
    for _, row in problems.iterrows():
        error = str(row["error"] or "").replace("|", "\\|").replace("\n", " ")
        if len(error) > 300:
            error = error[:297] + "..."
        lines.append(f"| `{row['run_id']}` | {row['status']} | {error} |")
    return "\n".join(lines)
