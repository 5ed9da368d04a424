"""Which runs were timed on a noisy machine (read by the report, which marks them, and by the
sweep, which reruns them on request).

Each run records a calibration probe before and after it (``profiling.machine_probe``: a fixed
matmul and memory copy, and the CPU time other processes took meanwhile). A run is *noisy*
when other processes took more than ``OTHER_CPU_SHARE`` of the cores while it ran, or when its
matmul probe is more than ``PROBE_DEVIATION`` slower or faster than the median probe of the
results it is reported with (the machine changed speed under it). The memory-copy probe is
recorded but not judged: a 16 MiB copy varied by +-40% between processes on a machine whose
matmul probe held steady. Noisy runs' timings are still shown,
marked; ``visionzip-eval sweep --rerun-noisy`` runs them again.
"""

from __future__ import annotations

import math

import pandas as pd

OTHER_CPU_SHARE = 0.25  # other processes' mean share of all cores during the run
PROBE_DEVIATION = 0.40  # |probe / median - 1| beyond this is a different machine (quiet sweeps here: 0.64-1.18x)


def probe_columns(machine: dict | None) -> dict:
    """The per-run figures the report keeps from ``run.json``'s machine record."""
    machine = machine or {}
    probes = [p for p in (machine.get("before"), machine.get("after")) if isinstance(p, dict)]

    # the faster of the two: a process's very first probe can read slow (0.54x the median on a
    # quiet machine, before the first run) while its second is normal; load during the run is
    # what other_cpu_share measures
    def fastest(key):
        values = [p[key] for p in probes if isinstance(p.get(key), (int, float))]
        return float(max(values)) if values else math.nan

    share = machine.get("other_cpu_share")
    return dict(
        probe_gflops=fastest("matmul_gflops"),
        probe_copy_gbs=fastest("copy_gbs"),
        other_cpu_share=float(share) if isinstance(share, (int, float)) else math.nan,
    )


def flag_noisy(runs: pd.DataFrame, other_cpu_share: float = OTHER_CPU_SHARE,
               probe_deviation: float = PROBE_DEVIATION) -> pd.DataFrame:
    """``noisy`` (bool) and ``noise`` (why, or "") for each row of a frame with the
    ``probe_columns``; the medians are over the frame's rows, per device."""
    out = runs.copy()
    out["noisy"] = False
    out["noise"] = ""
    for _, rows in out.groupby(out["device"].fillna(""), sort=False):
        medians = {key: rows[key].median() for key in ("probe_gflops",)}
        for index, row in rows.iterrows():
            reasons = []
            share = row["other_cpu_share"]
            if isinstance(share, float) and not math.isnan(share) and share > other_cpu_share:
                reasons.append(f"other processes used {share:.0%} of the cores")
            for key, what in (("probe_gflops", "matmul"),):
                value, median = row[key], medians[key]
                if not (isinstance(value, float) and value > 0 and median > 0) or math.isnan(value):
                    continue
                ratio = value / median
                if abs(ratio - 1) > probe_deviation:
                    reasons.append(f"{what} probe at {ratio:.2f}x the median")
            out.at[index, "noisy"] = bool(reasons)
            out.at[index, "noise"] = "; ".join(reasons)
    return out


def noise_summary(flagged: pd.DataFrame) -> str:
    """One short phrase for a set of noisy runs: how many, the busiest other-process share and
    the furthest matmul probe."""
    parts = [f"{len(flagged)} run{'s' if len(flagged) != 1 else ''}"]
    shares = flagged["other_cpu_share"].dropna()
    shares = shares[shares > OTHER_CPU_SHARE]
    if len(shares):
        parts.append(f"other processes used up to {shares.max():.0%} of the cores")
    deviations = [float(x) for x in flagged["noise"].str.extract(r"matmul probe at ([0-9.]+)x")[0].dropna()]
    if deviations:
        worst = max(deviations, key=lambda r: abs(r - 1))
        parts.append(f"matmul probe as far as {worst:.2f}x the median")
    return "; ".join(parts)


def probe_noise(record: dict) -> str:
    """Why one measurement between two probes (``profiling.machine_record``) is noisy, '' when it
    is not: the sweep's rules for a lone measurement (a bench), where there is no sweep median:
    other processes above ``OTHER_CPU_SHARE`` of the cores, or the matmul probe after it off the
    one before by more than ``PROBE_DEVIATION`` (the machine changed speed under it)."""
    reasons = []
    share = record.get("other_cpu_share")
    if isinstance(share, (int, float)) and share > OTHER_CPU_SHARE:
        reasons.append(f"other processes used {share:.0%} of the cores")
    before, after = (record.get(key) or {} for key in ("before", "after"))
    first, last = before.get("matmul_gflops"), after.get("matmul_gflops")
    if isinstance(first, (int, float)) and isinstance(last, (int, float)) and first > 0:
        if abs(last / first - 1) > PROBE_DEVIATION:
            reasons.append(f"matmul probe after at {last / first:.2f}x the one before")
    return "; ".join(reasons)
