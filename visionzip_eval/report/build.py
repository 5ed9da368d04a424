"""``visionzip-eval report RESULTS``: every table and figure into ``RESULTS/report/``.

Writes only inside ``RESULTS/report/``; run folders are read, never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from visionzip_eval.report.collect import Results, load_results
from visionzip_eval.report.compare import comparison_section
from visionzip_eval.report.frames import frames_tables
from visionzip_eval.report.plots import write_plots
from visionzip_eval.report.render import blocks_csv, blocks_latex, blocks_markdown
from visionzip_eval.report.tables import TableOptions, efficiency_tables, problems_markdown, score_tables

REPORT_DIR = "report"


@dataclass
class Report:
    directory: Path
    main_table: str  # Markdown of the score tables (what the CLI prints)
    paths: list[Path] = field(default_factory=list)  # every file written, figures included
    problems: int = 0
    figures: list[Path] = field(default_factory=list)  # the figures written (PNG and PDF); none without a complete run
    frames_table: str = ""  # Markdown of the frames-vs-cost tables, when the sweep varied max_frames


class _Writer:
    """Writes files only under one directory (refuses anything that resolves outside it)."""

    def __init__(self, directory: Path):
        self.directory = directory.resolve()
        self.paths: list[Path] = []

    def path(self, name: str) -> Path:
        path = (self.directory / name).resolve()
        if self.directory not in path.parents:
            raise ValueError(f"refusing to write {path}: outside {self.directory}")
        return path

    def text(self, name: str, text: str) -> Path:
        path = self.path(name)
        path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        self.paths.append(path)
        return path


def write_report(results_dir: str | Path, options: TableOptions = TableOptions(), plots: bool = True) -> Report:
    results = load_results(results_dir)
    directory = Path(results_dir) / REPORT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    writer = _Writer(directory)

    scores = score_tables(results, options)
    efficiency = efficiency_tables(results)
    problems = problems_markdown(results)
    summary = _summary_line(results)

    main = blocks_markdown(scores, heading="###") if scores else "_No complete run: no score table._"
    if plots and results.ok.empty:
        main += "\n\n_No figures: no complete run to plot._"
    table_md = "\n\n".join(p for p in [
        "# VisionZip evaluation: scores",
        f"Results: `{Path(results_dir)}` ({summary}).",
        main,
        comparison_section(results, options),  # paired tests: the ordering's ties, each method vs VisionZip
        problems,
    ] if p)
    writer.text("table.md", table_md)
    writer.text("table.tex", blocks_latex(scores) if scores else "% no complete run\n")
    writer.text("table.csv", blocks_csv(scores) if scores else "")

    eff_md = "\n\n".join(p for p in [
        "# VisionZip evaluation: efficiency",
        f"Results: `{Path(results_dir)}` ({summary}).",
        blocks_markdown(efficiency) if efficiency else "_No efficiency.jsonl rows: no efficiency table._",
        problems,
    ] if p)
    writer.text("efficiency.md", eff_md)
    writer.text("efficiency.tex", blocks_latex(efficiency) if efficiency else "% no efficiency data\n")
    writer.text("efficiency.csv", blocks_csv(efficiency) if efficiency else "")
    frames = frames_tables(results)  # only for checkpoints swept at several frame counts
    frames_md = blocks_markdown(frames) if frames else ""
    if frames:
        writer.text("frames.md", "\n\n".join([
            "# VisionZip evaluation: frames vs. cost", f"Results: `{Path(results_dir)}` ({summary}).", frames_md]))
        writer.text("frames.tex", blocks_latex(frames))
        writer.text("frames.csv", blocks_csv(frames))
    writer.text("runs.csv", results.runs.to_csv(index=False))
    writer.text("collected.csv", results.frame.to_csv(index=False))
    figures = write_plots(results, writer.directory, options) if plots else []
    writer.paths += figures
    printed = main + ("\n\n" + problems if problems else "")
    return Report(directory=directory, main_table=printed, paths=writer.paths, problems=len(results.problems),
                  figures=figures, frames_table=frames_md)


def _summary_line(results: Results) -> str:
    counts = results.runs["status"].value_counts()
    parts = [f"{int(counts.get(s, 0))} {s}" for s in ("ok", "failed", "incomplete") if counts.get(s, 0)]
    return f"{len(results.runs)} runs: " + ", ".join(parts)
