"""``visionzip-eval demo``: what VisionZip does and costs, on a laptop, offline, in minutes.

A sweep of the tiny model (built in memory) over the smoke tasks at full/192/128/64 tokens,
VisionZip and the random baseline, then the report (tables and plots) and a token-selection
picture, all under one folder. The tiny model's weights are random, so its scores are noise:
the demo shows the mechanism and the efficiency columns, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

from visionzip_eval.budget import Budget
from visionzip_eval.sweep import SweepConfig, SweepSummary, run_sweep

REPO_TASKS = Path(__file__).resolve().parents[1] / "tasks"
SMOKE_TASKS = [
    "visionzip_smoke_gqa",
    "visionzip_smoke_mmbench",
    "visionzip_smoke_mme",
    "visionzip_smoke_pope",
    "visionzip_smoke_videomme",
]


def demo_config(output_dir: str | Path, tasks: list[str] | None = None, limit: int | None = 12,
                budgets=("full", 192, 128, 64), methods=("visionzip", "random")) -> SweepConfig:
    for budget in budgets:
        Budget.parse(budget)  # a bad budget is a one-line error before anything runs
    if not (REPO_TASKS / "visionzip_smoke").is_dir():
        raise ValueError(
            f"the smoke tasks are not at {REPO_TASKS}: run the demo from a checkout of the repository "
            "(pip install -e .)"
        )
    return SweepConfig.model_validate(
        dict(
            name="demo",
            models=[dict(name="tiny-llava", pretrained="builtin:tiny-llava", dtype="float32",
                         attn_implementation="sdpa")],
            methods=list(methods),
            budgets=list(budgets),
            tasks=tasks or SMOKE_TASKS,
            include_path=str(REPO_TASKS),
            limit=limit,
            output_dir=str(output_dir),
            lmms_eval=dict(gen_kwargs="max_new_tokens=8", bootstrap_iters=0, warmup=2),
        )
    )


def run_demo(output_dir: str | Path = "results/demo", progress: bool = True, **config_overrides):
    """Sweep, report, selection picture. Returns (summary, report, picture path)."""
    from visionzip_eval.report import write_report
    from visionzip_eval.testing import build_tiny_llava, sample_images
    from visionzip_eval.visualize import visualize

    config = demo_config(output_dir, **config_overrides)
    summary: SweepSummary = run_sweep(config, output_dir, progress=progress)
    report = write_report(output_dir)
    model, processor = build_tiny_llava(seed=0)
    sheet, _ = visualize(model, processor, sample_images()["astronaut"], [192, 128, 64])
    picture = Path(report.directory) / "selection.png"
    sheet.save(picture)
    return summary, report, picture
