"""``bench serve --json`` output -> a throughput-vs-concurrency plot, one panel per method."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

REQUIRED = ("method", "budget", "concurrency", "requests_per_s")


def read_serve_json(path: str | Path) -> list[dict]:
    """The rows of a ``bench serve --json`` file; a one-line ValueError when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path} as bench serve JSON: {error}") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and set(REQUIRED) <= set(r) for r in rows):
        raise ValueError(f"{path} is not bench serve --json output (a 'rows' list with {', '.join(REQUIRED)})")
    return rows


def plot_serving(rows: list[dict], path: str | Path) -> Path:
    """Requests/s against concurrency: one panel per method, one line per budget (the full
    budget, served once, drawn in every panel). Written as PNG at ``path``."""
    full = [r for r in rows if r["budget"] == "full"]
    methods = sorted({r["method"] for r in rows if r["budget"] != "full"}) or ["none"]
    fig = Figure(figsize=(4.2 * len(methods), 3.4), layout="constrained")
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
        mine = [r for r in rows if r["method"] == method and r["budget"] != "full"]
        for budget in ["full"] + sorted({r["budget"] for r in mine}, key=lambda b: -int(b)):
            points = sorted(full if budget == "full" else [r for r in mine if r["budget"] == budget],
                            key=lambda r: r["concurrency"])
            if points:
                ax.plot([p["concurrency"] for p in points], [p["requests_per_s"] for p in points], marker="o",
                        label=f"{budget} ({points[0].get('visual_tokens', '?')} tokens)",
                        linestyle="--" if budget == "full" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (requests per batch)")
        ax.set_ylabel("requests / s")
        ax.set_title(f"{method}, served by vLLM")
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
