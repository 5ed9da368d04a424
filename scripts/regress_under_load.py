#!/usr/bin/env python
"""The CPU regression gate under load: the smoke sweep and `regress` against the committed CPU
baseline while busy-loop processes occupy every core, then the same quiet, both timed.

    .venv/bin/python scripts/regress_under_load.py [--config configs/smoke.yaml]
        [--baseline baselines/cpu_smoke.json] [--burners N] [--skip-quiet]

Prints, for each condition, the sweep's wall time, the regress verdict and counts, and how many
runs the report marks noisy; exits 1 if the loaded gate fails. Latency is gated as ratios to the
sweep's own full-budget runs (baselines/README.md), so a machine slowed everywhere must pass.
Wrap a whole `.ci/run` the same way: from a clean clone, `python PATH/TO/regress_under_load.py
--command "bash .ci/run"` (the command runs in the current directory).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def burn(stop_at: float) -> None:
    """Keep one core busy until ``stop_at`` (a busy loop with no I/O, as another CI job would)."""
    x = 0
    while time.time() < stop_at:
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def run(command: list[str], env: dict, cwd: Path = REPO) -> tuple[int, float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    return done.returncode, time.perf_counter() - start, done.stdout + done.stderr


def gate(config: str, baseline: str, env: dict) -> dict:
    """Smoke sweep + regress + the report's noisy count, in a fresh output folder."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results"
        cli = [sys.executable, "-m", "visionzip_eval.cli"]
        code, sweep_s, log = run(cli + ["sweep", config, "--output-dir", str(out), "--quiet"], env)
        if code != 0:
            return dict(sweep_s=sweep_s, sweep_exit=code, regress_exit=None, summary=log.strip().splitlines()[-3:])
        code, _, log = run(cli + ["regress", str(out), "--baseline", baseline, "--only-failures"], env)
        summary = [line for line in log.splitlines() if line.startswith("regress ")]
        failed = [line for line in log.splitlines() if line.startswith("FAIL")]
        from visionzip_eval.report.collect import load_results

        runs = load_results(out).runs
        return dict(sweep_s=sweep_s, sweep_exit=0, regress_exit=code, summary=summary, failed=failed[:10],
                    noisy=int(runs["noisy"].sum()), runs=len(runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--baseline", default="baselines/cpu_smoke.json")
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 2, help="busy processes (one per core)")
    parser.add_argument("--skip-quiet", action="store_true", help="only the loaded condition")
    parser.add_argument("--command", help="time this shell command under load instead of sweep + regress")
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

    stop_at = time.time() + 6 * 3600  # ended below; the bound only guards against a crash
    burners = [multiprocessing.Process(target=burn, args=(stop_at,), daemon=True) for _ in range(args.burners)]
    for process in burners:
        process.start()
    try:
        if args.command:
            code, seconds, log = run(shlex.split(args.command), env, cwd=Path.cwd())  # e.g. a clean clone
            lines = [line for line in log.splitlines() if not line.startswith("WARNING: Location")]  # pip's noise
            print("\n".join(lines[-80:]))
            print(f"loaded ({args.burners} burners): `{args.command}` exit {code} in {seconds:.0f} s")
            return code
        loaded = gate(args.config, args.baseline, env)
    finally:
        for process in burners:
            process.terminate()
            process.join()
    print(f"loaded ({args.burners} busy processes): {loaded}")
    if not args.skip_quiet:
        print(f"quiet: {gate(args.config, args.baseline, env)}")
    return 0 if loaded.get("regress_exit") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
