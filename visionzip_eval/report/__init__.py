"""Reports over a sweep's results directory: tidy collection, paper-layout tables (Markdown,
LaTeX, CSV), the paper's reference numbers, figures, and regression checks against a baseline.

    from visionzip_eval.report import collect, write_report, regress
    frame = collect("results/smoke")          # one row per run x metric (failed runs included)
    write_report("results/smoke")             # -> results/smoke/report/
    regress("results/smoke", "baselines/cpu_smoke.json").exit_code
"""

from visionzip_eval.report.build import Report, write_report
from visionzip_eval.report.collect import COLUMNS, Results, collect, load_results
from visionzip_eval.report.regress import RegressOutcome, load_baseline, regress, write_baseline
from visionzip_eval.report.tables import TableOptions, efficiency_tables, score_tables

__all__ = [
    "COLUMNS", "RegressOutcome", "Report", "Results", "TableOptions", "collect", "efficiency_tables",
    "load_baseline", "load_results", "regress", "score_tables", "write_baseline", "write_report",
]
