"""Report figures (matplotlib, no pyplot state: ``Figure`` objects saved as PNG and PDF).

- ``retention``: score retention (% of the full-budget score) vs visual tokens, per benchmark
  (plus the average), with the paper's points when the model is the paper's;
- ``pareto``: average retention vs median prefill latency, with the Pareto front;
- ``memory``: peak memory vs visual tokens;
- ``latency``: per-request prefill and end-to-end latency distributions by budget;
- ``roofline``: measured prefill and TTFT (medians) against their roofline bounds, by budget.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from visionzip_eval import roofline
from visionzip_eval import benchmarks as B
from visionzip_eval.benchmarks.paper import PAPER_MARK, paper_rows
from visionzip_eval.report import stats
from visionzip_eval.report.collect import Results
from visionzip_eval.report.tables import TableOptions, _is_video, chance_exclusions, limit_caption, score_cells

_METHOD_COLORS = {"none": "#1f1f1f", "visionzip": "#2ca02c", "random": "#d62728", "pool": "#ff7f0e",
                  "fastv": "#9467bd", "sparsevlm": "#8c564b"}
_COLORS = ["#1f77b4", "#17becf", "#bcbd22", "#7f7f7f", "#aec7e8", "#ff9896", "#98df8a", "#c5b0d5",
           "#c49c94", "#dbdb8d"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
SCALE_MAX = {"MME": 2000.0}  # fallback when a run's samples do not say which MME categories it holds


def _save(fig: Figure, directory: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        path = directory / f"{stem}.{ext}"
        fig.savefig(path, dpi=150 if ext == "png" else None, bbox_inches="tight")
        paths.append(path)
    return paths


def _style(methods: list[str]) -> dict[str, str]:
    """A fixed colour per known method (same in every figure), others from a palette."""
    others = [m for m in sorted(set(methods), key=B.method_sort_key) if m not in _METHOD_COLORS]
    colors = {m: _COLORS[i % len(_COLORS)] for i, m in enumerate(others)}
    return {**_METHOD_COLORS, **colors}


def _series_label(model: str, method: str, many_models: bool) -> str:
    name = B.method_name(method)
    return f"{model}: {name}" if many_models else name


def _token_axis(ax, ticks: list[float]) -> None:
    ticks = sorted({int(round(t)) for t in ticks if t and not math.isnan(t)})
    if not ticks:
        return
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlim(ticks[0] / 1.25, ticks[-1] * 1.25)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


# -- data ------------------------------------------------------------------------------------------


def _cell_means(results: Results, options: TableOptions) -> pd.DataFrame:
    """Mean score and median tokens per image for each (model, method, budget, benchmark);
    ``at_chance``: the model's full-budget score on that benchmark is at or below chance (left
    out of the averages, as in the table's Avg)."""
    cells = score_cells(results, options)
    if cells.empty:
        return cells
    grouped = cells.groupby(["model", "pretrained", "method", "budget", "benchmark"], dropna=False, sort=False)
    means = grouped.agg(score=("score", "mean"), tokens=("tokens_per_image", "median"),
                        budget_total=("budget_total", "first"), max_score=("max_score", "max"),
                        runs=("score", "size"), units=("units", "first"), n=("n", "first"),
                        unit=("unit", "first")).reset_index()
    means.loc[means["runs"] != 1, "units"] = None  # a mean over seeds: no interval
    excluded = {(model, bench) for model, mcells in cells.groupby("model", sort=False)
                for bench in chance_exclusions(mcells)}
    means["at_chance"] = [(m, b) in excluded for m, b in zip(means["model"], means["benchmark"])]
    full = means[means["budget"] == "full"].groupby(["model", "benchmark"])["score"].mean()
    means["full_score"] = [full.get((m, b), math.nan) for m, b in zip(means["model"], means["benchmark"])]
    ok = means["full_score"].notna() & (means["full_score"] != 0)
    means["retention"] = np.where(ok, 100 * means["score"] / means["full_score"].where(ok), np.nan)
    means["tokens"] = means["tokens"].fillna(means["budget_total"])
    full_units = {(m, b): u for m, b, u, budget in zip(means["model"], means["benchmark"], means["units"],
                                                       means["budget"]) if budget == "full"}
    means["full_units"] = [full_units.get((m, b)) for m, b in zip(means["model"], means["benchmark"])]
    bounds = [stats.retention_interval([(u, f)])[1:] if u is not None and f is not None and budget != "full"
              and not pd.isna(r) else (math.nan, math.nan)
              for u, f, budget, r in zip(means["units"], means["full_units"], means["budget"], means["retention"])]
    means["retention_low"] = [b[0] for b in bounds]
    means["retention_high"] = [b[1] for b in bounds]
    return means


def _noisy_runs(results: Results) -> set[tuple]:
    """(model, method, budget) with a run timed on a noisy machine."""
    runs = results.runs
    return set(map(tuple, runs.loc[runs["noisy"], ["model", "method", "budget"]].astype(str).to_numpy().tolist()))


NOISY_LEGEND = "hollow: timed on a noisy machine (times not to be trusted)"


def _noisy_handle(ax):
    """A legend entry for the hollow markers of noisy runs."""
    (handle,) = ax.plot([], [], linestyle="none", marker="o", markerfacecolor="none", color="grey", label=NOISY_LEGEND)
    return handle


def _in_llm(method: str) -> bool:
    from visionzip_eval.methods.registry import _REGISTRY

    info = _REGISTRY.get(str(method).partition(",")[0])
    return info is not None and info.kind == "in-llm"


def _n_text(data: pd.DataFrame) -> str:
    ns = sorted({int(v) for v in data["n"].dropna()})
    unit = next((u for u in data["unit"] if isinstance(u, str)), "")
    if not ns:
        return ""
    return f"n={ns[0]} {unit}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]} {unit}"


def _image_requests(results: Results) -> pd.DataFrame:
    reqs = results.requests
    if reqs.empty:
        return reqs
    measured = reqs[reqs["measured"]]
    images = measured[~_is_video(measured)]
    return images if len(images) else measured


# -- figures ---------------------------------------------------------------------------------------


def plot_retention(results: Results, directory: Path, options: TableOptions = TableOptions()) -> list[Path]:
    means = _cell_means(results, options)
    benches = sorted(means["benchmark"].dropna().unique(), key=B.sort_key) if len(means) else []
    panels = (["Avg"] if len(benches) > 1 else []) + list(benches)
    n = max(1, len(panels))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    if not panels:
        _empty(axes[0], "no complete runs: nothing to plot")
    many = means["model"].nunique() > 1 if len(means) else False
    colors = _style(list(means["method"].unique()) + ["none"]) if len(means) else {}
    handles = {}
    for ax, panel in zip(axes, panels):
        ticks = []
        plotted = False
        use_retention = True
        if panel != "Avg":
            data = means[means["benchmark"] == panel]
            use_retention = data["retention"].notna().any()
        for mi, (model, mdata) in enumerate(means.groupby("model", sort=True)):
            if panel == "Avg":
                data = _avg_retention(mdata)
                if data.empty:
                    continue
                value = "retention"
            else:
                data = mdata[mdata["benchmark"] == panel]
                value = "retention" if use_retention else "score"
            full = data[data["budget"] == "full"]
            for method, sub in data[data["budget"] != "full"].groupby("method"):
                sub = pd.concat([sub, full]).sort_values("tokens")
                sub = sub[sub[value].notna()]
                if sub.empty:
                    continue
                label = _series_label(model, method, many)
                low, high = (sub["retention_low"], sub["retention_high"]) if value == "retention" else (
                    sub.get("low", sub[value]), sub.get("high", sub[value]))
                yerr = np.array([(sub[value] - low).fillna(0).clip(lower=0), (high - sub[value]).fillna(0).clip(lower=0)])
                line = ax.errorbar(sub["tokens"], sub[value], yerr=yerr, marker=_MARKERS[mi % len(_MARKERS)],
                                   capsize=3, color=colors.get(method), label=label,
                                   linestyle="--" if _in_llm(method) else "-")
                handles.setdefault(label, line)
                ticks += sub["tokens"].tolist()
                plotted = True
            if len(full) and full[value].notna().any():
                label = _series_label(model, "none", many) + " (full, upper bound)"
                (point,) = ax.plot(full["tokens"], full[value], linestyle="none", marker="*", markersize=12,
                                   color="black", label=label)
                handles.setdefault(label, point)
                ticks += full["tokens"].tolist()
                plotted = True
            # the paper's points, when this is the paper's model
            if options.paper and use_retention:
                ticks += _paper_points(ax, mdata, panel, handles, colors)
        if not plotted:
            _empty(ax, "no retention to plot:\nfull-budget scores are 0 or missing")
            ax.set_title("Average over benchmarks" if panel == "Avg" else panel, fontsize=10)
            continue
        n_text = _n_text(means[means["benchmark"] == panel]) if panel != "Avg" else ""
        ax.set_title(
            ("Average over benchmarks" if panel == "Avg" else (B.get(panel).name if B.get(panel) else panel))
            + (f" ({n_text})" if n_text else "")
            + ("" if use_retention else "\n(raw score: the full-budget score is 0)")
            + ("\n(at chance at full budget: left out of the average)"
               if panel != "Avg" and means[means["benchmark"] == panel]["at_chance"].all() else ""),
            fontsize=10,
        )
        ax.set_xlabel("visual tokens per image (log scale)")
        if use_retention:
            ax.set_ylabel("score retained (% of full-budget score)")
            ax.axhline(100, color="grey", linewidth=0.8, linestyle=":")
        else:
            unit = "points" if panel == "MME" else "%"
            ax.set_ylabel(f"score ({unit})")
        ax.grid(True, alpha=0.3)
        _token_axis(ax, ticks)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
                   ncol=min(4, len(handles)), fontsize=8, frameon=False)
    caption = limit_caption(score_cells(results, options)) if len(means) else ""
    fig.suptitle("Score retention vs. visual tokens (each benchmark relative to the same model at full tokens)\n"
                 "bars: 95% paired-bootstrap intervals; dashed: in-LLM methods (every visual token enters the LLM, "
                 "x = tokens kept after the last pruning layer)" + (f"\n{caption}" if caption else ""), fontsize=10)
    return _save(fig, directory, "retention")


def _avg_retention(mdata: pd.DataFrame) -> pd.DataFrame:
    rows = []
    mdata = mdata[~mdata["at_chance"]]
    benches = mdata["benchmark"].nunique()
    for (method, budget), sub in mdata.groupby(["method", "budget"]):
        values = sub["retention"].dropna()
        if len(values) and len(values) == benches:
            pairs = list(zip(sub["units"], sub["full_units"]))
            low = high = math.nan
            if budget != "full" and all(u is not None and f is not None for u, f in pairs):
                _, low, high = stats.retention_interval(pairs)
            rows.append(dict(method=method, budget=budget, tokens=sub["tokens"].median(),
                             retention=values.mean(), score=math.nan, retention_low=low, retention_high=high))
    return pd.DataFrame(rows)


def _paper_points(ax, mdata: pd.DataFrame, panel: str, handles: dict, colors: dict) -> list[float]:
    pretrained = mdata["pretrained"].dropna()
    paper = paper_rows(pretrained.iloc[0] if len(pretrained) else None)
    if paper.empty:
        return []
    vanilla = paper[paper["budget"] == "full"]
    if vanilla.empty:
        return []
    benches = [b for b in mdata["benchmark"].unique() if b in paper.columns]
    if panel != "Avg" and panel not in benches:
        return []
    keys = benches if panel == "Avg" else [panel]
    if not keys:
        return []
    ticks = []
    for method, sub in paper.groupby("method"):
        xs, ys = [], []
        for _, row in pd.concat([sub, vanilla]).drop_duplicates().iterrows():
            ratios = [row[k] / vanilla.iloc[0][k] for k in keys
                      if not pd.isna(row[k]) and not pd.isna(vanilla.iloc[0][k]) and vanilla.iloc[0][k]]
            if len(ratios) == len(keys):
                xs.append(float(row["tokens"]))
                ys.append(100 * float(np.mean(ratios)))
        if not xs or method == "none":
            continue
        order = np.argsort(xs)
        label = f"{B.method_name(method)} (paper{PAPER_MARK}, approx.)"
        (line,) = ax.plot(np.array(xs)[order], np.array(ys)[order], linestyle="--", marker="o",
                          markerfacecolor="none", color=colors.get(method, "grey"), alpha=0.8, label=label)
        handles.setdefault(label, line)
        ticks += xs
    return ticks


def plot_pareto(results: Results, directory: Path, options: TableOptions = TableOptions()) -> list[Path]:
    means = _cell_means(results, options)
    reqs = _image_requests(results)
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    points = []
    retention_ok = True
    noisy = _noisy_runs(results)
    if len(means) and len(reqs):
        latency = reqs.groupby(["model", "method", "budget"])["prefill_ms"].median()
        for (model, method, budget), sub in means.groupby(["model", "method", "budget"]):
            if (model, method, budget) not in latency.index:
                continue
            mmeans = means[means["model"] == model]
            benches = mmeans[~mmeans["at_chance"]]["benchmark"].nunique()
            counted = sub[~sub["at_chance"]]
            have = int(counted["retention"].notna().sum())
            y = float(counted["retention"].mean()) if have else math.nan
            scaled = [s / m * 100 if not pd.isna(m) and m > 0 else s / SCALE_MAX[b] * 100 if b in SCALE_MAX else s
                      for s, b, m in zip(sub["score"], sub["benchmark"], sub["max_score"])]
            points.append(dict(noisy=(str(model), str(method), str(budget)) in noisy,
                               model=model, method=method, budget=budget, x=float(latency[(model, method, budget)]),
                               y=y, y_raw=float(np.nanmean(scaled)) if scaled else math.nan,
                               tokens=float(sub["tokens"].median()), have=have, benches=benches))
    frame = pd.DataFrame(points)
    if len(frame):
        # retention needs non-zero full-budget scores; without any, fall back to the raw mean score
        retention_ok = bool(frame["y"].notna().any())
    if frame.empty:
        _empty(ax, "no complete runs with efficiency data: nothing to plot")
    else:
        value = "y" if retention_ok else "y_raw"
        colors = _style(list(frame["method"]))
        many = frame["model"].nunique() > 1
        for mi, (model, mframe) in enumerate(frame.groupby("model")):
            for method, sub in mframe.groupby("method"):
                face = [("none" if flag else colors[method]) for flag in sub["noisy"]]
                ax.scatter(sub["x"], sub[value], s=60, facecolors=face, edgecolors=colors[method],
                           marker=_MARKERS[mi % len(_MARKERS)], label=_series_label(model, method, many), zorder=3)
            if mframe["noisy"].any():
                _noisy_handle(ax)
            for k, (_, p) in enumerate(mframe.sort_values("x").iterrows()):
                tag = "full" if p["budget"] == "full" else f"{int(round(p['tokens']))} tokens"
                if retention_ok and 0 < p["have"] < p["benches"]:
                    tag += f" ({int(p['have'])} of {int(p['benches'])} benchmarks)"
                ax.annotate(tag, (p["x"], p[value]), textcoords="offset points",
                            xytext=(4, 6 if k % 2 == 0 else -12), fontsize=8)
            front = _pareto_front(mframe, value)
            if len(front) > 1:
                ax.step(front["x"], front[value], where="post", color="black", linewidth=1, alpha=0.6,
                        linestyle="--", label=f"{model}: Pareto front" if many else "Pareto front", zorder=2)
        ax.set_xlabel("median LLM prefill latency per request (ms)" + (" (image tasks)" if len(reqs) else ""))
        ax.set_ylabel("average score retained (% of full-budget score)" if retention_ok
                      else "mean score (% of each benchmark's maximum)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    title = "Accuracy vs. prefill latency (upper left is better)"
    caption = limit_caption(score_cells(results, options)) if len(means) else ""
    if caption:
        title += f"\n{caption}"
    if not frame.empty and not retention_ok:
        title += "\nretention undefined (a full-budget score is 0): raw mean score shown"
    ax.set_title(title, fontsize=11)
    return _save(fig, directory, "pareto")


def _pareto_front(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """Points no other point beats on both latency (lower) and score (higher)."""
    ordered = frame.dropna(subset=["x", value]).sort_values(["x", value], ascending=[True, False])
    best, keep = -math.inf, []
    for index, row in ordered.iterrows():
        if row[value] > best:
            keep.append(index)
            best = row[value]
    return ordered.loc[keep]


def plot_memory(results: Results, directory: Path) -> list[Path]:
    reqs = _image_requests(results)
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.subplots()
    kinds = set(reqs["peak_memory_kind"].dropna()) if len(reqs) else set()
    if reqs.empty or reqs["peak_memory_bytes"].notna().sum() == 0:
        _empty(ax, "no memory measurements: nothing to plot")
    else:
        colors = _style(list(reqs["method"].unique()) + ["none"])
        many = reqs["model"].nunique() > 1
        # a process's peak RSS only grows over the runs it serves: points, no trend drawn through them
        trend = "-" if "process_peak_rss" not in kinds else "none"
        ticks = []
        for mi, (model, mreqs) in enumerate(reqs.groupby("model")):
            agg = mreqs.groupby(["method", "budget"]).agg(
                tokens=("tokens_per_image", "median"), peak=("peak_memory_bytes", "median"),
                low=("peak_memory_bytes", "min"), high=("peak_memory_bytes", "max")).reset_index()
            agg[["peak", "low", "high"]] = agg[["peak", "low", "high"]] / 2**30
            full = agg[agg["budget"] == "full"]
            for method, sub in agg[agg["budget"] != "full"].groupby("method"):
                sub = pd.concat([sub, full]).sort_values("tokens")
                ax.errorbar(sub["tokens"], sub["peak"], yerr=[sub["peak"] - sub["low"], sub["high"] - sub["peak"]],
                            marker=_MARKERS[mi % len(_MARKERS)], capsize=3, color=colors[method],
                            label=_series_label(model, method, many), linestyle=trend)
            if len(full):
                ax.plot(full["tokens"], full["peak"], linestyle="none", marker="*", markersize=12, color="black",
                        label=_series_label(model, "none", many) + " (full)")
            ticks += agg["tokens"].tolist()
        _token_axis(ax, ticks)
        ax.set_xlabel("visual tokens per image (log scale)")
        what = {"cuda_max_allocated": "CUDA allocator peak", "process_peak_rss": "process peak RSS"}
        ax.set_ylabel("peak memory per request (GiB; median, bars: min-max)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        kind_text = ", ".join(what.get(k, k) for k in sorted(kinds)) or "unknown kind"
        subtitle = f"memory measured as: {kind_text}"
        if "process_peak_rss" in kinds:
            subtitle += " (grows over a process: not comparable across runs sharing one)"
        ax.set_title("Peak memory vs. visual tokens\n" + subtitle, fontsize=10)
    if not ax.get_title():
        ax.set_title("Peak memory vs. visual tokens", fontsize=10)
    return _save(fig, directory, "memory")


def _model_rows(models: list[str], row_height: float, empty: str):
    """A figure with one row of two panels per model; with no model, one row saying ``empty``."""
    fig = Figure(figsize=(11, row_height * max(1, len(models)) + 0.4), layout="constrained")
    axes = fig.subplots(max(1, len(models)), 2, squeeze=False)
    if not models:
        _empty(axes[0][0], empty)
        axes[0][1].set_visible(False)
    return fig, axes


def plot_latency(results: Results, directory: Path) -> list[Path]:
    reqs = _image_requests(results)
    models = sorted(reqs["model"].unique()) if len(reqs) else []
    fig, axes = _model_rows(models, 3.8, "no measured requests: nothing to plot")
    noisy = _noisy_runs(results)
    for row, model in enumerate(models):
        mreqs = reqs[reqs["model"] == model]
        totals = mreqs.groupby(["method", "budget"])["budget_total"].first()
        keys = sorted(
            ((m, b, totals[(m, b)]) for m, b in totals.index),
            key=lambda k: (-(math.inf if k[1] == "full" else (k[2] if not pd.isna(k[2]) else -1)),
                           B.method_sort_key(k[0])),
        )
        labels = [("Vanilla\nfull" if b == "full" else f"{B.method_name(m)}\n{b}") for m, b, _ in keys]
        for col, (field, name) in enumerate([("prefill_ms", "LLM prefill"), ("total_ms", "end-to-end")]):
            ax = axes[row][col]
            data = [mreqs[(mreqs["method"] == m) & (mreqs["budget"] == b)][field].dropna().to_numpy()
                    for m, b, _ in keys]
            boxes = ax.boxplot(data, tick_labels=labels, showfliers=True, patch_artist=True,
                               boxprops=dict(facecolor="#c6dbef"), medianprops=dict(color="#d62728"))
            flagged = [(model, str(m), str(b)) in noisy for m, b, _ in keys]
            for box, flag in zip(boxes["boxes"], flagged):
                if flag:
                    box.set_facecolor("none")
            if any(flagged):
                from matplotlib.patches import Patch
                ax.legend(handles=[Patch(facecolor="none", edgecolor="black", label=NOISY_LEGEND)], fontsize=8)
            ax.set_ylabel(f"{name} latency (ms)")
            ax.set_xlabel("method and visual-token budget (tokens per image)")
            ax.set_title(f"{model}: {name} latency per request\n({len(mreqs)} requests of image tasks, "
                         "warm-up and failed ones excluded)", fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
            ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("Per-request latency distribution by budget (box: quartiles, red: median, whiskers: 1.5 IQR)",
                 fontsize=11)
    return _save(fig, directory, "latency")


def _annotate_apart(ax, points: list[tuple[float, float, str]], near: float = 0.06, step: float = 11) -> None:
    """Label points (x, y, text) at (5, 5) points' offset; where methods coincide (same x, y within
    ``near`` of a decade) the same text is written once and different texts are stacked ``step``
    points apart, so no label overprints another."""
    placed: list[tuple[float, float, list[str]]] = []
    for x, y, text in points:
        group = next((g for g in placed if g[0] == x and abs(math.log10(y / g[1])) < near), None)
        if group is None:
            placed.append((x, y, [text]))
        elif text not in group[2]:
            group[2].append(text)
    for x, y, texts in placed:
        for index, text in enumerate(texts):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5 + step * index), fontsize=8)


def plot_roofline(results: Results, directory: Path) -> list[Path]:
    """Median measured prefill and TTFT per budget (solid) against the median of the requests'
    roofline bounds (dashed, same colour), log-log; the gap between them is what the
    implementation leaves on the table, the dashed line's slope what a reduction can buy."""
    reqs = _image_requests(results)
    reqs = reqs[reqs["prefill_roofline_ms"].notna()] if len(reqs) else reqs
    models = sorted(reqs["model"].unique()) if len(reqs) else []
    fig, axes = _model_rows(models, 4.2, "no request with a roofline bound: nothing to plot")
    noisy = _noisy_runs(results)
    colors = _style(list(reqs["method"].unique()) + ["none"]) if len(reqs) else {}
    for row, model in enumerate(models):
        mreqs = reqs[reqs["model"] == model]
        agg = mreqs.groupby(["method", "budget"]).agg(
            tokens=("tokens_per_image", "median"), prefill=("prefill_ms", "median"),
            prefill_bound=("prefill_roofline_ms", "median"), ttft=("ttft_ms", "median"),
            ttft_bound=("ttft_roofline_ms", "median")).reset_index()
        ratios = mreqs.assign(prefill_ratio=mreqs["prefill_ms"] / mreqs["prefill_roofline_ms"],
                              ttft_ratio=mreqs["ttft_ms"] / mreqs["ttft_roofline_ms"])
        agg = agg.join(ratios.groupby(["method", "budget"])[["prefill_ratio", "ttft_ratio"]].median(),
                       on=["method", "budget"])
        full = agg[agg["budget"] == "full"]
        devices = []
        for name, dev in mreqs.groupby("roofline_device", sort=True):
            if name == roofline.CPU_NAME:  # each run's own probe: say how far they spread
                low, high = dev["roofline_tflops"].min() * 1e3, dev["roofline_tflops"].max() * 1e3
                name += f", {low:.3g}-{high:.3g} GFLOP/s" if high > low * 1.005 else f", {low:.3g} GFLOP/s"
            devices.append(name)
        devices = "; ".join(devices)
        for col, (value, name) in enumerate([("prefill", "LLM prefill"), ("ttft", "time to first token")]):
            ax = axes[row][col]
            series = [(m, pd.concat([sub, full]).sort_values("tokens"))
                      for m, sub in agg[agg["budget"] != "full"].groupby("method")] or [("none", full)]
            any_noisy = False
            for method, sub in series:
                label = B.method_name(method)
                ax.plot(sub["tokens"], sub[value], marker="o", color=colors.get(method),
                        label=f"{label}: measured")
                ax.plot(sub["tokens"], sub[f"{value}_bound"], marker="s", markerfacecolor="none",
                        linestyle="--", color=colors.get(method), label=f"{label}: roofline")
                flagged = sub[[(model, str(m), str(b)) in noisy for m, b in zip(sub["method"], sub["budget"])]]
                if len(flagged):  # hollow measured points: timed on a noisy machine
                    ax.plot(flagged["tokens"], flagged[value], linestyle="none", marker="o", markersize=9,
                            markerfacecolor="white", color=colors.get(method))
                    any_noisy = True
            if len(full):
                ax.plot(full["tokens"], full[value], linestyle="none", marker="*", markersize=12, color="black",
                        label="full budget")
            _annotate_apart(ax, [(point["tokens"], point[value], f"{point[f'{value}_ratio']:.1f}×")
                                 for _, point in agg.iterrows()  # measured / roofline, as in the efficiency table
                                 if not pd.isna(point[f"{value}_ratio"])])
            if any_noisy:
                _noisy_handle(ax)
            ax.set_yscale("log")
            _token_axis(ax, agg["tokens"].tolist())
            ax.set_xlabel("visual tokens per image (log scale)")
            ax.set_ylabel(f"{name} (ms, median; log scale)")
            ax.set_title(f"{model}: {name}, measured vs roofline\n({devices}; labels: measured / roofline)",
                         fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Measured time vs. the roofline lower bound, by budget (dashed: the device's limit for "
                 "the same requests)", fontsize=11)
    return _save(fig, directory, "roofline")


def write_plots(results: Results, directory: Path, options: TableOptions = TableOptions()) -> list[Path]:
    """The figures that have something to show, and their paths: none from zero complete runs
    (requests of failed runs are no result), and no placeholder figure for missing data."""
    if results.ok.empty:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    means = _cell_means(results, options)
    reqs = _image_requests(results)
    if len(means):
        paths += plot_retention(results, directory, options)
    if len(means) and len(reqs):
        paths += plot_pareto(results, directory, options)
    if len(reqs) and reqs["peak_memory_bytes"].notna().any():
        paths += plot_memory(results, directory)
    if len(reqs):
        paths += plot_latency(results, directory)
    if len(reqs) and reqs["prefill_roofline_ms"].notna().any():
        paths += plot_roofline(results, directory)
    return paths
