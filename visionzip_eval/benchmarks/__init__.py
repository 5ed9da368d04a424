"""Facts about the benchmarks, below the sweep and the report (both use them): which benchmark
a task is, which of its metrics the table shows, and on which scale; the paper's published rows
are in :mod:`visionzip_eval.benchmarks.paper`.

lmms-eval reports some metrics as fractions (``exact_match``, ``pope_f1_score``: 0-1) and
others already in percent (MMBench's ``gpt_eval_score``, ``videomme_perception_score``) or in
points (MME: sum over categories of acc + acc+, 200 per category). The report shows every
benchmark on its native published scale: percent for accuracy-like metrics, points for MME.
"""

from __future__ import annotations

from dataclasses import dataclass

# lmms-eval metric name -> factor to its report scale (fractions become percent).
METRIC_SCALE: dict[str, float] = {
    "exact_match": 100.0,
    "pope_accuracy": 100.0,
    "pope_precision": 100.0,
    "pope_recall": 100.0,
    "pope_f1_score": 100.0,
    "pope_yes_ratio": 100.0,
    "mmmu_acc": 100.0,
    "seed_all": 100.0,
    "seed_image": 100.0,
    "seed_video": 100.0,
    "acc": 100.0,
    "gpt_eval_score": 1.0,  # MMBench (static or judged): already in percent
    "videomme_perception_score": 1.0,  # already in percent
    "mme_perception_score": 1.0,  # points, 200 per category present (0-2000 with all 10)
    "mme_cognition_score": 1.0,  # points, 200 per category present (0-800 with all 4)
}


def metric_scale(metric: str) -> float:
    """Factor from lmms-eval's value to the report scale (1 for unknown metrics: shown as reported)."""
    return METRIC_SCALE.get(metric.split(",")[0], 1.0)


@dataclass(frozen=True)
class Benchmark:
    key: str  # stable id, also the paper CSV column (``GQA``)
    name: str  # column header
    aliases: tuple[str, ...]  # task-name tokens that identify it (``visionzip_smoke_gqa`` -> gqa)
    metrics: tuple[str, ...]  # preferred metric names, first present wins
    scale_text: str  # what the number means, for the table notes
    # What guessing scores, as a fraction of the maximum (0.25: four options; 0.5: yes/no; MME:
    # half its points). None: open answers, no chance level (never left out of Avg for it).
    chance: float | None = None


# Paper column order first (arXiv 2412.04467 Table 1), then the others.
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("GQA", "GQA", ("gqa",), ("exact_match",), "exact match, %"),
    Benchmark("MMB", "MMB", ("mmbench",), ("gpt_eval_score",), "accuracy, %", chance=0.25),
    Benchmark("MME", "MME", ("mme",), ("mme_perception_score",), "perception score, points (200 per category)",
              chance=0.5),
    Benchmark("POPE", "POPE", ("pope",), ("pope_f1_score", "pope_accuracy"), "F1, %", chance=0.5),
    Benchmark("SQA", "SQA", ("scienceqa", "sqa"), ("exact_match",), "(ScienceQA-IMG) accuracy, %"),
    Benchmark("VQAv2", "VQAv2", ("vqav2",), ("exact_match",), "accuracy, %"),
    Benchmark("TextVQA", "TextVQA", ("textvqa",), ("exact_match",), "accuracy, %"),
    Benchmark("MMMU", "MMMU", ("mmmu",), ("mmmu_acc",), "accuracy, %"),
    Benchmark("SEED", "SEED", ("seedbench", "seed"), ("seed_all", "seed_image"), "accuracy (all: image + video), %",
              chance=0.25),
    Benchmark("VideoMME", "Video-MME", ("videomme",), ("videomme_perception_score",), "accuracy, %", chance=0.25),
    Benchmark("MMVet", "MM-Vet", ("mmvet",), ("gpt_eval_score",), "GPT score, %"),
)
_BY_KEY = {b.key: b for b in BENCHMARKS}
ORDER = {b.key: i for i, b in enumerate(BENCHMARKS)}
VIDEO_BENCHMARKS = {"VideoMME"}
MME_POINTS_PER_CATEGORY = 200.0  # acc + acc+, each 0-100


def benchmark_for_task(task: str) -> Benchmark | None:
    """The benchmark a task name belongs to, by its ``_``-separated tokens (so ``videomme`` is
    never taken for ``mme``): ``mme``, ``visionzip_local_mme``, ``mmbench_en_dev_static``."""
    tokens = str(task).lower().replace("-", "_").split("_")
    for bench in BENCHMARKS:
        if any(alias in tokens for alias in bench.aliases):
            return bench
    return None


def benchmark_key(task: str) -> str:
    """Benchmark key of a task; an unknown task is its own benchmark (its name)."""
    bench = benchmark_for_task(task)
    return bench.key if bench else str(task)


def get(key: str) -> Benchmark | None:
    return _BY_KEY.get(key)


def sort_key(key: str) -> tuple[int, str]:
    return (ORDER.get(key, len(ORDER)), key)


# The one row name that is no registered method: the vanilla model. Registered methods (FastV
# and SparseVLM among them, measured and published rows alike) name themselves (the registry).
UNREGISTERED_NAMES = {"none": "Vanilla"}
# Within a budget group: baselines first, the competitors, VisionZip last (the paper's layout).
_METHOD_ORDER = {"none": 0, "random": 1, "pool": 2, "fastv": 4, "sparsevlm": 5, "visionzip": 9}


# The paper's mark for a model fine-tuned under the reduction (VisionZip‡): report rows of runs
# whose checkpoint ``visionzip-eval tune`` wrote carry it after their method label.
TUNED_MARK = "‡"


def method_name(method: str) -> str:
    """``VisionZip``, ``VisPruner (important_ratio=0.25)`` (non-default options shown), ``Vanilla``;
    ``VisionZip‡`` for a label ending in :data:`TUNED_MARK`."""
    from visionzip_eval.methods.registry import display_name

    method = str(method)
    if method.endswith(TUNED_MARK):
        return method_name(method[: -len(TUNED_MARK)]) + TUNED_MARK
    from visionzip_eval.methods.registry import _REGISTRY

    name, _, options = method.partition(",")
    info = _REGISTRY.get(name)
    if info is not None and info.kind == "in-llm":  # never mistaken for a pre-LLM method at the same count
        return f"{info.display} (in-LLM" + (f", {options.replace(',', ', ')})" if options else ")")
    return UNREGISTERED_NAMES.get(method) or display_name(method)


def method_sort_key(method: str) -> tuple[int, str]:
    # a tuned row sorts right after its method's untuned one ("visionzip" < "visionzip‡")
    return (_METHOD_ORDER.get(str(method).removesuffix(TUNED_MARK).partition(",")[0], 8), str(method))
