"""CPU baselines gate latency and memory as ratios to the same sweep's full-budget run: a machine
that is slower everywhere passes, one run slower than its sweep fails, a noisier measurement
gets a wider gate. And the runs themselves say how busy the machine was."""

import json
import shutil

import pytest

from visionzip_eval.report.collect import load_results
from visionzip_eval.report.regress import CPU_TOLERANCES, compare, compare_ratio, load_baseline, write_baseline
from synthetic import make_results, quiet_machine

VZ64 = "llava-1.5-7b__visionzip__64__{task}__limit-all__seed-0"
TIMES = ("vision_ms", "prefill_ms", "decode_ms", "ttft_ms", "total_ms")


@pytest.fixture(scope="module")
def cpu_sweep(tmp_path_factory):
    """Synthetic CPU results and their baseline (CPU preset: ratio gates)."""
    base = tmp_path_factory.mktemp("cpu")
    root = make_results(base / "sweep", problems=False, device="cpu")
    baseline = base / "baseline.json"
    write_baseline(root, baseline)
    return root, baseline


def _copy(cpu_sweep, tmp_path):
    root, baseline = cpu_sweep
    copy = tmp_path / "sweep"
    shutil.copytree(root, copy)
    return copy, load_baseline(baseline)


def _scale_times(folder, factor, jitter=0.0):
    path = folder / "efficiency.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        for key in TIMES:
            if row[key] is not None:
                row[key] *= factor * (1 + jitter * (i % 3))  # jitter: spread over the requests
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _latency_checks(checks):
    return [c for c in checks if c.kind == "latency" and c.name.endswith("/full")]


def test_cpu_baselines_gate_latency_relative_to_full():
    assert CPU_TOLERANCES["latency"]["relative_to"] == "full"
    for name in ("cpu_smoke.json", "cpu_demo.json"):
        committed = load_baseline(f"baselines/{name}")
        assert committed["tolerances"]["latency"]["relative_to"] == "full"
        assert committed["tolerances"]["memory"]["relative_to"] == "full"


def test_a_machine_three_times_slower_everywhere_passes(cpu_sweep, tmp_path):
    root, baseline = _copy(cpu_sweep, tmp_path)
    for folder in (root / "runs").iterdir():
        _scale_times(folder, 3.0)
    checks = compare(load_results(root), baseline)
    latency = _latency_checks(checks)
    assert latency and not [c for c in checks if c.failed]
    assert all(abs(c.current - c.baseline) < 1e-9 for c in latency)  # the ratios did not move


def test_one_run_slower_than_its_sweep_fails(cpu_sweep, tmp_path):
    root, baseline = _copy(cpu_sweep, tmp_path)
    _scale_times(root / "runs" / VZ64.format(task="pope"), 6.0)  # beyond the CPU gate's fourfold
    failed = [c for c in compare(load_results(root), baseline) if c.failed]
    assert failed and {c.run for c in failed} == {"llava-1.5-7b/visionzip/64/pope/limit-all/seed-0"}
    assert {c.name for c in failed} >= {"prefill_ms_median/full", "ttft_ms_median/full"}
    assert "ratio to full" in failed[0].message


def test_spread_widens_the_gate():
    tol = dict(CPU_TOLERANCES["latency"], rel=0.5)  # a 50% floor, or twice the measured relative spread
    # a run 60% slower relative to its full-budget run: beyond the floor when measured tightly ...
    ok, allowed, message, base, current = compare_ratio("prefill_ms_median", 10.0, 16.0, 20.0, 20.0, 0.1, tol)
    assert (ok, base, current) == (False, 0.5, 0.8) and allowed == pytest.approx(0.25)
    # ... within the gate when its requests spread over 40% of their median
    ok, allowed, message, _, _ = compare_ratio("prefill_ms_median", 10.0, 16.0, 20.0, 20.0, 0.4, tol)
    assert ok and allowed == pytest.approx(0.4) and "spread 0.40 x 2.0" in message
    ok, *_ = compare_ratio("prefill_ms_median", 10.0, 16.0, 20.0, float("nan"), 0.1, tol)
    assert not ok  # no full-budget run to compare with: never a silent pass


def test_noisy_runs_are_flagged_from_their_probes(tmp_path):
    root = make_results(tmp_path / "sweep", problems=False, device="cpu")
    noisy = root / "runs" / VZ64.format(task="gqa") / "run.json"
    info = json.loads(noisy.read_text())
    info["machine"] = quiet_machine(matmul_gflops=40.0)  # the machine at 0.4x its speed during this run
    noisy.write_text(json.dumps(info))
    busy = root / "runs" / VZ64.format(task="mme") / "run.json"
    info = json.loads(busy.read_text())
    info["machine"] = quiet_machine(other_cpu_share=0.8)
    busy.write_text(json.dumps(info))
    runs = load_results(root).runs.set_index("run_id")
    assert runs["noisy"].sum() == 2
    assert "matmul probe at 0.40x the median" in runs.loc[VZ64.format(task="gqa"), "noise"]
    assert "other processes used 80% of the cores" in runs.loc[VZ64.format(task="mme"), "noise"]
    assert not runs.drop([VZ64.format(task="gqa"), VZ64.format(task="mme")])["noisy"].any()


def test_efficiency_table_marks_noisy_speedups(tmp_path):
    from visionzip_eval.report.tables import NOISY_MARK, efficiency_tables

    root = make_results(tmp_path / "sweep", problems=False, device="cpu")
    quiet = efficiency_tables(load_results(root))
    assert quiet and not any(NOISY_MARK in label for b in quiet for label in b.frame["label"])
    assert not any(NOISY_MARK in note for b in quiet for note in b.notes)

    path = root / "runs" / VZ64.format(task="pope") / "run.json"
    info = json.loads(path.read_text())
    info["machine"] = quiet_machine(other_cpu_share=0.6)
    path.write_text(json.dumps(info))
    blocks = efficiency_tables(load_results(root))
    marked = [(b.title, row["label"], row["budget"]) for b in blocks for _, row in b.frame.iterrows()
              if NOISY_MARK in row["label"]]
    # the VisionZip 64 row of each table that holds that run's requests, and no other row
    assert sorted(marked) == [(f"llava-1.5-7b: {scope}", f"VisionZip {NOISY_MARK}", "64")
                              for scope in ("all image tasks", "pope")]
    assert any("(1 run; other processes used up to 60% of the cores)" in note for b in blocks for note in b.notes)


def test_latency_of_a_noisy_run_is_reported_not_gated(cpu_sweep, tmp_path):
    from visionzip_eval.report.regress import summary_line

    root, baseline = _copy(cpu_sweep, tmp_path)
    folder = root / "runs" / VZ64.format(task="pope")
    _scale_times(folder, 6.0)  # would fail its ratio gates (see above) ...
    info = json.loads((folder / "run.json").read_text())
    info["machine"] = quiet_machine(other_cpu_share=0.7)  # ... but another job held the cores
    (folder / "run.json").write_text(json.dumps(info))
    checks = compare(load_results(root), baseline)
    assert not [c for c in checks if c.failed]
    noisy = [c for c in checks if c.status == "noisy"]
    assert {c.run for c in noisy} == {"llava-1.5-7b/visionzip/64/pope/limit-all/seed-0"}
    assert {c.kind for c in noisy} == {"latency"} and "other processes used 70% of the cores" in noisy[0].message
    assert [c.status for c in checks if c.run == noisy[0].run and c.kind == "memory"] == ["pass"]  # still gated
    assert f"{len(noisy)} latency checks not gated (timed on a noisy machine)" in summary_line(checks)
