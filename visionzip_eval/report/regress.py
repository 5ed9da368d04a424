"""``visionzip-eval regress``: compare a results directory with a stored baseline.

Baseline file (JSON, see ``baselines/README.md``)::

    {"format": "visionzip-eval-baseline", "version": 1, "placeholder": false,
     "description": "...", "created": "...", "source": {...},
     "tolerances": {"score": {"abs": 1.0}, "latency": {"rel": 0.25, "direction": "upper"}, ...,
                    "metrics": {"mme_perception_score": {"abs": 10.0}}},
     "runs": {"<model>/<method>/<budget>/<task>/limit-<n|all>/seed-<s>":
              {"exact_match,none": 0.61, "visual_tokens": 64.0, "prefill_ms_median": 41.2, ...}}}

Each value is checked with the tolerance of its kind (or its own entry under
``tolerances.metrics``): allowed = 0 when ``exact``, else ``max(abs, rel * |baseline|)``;
``direction`` ``both`` fails on a change either way, ``upper`` only on an increase (slower,
bigger). Scores are compared on the report's scale (percentage points for lmms-eval's 0-1
metrics, points for MME), so ``abs`` is in those points.

``"relative_to": "full"`` (latency and memory on shared CPUs) compares ratios within one sweep
instead of absolute values: each run's value over its full-budget run's (same model, task,
limit, seed), against the same ratio in the baseline; the allowed change is
``max(rel, spread * s) * baseline ratio``, where ``s`` is the larger relative spread
``(p90 - p10) / median`` over the requests of the run and of its full-budget run, so a noisier
measurement gets a wider gate. The full-budget run itself is the reference and is not gated.

Latency is never gated on a run the report marks noisy (``visionzip_eval.noise``: other processes
took over a quarter of the cores, or the machine's calibration probe moved), nor on a ratio
whose full-budget reference is noisy: those checks say ``noisy`` with the reason, and count
neither as passed nor as failed. Scores, counts, FLOPs and memory are gated as always.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

from visionzip_eval.records import FULL_METHOD, read_run_json
from visionzip_eval.benchmarks import metric_scale
from visionzip_eval.report.collect import STATUS_OK, Results, load_results

FORMAT = "visionzip-eval-baseline"
VERSION = 1

# check name -> kind, for the run-level values (lmms-eval metrics ``name,filter`` are "score")
RUN_CHECKS = {
    "visual_tokens": "tokens",
    "tokens_per_image": "tokens",
    "n_samples": "count",
    "failed_requests": "count",
    "prefill_flops_median": "flops",
    "vision_flops_median": "flops",
    "prefill_ms_median": "latency",
    "ttft_ms_median": "latency",
    "decode_ms_per_token_median": "latency",
    "total_ms_median": "latency",
    "peak_memory_bytes_median": "memory",
}
KINDS = ("score", "tokens", "count", "flops", "latency", "memory")

# Defaults, for a dedicated GPU (and for any kind a baseline file leaves out).
DEFAULT_TOLERANCES: dict = {
    "score": {"abs": 1.0, "direction": "both"},
    "tokens": {"exact": True},
    "count": {"exact": True},
    "flops": {"rel": 0.001, "direction": "both"},
    "latency": {"rel": 0.25, "abs": 1.0, "direction": "upper"},
    "memory": {"rel": 0.10, "direction": "upper"},
    "metrics": {
        "mme_perception_score": {"abs": 10.0},
        "mme_cognition_score": {"abs": 10.0},
    },
}

# Preset for baselines written from CPU results (shared CI machines: absolute timings are noise).
CPU_TOLERANCES: dict = {
    "_doc": (
        "CPU baseline: the tiny models are deterministic on CPU, so scores (abs, in report points), "
        "visual-token counts, sample counts and FLOPs (functions of the token counts) are gated tightly. "
        "Absolute latency on shared CI runners varies several-fold with load, so latency is gated as each "
        "run's ratio to its own sweep's full-budget run (the same machine at the same time), allowed to grow "
        "fourfold (the tiny models' timings are a few ms of mostly fixed overhead: on a quiet machine one "
        "budget's ratios moved by up to 90% between sweeps) or by twice the measured relative spread "
        "(p90 - p10) / median, whichever is larger, so it catches gross regressions only; peak "
        "memory (the process's peak RSS, which depends on what ran before in the process) as its ratio to "
        "the full-budget run, allowed to double."
    ),
    "score": {"abs": 0.5, "direction": "both"},
    "tokens": {"exact": True},
    "count": {"exact": True},
    "flops": {"rel": 0.001, "direction": "both"},
    "latency": {"relative_to": "full", "rel": 3.0, "spread": 2.0, "direction": "upper"},
    "memory": {"relative_to": "full", "rel": 1.0, "direction": "upper"},
    "metrics": {
        "mme_perception_score": {"abs": 1.0},
        "mme_cognition_score": {"abs": 1.0},
    },
}


def run_key(row) -> str:
    limit = row["limit"]
    limit = "all" if limit is None or (isinstance(limit, float) and math.isnan(limit)) else int(limit)
    seed = row["seed"]
    seed = int(seed) if isinstance(seed, (int, float)) and not math.isnan(seed) else seed
    return f"{row['model']}/{row['method']}/{row['budget']}/{row['task']}/limit-{limit}/seed-{seed}"


def full_run_key(key: str) -> str:
    """The key of the full-budget run a run's ratios refer to (same model, task, limit, seed)."""
    model, _, _, rest = key.split("/", 3)
    return f"{model}/{FULL_METHOD}/full/{rest}"


def _spread(row, check: str) -> float:
    """(p90 - p10) / median of a latency check's requests, NaN where unknown."""
    stem = check.removesuffix("_median")
    median, p10, p90 = (_number(row.get(f"{stem}_{q}")) for q in ("median", "p10", "p90"))
    if any(math.isnan(v) for v in (median, p10, p90)) or median <= 0:
        return math.nan
    return (p90 - p10) / median


def kind_of(check: str) -> str:
    return RUN_CHECKS.get(check, "score")


def _number(value) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def current_values(results: Results) -> dict[str, dict]:
    """``{run key: {"status": ..., "error": ..., "values": {check: value}}}`` for every run."""
    out: dict[str, dict] = {}
    for path, rows in results.frame.groupby("path", sort=True):
        first = rows.iloc[0]
        key = run_key(first)
        values, spreads = {}, {}
        if first["status"] == STATUS_OK:
            for _, row in rows.iterrows():
                if isinstance(row["metric"], str):
                    values[f"{row['metric']},{row['filter']}"] = _number(row["value"])
            for check in RUN_CHECKS:
                values[check] = _number(first[check])
                if RUN_CHECKS[check] == "latency":
                    spreads[check] = _spread(first, check)
        entry = dict(status=first["status"], error=first["error"], values=values, spreads=spreads, path=path,
                     noise=first["noise"] if bool(first["noisy"]) else "")
        if key in out and out[key]["status"] == STATUS_OK and first["status"] != STATUS_OK:
            continue  # a partial retry beside a complete run: the complete one counts
        out[key] = entry
    return out


# -- baseline file ---------------------------------------------------------------------------------


def merged_tolerances(tolerances: dict | None) -> dict:
    merged = copy.deepcopy(DEFAULT_TOLERANCES)
    for kind, spec in (tolerances or {}).items():
        if kind.startswith("_"):
            continue
        if kind == "metrics":
            for name, override in (spec or {}).items():
                if not name.startswith("_"):
                    merged["metrics"][name] = {**merged["metrics"].get(name, {}), **override}
        elif kind in KINDS:
            merged[kind] = {**merged.get(kind, {}), **spec}
        else:
            raise ValueError(f"unknown tolerance kind {kind!r} (known: {', '.join(KINDS)}, metrics)")
    return merged


def tolerance_for(check: str, tolerances: dict) -> dict:
    kind = kind_of(check)
    tol = dict(tolerances.get(kind, {}))
    overrides = tolerances.get("metrics", {})
    for name in (check.split(",")[0], check):
        if name in overrides:
            tol.update(overrides[name])
    return tol


def _update_hint(path: Path) -> str:
    return (f"run the sweep on the target machine, check its report, then "
            f"`visionzip-eval regress RESULTS --baseline {path} --update-baseline` and commit the file")


def load_baseline(path: str | Path) -> dict:
    """The baseline, or ValueError when it is missing, a placeholder, or malformed (a
    regression check must never pass vacuously)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"baseline {path} does not exist: {_update_hint(path)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"baseline {path} is not valid JSON ({error})") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"baseline {path} is not a visionzip-eval baseline (format {FORMAT!r} expected)")
    if data.get("version") != VERSION:
        raise ValueError(f"baseline {path} has version {data.get('version')!r}; this tool reads version {VERSION}")
    if data.get("placeholder") or not data.get("runs"):
        raise ValueError(
            f"baseline {path} is a placeholder with no measured values, so nothing can be compared: {_update_hint(path)}"
        )
    merged_tolerances(data.get("tolerances"))  # validates
    return data


def build_baseline(results: Results, tolerances: dict | None = None, description: str | None = None) -> dict:
    current = current_values(results)
    bad = {k: v for k, v in current.items() if v["status"] != STATUS_OK}
    if bad:
        listing = "; ".join(f"{k} ({v['status']}: {v['error']})" for k, v in sorted(bad.items()))
        raise ValueError(f"refusing to write a baseline from a sweep with failed or incomplete runs: {listing}")
    # a run whose every request failed (answers "[visionzip-eval: sample failed]") still ends
    # "ok": a baseline from it would lock the failure in
    dead = sorted(k for k, v in current.items()
                  if (v["values"].get("failed_requests") or 0) > 0 and math.isnan(_number(v["values"].get("visual_tokens"))))
    if dead:
        raise ValueError("refusing to write a baseline from runs where every request failed (see their "
                         f"efficiency.jsonl 'error'): {'; '.join(dead)}")
    runs_frame = results.runs
    devices = sorted(set(runs_frame["device"].dropna().astype(str)))
    if tolerances is None:
        tolerances = copy.deepcopy(CPU_TOLERANCES if devices == ["cpu"] else DEFAULT_TOLERANCES)
    versions = {}
    for path in runs_frame["path"]:
        info = read_run_json(Path(path))
        if info and info.get("versions"):
            versions = info["versions"]
            break
    return {
        "format": FORMAT,
        "version": VERSION,
        "placeholder": False,
        "description": description or f"baseline from {len(current)} runs on {', '.join(devices) or 'unknown device'}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"results": str(results.root), "devices": devices, "versions": versions,
                   "runs": len(current)},
        "tolerances": tolerances,
        "runs": {
            key: {name: (None if math.isnan(v) else v) for name, v in sorted(entry["values"].items())}
            for key, entry in sorted(current.items())
        },
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_baseline(results_dir: str | Path, path: str | Path) -> dict:
    """Write (or rewrite) the baseline from these results, keeping the tolerances and
    description of an existing file (a placeholder's included)."""
    path = Path(path)
    old = _read_json(path) if path.is_file() else None
    tolerances = old.get("tolerances") if isinstance(old, dict) and old.get("tolerances") else None
    if tolerances is not None:
        merged_tolerances(tolerances)
    description = old.get("description") if isinstance(old, dict) and not old.get("placeholder") else None
    baseline = build_baseline(load_results(results_dir), tolerances, description)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return baseline


# -- comparison ------------------------------------------------------------------------------------


@dataclass
class Check:
    run: str
    name: str
    kind: str
    status: str  # pass, fail, new (not in the baseline), noisy (latency timed on a noisy machine)
    baseline: float | None = None
    current: float | None = None
    allowed: float | None = None  # on the compared scale
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def compare_value(name: str, base: float, cur: float, tol: dict) -> tuple[bool, float, str]:
    """(passed, allowed deviation, message) on the report scale."""
    kind = kind_of(name)
    scale = metric_scale(name) if kind == "score" else 1.0
    base, cur = _number(base), _number(cur)
    if math.isnan(base) and math.isnan(cur):
        return True, 0.0, "both undefined"
    if math.isnan(base) or math.isnan(cur):
        return False, 0.0, "undefined in " + ("the baseline" if math.isnan(base) else "the results")
    b, c = base * scale, cur * scale
    if tol.get("exact"):
        allowed = 0.0
    else:
        allowed = max(float(tol.get("abs", 0.0)), float(tol.get("rel", 0.0)) * abs(b))
    diff = c - b
    direction = tol.get("direction", "both")
    eps = 1e-9 * max(1.0, abs(b))
    if direction == "upper":
        ok = diff <= allowed + eps
    elif direction == "lower":
        ok = -diff <= allowed + eps
    else:
        ok = abs(diff) <= allowed + eps
    what = "exact" if tol.get("exact") else f"±{allowed:.4g}" if direction == "both" else (
        f"+{allowed:.4g}" if direction == "upper" else f"-{allowed:.4g}")
    message = f"{c:.6g} vs baseline {b:.6g} (change {diff:+.4g}, allowed {what})"
    return ok, allowed, message


def compare_ratio(name: str, base: float, cur: float, base_full: float, cur_full: float, spread: float,
                  tol: dict) -> tuple[bool, float, str, float, float]:
    """(passed, allowed, message, baseline ratio, current ratio) for a value compared as its
    ratio to the full-budget run of the same sweep."""
    base, cur, base_full, cur_full = (_number(v) for v in (base, cur, base_full, cur_full))
    if any(math.isnan(v) for v in (base, cur, base_full, cur_full)) or base_full <= 0 or cur_full <= 0:
        message = "ratio to the full-budget run undefined (a value or the full-budget run is missing)"
        return False, 0.0, message, math.nan, math.nan
    b, c = base / base_full, cur / cur_full
    widen = float(tol.get("spread", 0.0)) * (0.0 if math.isnan(spread) else spread)
    factor = max(float(tol.get("rel", 0.0)), widen)
    allowed = factor * abs(b)
    diff = c - b
    direction = tol.get("direction", "both")
    ok = diff <= allowed if direction == "upper" else -diff <= allowed if direction == "lower" else abs(diff) <= allowed
    why = f"spread {spread:.2f} x {tol.get('spread')}" if widen > float(tol.get("rel", 0.0)) else f"rel {tol.get('rel')}"
    message = (f"ratio to full {c:.3f} vs baseline {b:.3f} (change {diff:+.3f}, allowed "
               f"{'+' if direction == 'upper' else '±'}{allowed:.3f}: {why})")
    return ok, allowed, message, b, c


def compare(results: Results, baseline: dict) -> list[Check]:
    tolerances = merged_tolerances(baseline.get("tolerances"))
    current = current_values(results)
    checks: list[Check] = []
    for key, expected in sorted(baseline["runs"].items()):
        entry = current.get(key)
        if entry is None:
            checks.append(Check(key, "run", "run", "fail", message="run missing from the results"))
            continue
        if entry["status"] != STATUS_OK:
            checks.append(Check(key, "run", "run", "fail",
                                message=f"run {entry['status']}: {entry['error']}"))
            continue
        checks.append(Check(key, "run", "run", "pass", message="run ok"))
        for name, base in sorted(expected.items()):
            kind = kind_of(name)
            if name not in entry["values"]:
                checks.append(Check(key, name, kind, "fail", baseline=base, message="missing from the results"))
                continue
            cur = entry["values"][name]
            tol = tolerance_for(name, tolerances)
            if kind == "latency":
                full = current.get(full_run_key(key)) if tol.get("relative_to") == "full" else None
                noise = entry["noise"] or (full or {}).get("noise", "")
                if noise:
                    checks.append(Check(key, name, kind, "noisy", current=_number(cur),
                                        message=f"not gated: timed on a noisy machine ({noise})"))
                    continue
            if tol.get("relative_to") == "full":
                full_key = full_run_key(key)
                if full_key == key:
                    checks.append(Check(key, name, kind, "pass", baseline=base, current=cur,
                                        message="the full-budget run is the reference of the ratios"))
                    continue
                full = current.get(full_key) or {"values": {}, "spreads": {}}
                spread = max(entry["spreads"].get(name, math.nan), full["spreads"].get(name, math.nan),
                             key=lambda v: -1.0 if math.isnan(v) else v)
                ok, allowed, message, b, c = compare_ratio(
                    name, base, cur, baseline["runs"].get(full_key, {}).get(name), full["values"].get(name),
                    spread, tol)
                checks.append(Check(key, f"{name}/full", kind, "pass" if ok else "fail", baseline=b,
                                    current=c, allowed=allowed, message=message))
                continue
            ok, allowed, message = compare_value(name, base, cur, tol)
            scale = metric_scale(name) if kind == "score" else 1.0
            checks.append(Check(key, name, kind, "pass" if ok else "fail",
                                baseline=None if base is None else _number(base) * scale,
                                current=_number(cur) * scale, allowed=allowed, message=message))
        for name in sorted(set(entry["values"]) - set(expected)):
            checks.append(Check(key, name, kind_of(name), "new", current=entry["values"][name],
                                message="not in the baseline"))
    for key in sorted(set(current) - set(baseline["runs"])):
        checks.append(Check(key, "run", "run", "new", message="run not in the baseline"))
    return checks


# -- output ----------------------------------------------------------------------------------------


def _fmt(value) -> str:
    value = _number(value)
    return "–" if math.isnan(value) else f"{value:.6g}"


def format_checks(checks: list[Check], only_failures: bool = False) -> str:
    shown = [c for c in checks if c.failed] if only_failures else checks
    rows = [("result", "run", "check", "baseline", "current", "allowed", "detail")]
    for c in shown:
        detail = c.message if c.status != "pass" or c.kind == "run" else ""
        rows.append((c.status.upper(), c.run, c.name, _fmt(c.baseline), _fmt(c.current),
                     "" if c.allowed is None else _fmt(c.allowed), detail))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(6)) + ("  " + r[6] if r[6] else "") for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ["", summary_line(checks)])


def summary_line(checks: list[Check]) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "new", "noisy")}
    verdict = "FAILED" if counts["fail"] else "PASSED"
    return (f"regress {verdict}: {len(checks)} checks, {counts['pass']} passed, {counts['fail']} failed, "
            f"{counts['new']} new (not in the baseline, not gated)"
            + (f", {counts['noisy']} latency checks not gated (timed on a noisy machine)" if counts["noisy"] else ""))


def junit_xml(checks: list[Check], baseline_path: str, results_dir: str) -> ET.ElementTree:
    failures = sum(c.failed for c in checks)
    skipped = sum(c.status in ("new", "noisy") for c in checks)
    attrs = dict(name="visionzip-eval regress", tests=str(len(checks)), failures=str(failures),
                 errors="0", skipped=str(skipped))
    suites = ET.Element("testsuites", attrs)
    suite = ET.SubElement(suites, "testsuite", dict(attrs, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S")))
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="baseline", value=str(baseline_path))
    ET.SubElement(props, "property", name="results", value=str(results_dir))
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=c.run, name=c.name, time="0")
        if c.failed:
            failure = ET.SubElement(case, "failure", message=c.message, type=f"regression:{c.kind}")
            failure.text = (f"run {c.run}\ncheck {c.name} ({c.kind})\nbaseline {_fmt(c.baseline)}\n"
                            f"current {_fmt(c.current)}\n{c.message}")
        elif c.status in ("new", "noisy"):
            ET.SubElement(case, "skipped", message=c.message)
    ET.indent(suites)
    return ET.ElementTree(suites)


@dataclass
class RegressOutcome:
    checks: list[Check]
    junit: Path | None
    table: str

    @property
    def failures(self) -> int:
        return sum(c.failed for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0


def regress(results_dir: str | Path, baseline_path: str | Path, junit_path: str | Path | None = None,
            only_failures: bool = False) -> RegressOutcome:
    baseline = load_baseline(baseline_path)
    results = load_results(results_dir)
    checks = compare(results, baseline)
    junit = Path(junit_path) if junit_path else Path(results_dir) / "report" / "regress.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    junit_xml(checks, str(baseline_path), str(results_dir)).write(junit, encoding="utf-8", xml_declaration=True)
    return RegressOutcome(checks=checks, junit=junit, table=format_checks(checks, only_failures))
