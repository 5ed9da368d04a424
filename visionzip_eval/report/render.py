"""Table blocks to Markdown, LaTeX (booktabs, best per column in bold) and CSV."""

from __future__ import annotations

import math

import pandas as pd

from visionzip_eval.report.tables import TableBlock

MISSING = "–"


def format_value(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or pd.isna(value):
        return MISSING
    value = float(value)
    if fmt in ("score_pct", "score_pts"):
        return f"{value:.1f}"
    if fmt == "avg":
        return f"{value:.1f}%"
    if fmt == "delta":
        return f"{value:+.1f}"
    if fmt == "int":
        return f"{value:.0f}"
    if fmt == "ms":
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    if fmt == "seconds":
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    if fmt == "gib":
        return f"{value:.2f}"
    if fmt == "ms_sig":  # bounds span 1e-3 ms (a tiny model) to seconds: significant digits
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if fmt == "ratio":
        if abs(value) < 0.1:
            return f"{value:.2g}×"
        return f"{value:.2f}×" if abs(value) < 10 else f"{value:.1f}×" if abs(value) < 1000 else f"{value:.0f}×"
    if fmt == "tflops":
        return f"{value:.3g}"
    if fmt == "rate":
        return f"{value:.3g}"
    if fmt == "speedup":
        return f"{value:.2f}×"
    return f"{value:g}"


def _with_plusminus(text: str, row, column, block: TableBlock) -> str:
    """``61.2 ± 3.1`` where the block asks for intervals and the cell has one."""
    half = row.get(block.plusminus.get(column.key, ""), math.nan)
    if text == MISSING or half is None or pd.isna(half):
        return text
    return f"{text} ± {format_value(half, 'score_pct' if column.fmt == 'avg' else column.fmt)}"


# -- Markdown --------------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def block_markdown(block: TableBlock, heading: str = "###") -> str:
    cols = block.columns
    lines = [f"{heading} {block.title}", ""] if heading else []
    lines.append("| Method | " + " | ".join(_md_escape(c.header + c.sub) for c in cols) + " |")
    lines.append("|---|" + "|".join("---:" for _ in cols) + "|")
    group = None
    for pos, (_, row) in enumerate(block.frame.iterrows()):
        if row.get("group") != group:
            group = row.get("group")
            lines.append(f"| *{_md_escape(group)}* |" + " |" * len(cols))
        cells = []
        for c in cols:
            text = _with_plusminus(format_value(row[c.key], c.fmt), row, c, block)
            cells.append(f"**{text}**" if (pos, c.key) in block.bold else text)
        label = _md_escape(row["label"])
        if row.get("source") == "paper":
            label = f"_{label}_"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if block.notes:
        lines.append("")
        lines += [f"- {note}" for note in block.notes]
    return "\n".join(lines)


def blocks_markdown(blocks: list[TableBlock], title: str | None = None, heading: str = "###") -> str:
    parts = [f"## {title}"] if title else []
    parts += [block_markdown(b, heading) for b in blocks]
    return "\n\n".join(parts)


# -- LaTeX -----------------------------------------------------------------------------------------

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "→": r"$\to$", "≈": r"$\approx$", "↓": r"$\downarrow$", "Δ": r"$\Delta$", "†": r"$^\dagger$", "×": r"$\times$", "–": "--",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def block_latex(block: TableBlock) -> str:
    cols = block.columns
    n = len(cols) + 1
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{latex_escape(block.title)}}}",
        r"\begin{tabular}{l" + "r" * len(cols) + "}",
        r"\toprule",
        "Method & " + " & ".join(latex_escape(c.header + c.sub) for c in cols) + r" \\",
    ]
    group = None
    for pos, (_, row) in enumerate(block.frame.iterrows()):
        if row.get("group") != group:
            group = row.get("group")
            lines.append(r"\midrule")
            lines.append(rf"\multicolumn{{{n}}}{{c}}{{\textit{{{latex_escape(group)}}}}} \\")
            lines.append(r"\midrule")
        cells = []
        for c in cols:
            text = latex_escape(_with_plusminus(format_value(row[c.key], c.fmt), row, c, block))
            cells.append(rf"\textbf{{{text}}}" if (pos, c.key) in block.bold else text)
        label = latex_escape(row["label"])
        if row.get("source") == "paper":
            label = rf"\textit{{{label}}}"
        lines.append(f"{label} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if block.notes:
        lines.append(r"\par\smallskip\footnotesize " + " ".join(latex_escape(n) for n in block.notes))
    lines.append(r"\end{table}")
    return "\n".join(lines)


def blocks_latex(blocks: list[TableBlock]) -> str:
    header = (
        "% Generated by `visionzip-eval report`. Needs \\usepackage{booktabs}.\n"
    )
    return header + "\n\n".join(block_latex(b) for b in blocks) + "\n"


# -- CSV -------------------------------------------------------------------------------------------


def blocks_frame(blocks: list[TableBlock]) -> pd.DataFrame:
    """All blocks as one frame with raw (unformatted) numbers; headers as in the tables."""
    frames = []
    for block in blocks:
        keep = [c for c in block.csv_extra if c in block.frame.columns]
        after = [c for c in block.csv_after if c in block.frame.columns]
        frame = block.frame[keep + [c.key for c in block.columns] + after].copy()
        frame = frame.rename(columns={c.key: c.header for c in block.columns})
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def blocks_csv(blocks: list[TableBlock]) -> str:
    return blocks_frame(blocks).to_csv(index=False)

