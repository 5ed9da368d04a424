"""Sample sizes, 95% intervals and paired tests from the per-sample results lmms-eval writes.

Pure functions: a samples file's rows -> :class:`Units` (one entry per scoring unit, the thing a
benchmark's score averages over), then score / n / interval, and paired differences between two
runs that answered the same questions. The unit is what the benchmark counts:

- GQA, POPE and other per-question metrics: a question (``n`` = questions scored);
- MME: an image's yes/no question pair (its score is acc + acc+, 0-200; a category's score is
  the mean over its pairs, the total the sum over categories);
- MMBench: a circular group (a question with all its option rotations; right only if every
  rotation is right, lmms-eval's own static matcher decides each answer).

Intervals: the exact Wilson score interval (scipy) where the score is a proportion of units
(GQA, MMBench, POPE accuracy); otherwise a percentile bootstrap over units with a fixed seed,
stratified by MME category (scipy.stats.bootstrap has no strata). Paired tests: the exact
McNemar test (a binomial test on the discordant units, scipy) for binary correctness, a paired
bootstrap of the difference otherwise. See docs/statistics.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from visionzip_eval.records import LMMS_EVAL_DIR, newest_samples_file, read_jsonl

CONFIDENCE = 0.95
ITERATIONS = 2000
SEED = 0
MMB_ROTATION_STRIDE = 1_000_000  # lmms-eval MMBench: rotation k of question i has index i + k * 1e6


@dataclass(frozen=True)
class Units:
    """One benchmark run's scoring units. ``values``: one row per unit (columns ``columns``);
    ``strata``: the unit's stratum (MME category) or None; ``kind``: ``binary`` (the score is
    100 x the share of units right: column ``correct``), ``pope_f1``, ``mme`` or ``mean``."""

    ids: np.ndarray
    values: np.ndarray
    columns: tuple[str, ...]
    kind: str
    unit: str  # what n counts: "questions", "pairs", "circular groups"
    strata: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.ids)

    def score(self, index: np.ndarray | None = None) -> float:
        values = self.values if index is None else self.values[index]
        strata = None if self.strata is None else (self.strata if index is None else self.strata[index])
        return _statistic(self.kind, values, strata)

    def aligned(self, ids: np.ndarray) -> Units:
        """These units in the order of ``ids`` (each must be present)."""
        position = {k: i for i, k in enumerate(self.ids.tolist())}
        index = np.array([position[k] for k in ids.tolist()], dtype=int)
        return Units(ids[...], self.values[index], self.columns, self.kind, self.unit,
                     None if self.strata is None else self.strata[index])


def _statistic(kind: str, values: np.ndarray, strata: np.ndarray | None) -> float:
    if len(values) == 0:
        return math.nan
    if kind in ("binary", "mean"):
        return 100.0 * float(values[:, 0].mean()) if kind == "binary" else float(values[:, 0].mean())
    if kind == "pope_f1":  # lmms-eval's pope_aggregate_*: only a literal "no" is a false negative
        pred_yes, pred_no, truth_yes = values[:, 0] > 0, values[:, 1] > 0, values[:, 2] > 0
        tp = float(np.sum(pred_yes & truth_yes))
        fp = float(np.sum(pred_yes & ~truth_yes))
        fn = float(np.sum(pred_no & truth_yes))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        return 100.0 * (2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    if kind == "mme":  # sum over categories of the mean pair score (acc + acc+)
        counts = np.bincount(strata)
        sums = np.bincount(strata, weights=values[:, 0])
        present = counts > 0
        return float(np.sum(sums[present] / counts[present]))
    raise ValueError(f"unknown unit kind {kind!r}")


# -- samples rows -> units -------------------------------------------------------------------------


def samples_path(folder: str | Path, task: str) -> Path | None:
    """The run folder's newest lmms-eval samples file for ``task`` (the run folder's rule)."""
    return newest_samples_file(Path(folder) / LMMS_EVAL_DIR, task)


@lru_cache(maxsize=1024)
def _cached_units(path: str, stamp: tuple[int, int], bench_key: str, metric: str) -> Units | None:
    return units_from_samples(read_jsonl(Path(path)), bench_key, metric)


def run_units(folder, task, bench_key: str, metric: str | None) -> Units | None:
    """The scoring units of one run folder's samples (None without a samples file or metric)."""
    if not folder or not task or not metric:
        return None
    path = samples_path(folder, str(task))
    if path is None:
        return None
    stat = path.stat()
    return _cached_units(str(path), (stat.st_mtime_ns, stat.st_size), bench_key, metric)


def units_from_samples(rows: list[dict], bench_key: str, metric: str | None) -> Units | None:
    """The scoring units of one run's samples for the metric the table shows (None: this metric
    keeps no per-sample record the report can score)."""
    if not metric:
        return None
    if bench_key == "MME":
        return _mme_units(rows, metric.split("+"))
    if bench_key == "MMB" and metric == "gpt_eval_score":
        return _mmbench_units(rows)
    if metric.startswith("pope_"):
        return _pope_units(rows, metric)
    values, ids = [], []
    for row in rows:
        value = row.get(metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        ids.append(row.get("doc_id", len(ids)))
        values.append(float(value))
    if not values:
        return None
    values = np.array(values)[:, None]
    binary = bool(np.isin(values, (0.0, 1.0)).all())
    return Units(np.array(ids), values, (metric,), "binary" if binary else "mean", "questions")


def _pope_units(rows: list[dict], metric: str) -> Units | None:
    ids, values = [], []
    for row in rows:
        entry = row.get(metric)
        if not isinstance(entry, dict):
            continue
        pred, truth = str(entry.get("prediction")), str(entry.get("ground_truth"))
        ids.append(row.get("doc_id", len(ids)))
        values.append((float(entry.get("score", pred == truth)), pred == "yes", pred == "no", truth == "yes"))
    if not values:
        return None
    values = np.array(values, dtype=float)
    if metric == "pope_accuracy":
        return Units(np.array(ids), values[:, :1], ("correct",), "binary", "questions")
    if metric == "pope_f1_score":
        return Units(np.array(ids), values[:, 1:], ("pred_yes", "pred_no", "truth_yes"), "pope_f1", "questions")
    return None  # precision, recall, yes ratio: no interval here


def _mme_units(rows: list[dict], metrics: list[str]) -> Units | None:
    """One unit per (category, question_id) pair: acc + acc+ (0, 50+0, 100+100 -> 0, 50, 200)."""
    pairs: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        for metric in metrics:
            entry = row.get(metric)
            if isinstance(entry, dict) and entry.get("category") is not None:
                key = (str(entry["category"]), str(entry["question_id"]))
                pairs.setdefault(key, []).append(float(entry["score"]))
    if not pairs:
        return None
    unpaired = [k for k, v in pairs.items() if len(v) != 2]
    if unpaired:
        raise ValueError(f"MME needs both questions of each image pair; {len(unpaired)} unpaired, e.g. {unpaired[0]}")
    keys = sorted(pairs)
    categories = sorted({c for c, _ in keys})
    code = {c: i for i, c in enumerate(categories)}
    scores = [100.0 * sum(pairs[k]) / 2 + 100.0 * (sum(pairs[k]) == 2) for k in keys]
    ids = np.array([f"{c}/{q}" for c, q in keys])
    return Units(ids, np.array(scores)[:, None], ("pair_score",), "mme", "pairs",
                 strata=np.array([code[c] for c, _ in keys], dtype=int))


def _mmbench_units(rows: list[dict]) -> Units | None:
    """One unit per circular group, judged by lmms-eval's own static matcher (eval_sub_data)."""
    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator

    entries = [row["gpt_eval_score"] for row in rows if isinstance(row.get("gpt_eval_score"), dict)]
    if not entries:
        return None
    data = pd.DataFrame(entries)
    data["prediction"] = [str(x) for x in data["prediction"]]
    data.columns = [c.lower() if c not in "ABCD" else c for c in data.columns]
    answer_map = dict(zip(data["index"], data["answer"]))
    evaluator = MMBench_Evaluator()
    group = data["index"].astype(int) % MMB_ROTATION_STRIDE
    ids, correct = [], []
    for key, sub in data.groupby(group, sort=True):
        ids.append(int(key))
        correct.append(float(evaluator.eval_sub_data(sub.sort_values("index"), answer_map, static_only=True)))
    return Units(np.array(ids), np.array(correct)[:, None], ("correct",), "binary", "circular groups")


# -- one score's interval --------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    score: float
    low: float
    high: float
    n: int
    method: str  # "wilson" or "bootstrap"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _resample(n: int, strata: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of one bootstrap resample (within each stratum when there are strata)."""
    if strata is None:
        return rng.integers(0, n, n)
    parts = [members[rng.integers(0, len(members), len(members))]
             for members in (np.flatnonzero(strata == s) for s in np.unique(strata))]
    return np.concatenate(parts)


def interval(units: Units, seed: int = SEED, iterations: int = ITERATIONS) -> Interval:
    """The score with its 95% interval: Wilson for a proportion, else a percentile bootstrap."""
    score = units.score()
    if units.kind == "binary":
        k = int(round(units.values[:, 0].sum()))
        ci = sps.binomtest(k, units.n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
        return Interval(score, 100.0 * ci.low, 100.0 * ci.high, units.n, "wilson")
    rng = np.random.default_rng(seed)
    draws = np.array([units.score(_resample(units.n, units.strata, rng)) for _ in range(iterations)])
    low, high = np.percentile(draws, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return Interval(score, float(low), float(high), units.n, "bootstrap")


def retention_interval(pairs: list[tuple[Units, Units]], seed: int = SEED,
                       iterations: int = ITERATIONS) -> tuple[float, float, float]:
    """Avg retention (mean over benchmarks of score / full-budget score, in %) and its 95%
    percentile-bootstrap interval. ``pairs``: (this run's units, the full-budget run's) per
    benchmark; each benchmark resamples the units both answered, the same draw for both."""
    aligned = []
    for reduced, full in pairs:
        common = np.intersect1d(reduced.ids, full.ids)
        if len(common):
            aligned.append((reduced.aligned(common), full.aligned(common)))
    if not aligned:
        return math.nan, math.nan, math.nan

    def ratios(indices) -> list[float]:
        """score / full-budget score per benchmark; NaN where the full score is 0 (undefined)."""
        out = []
        for (r, f), i in zip(aligned, indices):
            full_score = f.score(i)
            out.append(r.score(i) / full_score if full_score else math.nan)
        return out

    point_ratios = ratios([None] * len(aligned))
    defined = [math.isfinite(x) for x in point_ratios]
    if not any(defined):
        return math.nan, math.nan, math.nan
    point = 100.0 * float(np.mean([x for x in point_ratios if math.isfinite(x)]))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(iterations):
        drawn = [x for x, keep in zip(ratios([_resample(r.n, r.strata, rng) for r, _ in aligned]), defined) if keep]
        # a draw whose full-budget score is 0 on a benchmark the point estimate averages is not the
        # same statistic: it is dropped rather than averaged over fewer benchmarks
        draws.append(100.0 * float(np.mean(drawn)) if all(math.isfinite(x) for x in drawn) else math.nan)
    draws = np.array(draws)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return point, math.nan, math.nan
    low, high = np.percentile(draws, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return point, float(low), float(high)


# -- paired comparison -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Paired:
    """B minus A on the units both answered."""

    score_a: float
    score_b: float
    difference: float
    low: float
    high: float
    n: int
    test: str  # "McNemar (exact)" or "paired bootstrap"
    p_value: float
    a_only: int | None = None  # McNemar's discordant counts: right in A only / in B only
    b_only: int | None = None

    @property
    def distinguishable(self) -> bool:
        return self.p_value < 1 - CONFIDENCE


def mcnemar(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value: a binomial test of the discordant counts at 1/2."""
    if a_only + b_only == 0:
        return 1.0
    return float(sps.binomtest(b_only, a_only + b_only, 0.5).pvalue)


def paired(a: Units, b: Units, seed: int = SEED, iterations: int = ITERATIONS) -> Paired:
    """The paired difference B - A with its 95% paired-bootstrap interval and a paired test
    (exact McNemar for binary correctness; else the paired bootstrap's two-sided p-value)."""
    if a.kind != b.kind:
        raise ValueError(f"cannot pair a {a.kind} score with a {b.kind} one")
    common = np.intersect1d(a.ids, b.ids)
    if not len(common):
        raise ValueError("the two runs share no question: they are not paired")
    a, b = a.aligned(common), b.aligned(common)
    score_a, score_b = a.score(), b.score()
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(iterations):
        index = _resample(len(common), a.strata, rng)
        draws.append(b.score(index) - a.score(index))
    draws = np.array(draws)
    low, high = np.percentile(draws, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    if a.kind == "binary":
        right_a, right_b = a.values[:, 0] > 0, b.values[:, 0] > 0
        a_only, b_only = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
        return Paired(score_a, score_b, score_b - score_a, float(low), float(high), len(common),
                      "McNemar (exact)", mcnemar(a_only, b_only), a_only, b_only)
    # two-sided bootstrap p-value: twice the smaller share of resampled differences beyond 0
    p = min(1.0, 2 * min(np.mean(draws <= 0), np.mean(draws >= 0))) if np.any(draws != 0) else 1.0
    return Paired(score_a, score_b, score_b - score_a, float(low), float(high), len(common),
                  "paired bootstrap", float(p))


def retention_difference(triples: list[tuple[Units, Units, Units]], seed: int = SEED,
                         iterations: int = ITERATIONS) -> Paired:
    """Avg retention of B minus that of A (percentage points), both against the same full-budget
    run, with a paired-bootstrap 95% interval and two-sided p-value: each benchmark resamples the
    units all three runs answered, one draw for all three. ``triples``: (A, B, full) per benchmark."""
    aligned = []
    for a, b, full in triples:
        common = np.intersect1d(np.intersect1d(a.ids, b.ids), full.ids)
        if len(common):
            aligned.append((a.aligned(common), b.aligned(common), full.aligned(common)))
    if not aligned:
        raise ValueError("the runs share no question: they are not paired")

    def avgs(indices):
        ra, rb = [], []
        for (a, b, f), i in zip(aligned, indices):
            base = f.score(i)
            if base:
                ra.append(a.score(i) / base)
                rb.append(b.score(i) / base)
        return (100.0 * float(np.mean(ra)), 100.0 * float(np.mean(rb))) if ra else (math.nan, math.nan)

    score_a, score_b = avgs([None] * len(aligned))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(iterations):
        x, y = avgs([_resample(a.n, a.strata, rng) for a, _, _ in aligned])
        draws.append(y - x)
    draws = np.array(draws)
    draws = draws[np.isfinite(draws)]
    low, high = np.percentile(draws, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    p = min(1.0, 2 * min(np.mean(draws <= 0), np.mean(draws >= 0))) if np.any(draws != 0) else 1.0
    return Paired(score_a, score_b, score_b - score_a, float(low), float(high),
                  min(a.n for a, _, _ in aligned), "paired bootstrap", float(p))
