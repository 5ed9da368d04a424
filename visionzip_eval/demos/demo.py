"""``visionzip-eval demo``: what VisionZip does and costs, on a laptop, offline, in minutes.

A sweep of the tiny reference VLM trained on the synthetic benchmark (``visionzip_eval.synth``;
weights ship in the package) at full/192/128/64 tokens, VisionZip and the random baseline,
over the synthetic tasks (where its accuracy means something) and the smoke VideoMME task
(real-schema video: frames x per-frame budget), then the report (tables and plots) and
token-selection pictures, all under one folder.
"""

from __future__ import annotations

from pathlib import Path

from visionzip_eval.budget import Budget
from visionzip_eval.sweep import SweepConfig, SweepSummary, run_sweep
from visionzip_eval.synth.weights import BUILTIN_NAME

REPO_TASKS = Path(__file__).resolve().parents[2] / "tasks"
DEMO_TASKS = [
    "visionzip_synth_gqa",
    "visionzip_synth_mmbench",
    "visionzip_synth_mme",
    "visionzip_synth_pope",
    "visionzip_smoke_videomme",
]


def demo_config(output_dir: str | Path, tasks: list[str] | None = None, limit: int | None = 48,
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
            models=[dict(name="tiny-llava-synth", pretrained=BUILTIN_NAME, dtype="float32",
                         attn_implementation="sdpa")],
            methods=list(methods),
            budgets=list(budgets),
            tasks=tasks or DEMO_TASKS,
            include_path=str(REPO_TASKS),
            limit=limit,
            output_dir=str(output_dir),
            lmms_eval=dict(gen_kwargs="max_new_tokens=8", bootstrap_iters=0, warmup=2),
        )
    )


def run_demo(output_dir: str | Path = "results/demo", progress: bool = True, **config_overrides):
    """Sweep, report, selection pictures. Returns (summary, report, picture paths)."""
    from visionzip_eval.report import write_report
    from visionzip_eval.synth.benchmark import build_docs
    from visionzip_eval.synth.scenes import render
    from visionzip_eval.synth.weights import load_trained
    from visionzip_eval.testing import sample_images
    from visionzip_eval.demos.visualize import visualize

    config = demo_config(output_dir, **config_overrides)
    summary: SweepSummary = run_sweep(config, output_dir, progress=progress)
    report = write_report(output_dir)
    model, processor = load_trained()
    _, scenes = build_docs("pope", n_scenes=2)
    pictures = []
    for name, image in (("selection_synth.png", render(scenes[1])[0]), ("selection.png", sample_images()["astronaut"])):
        sheet, _ = visualize(model, processor, image, [192, 128, 64])
        pictures.append(Path(report.directory) / name)
        sheet.save(pictures[-1])
    return summary, report, pictures
