#!/usr/bin/env python
"""Wall time of a sweep (model loaded once, runs in one process) against the same runs as
separate `python -m lmms_eval` processes (what a shell loop over budgets and tasks does).

    .venv/bin/python scripts/bench_sweep.py [--config configs/smoke.yaml]

Prints both wall times and their ratio. Uses the tiny model saved to a temporary folder for
the separate processes (they cannot share the in-memory builtin model).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "smoke.yaml"))
    args = parser.parse_args()

    from visionzip_eval.sweep import load_config, plan
    from visionzip_eval.backends.llava_hf import save_tiny_llava

    config = load_config(args.config)
    runs = plan(config)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "visionzip_eval.cli", "sweep", args.config, "--output-dir", str(tmp / "sweep"), "--quiet"],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        sweep_s = time.perf_counter() - start

        model_dir = save_tiny_llava(tmp / "tiny")
        start = time.perf_counter()
        for index, run in enumerate(runs):
            method = ",".join([f"method={run.method.name}"] + [f"{k}={v}" for k, v in run.method.options])
            command = [
                sys.executable, "-m", "lmms_eval", "--model", "visionzip",
                "--model_args", f"pretrained={model_dir},budget={run.budget.label},{method},dtype=float32",
                "--tasks", run.task, "--include_path", config.include_path,
                "--output_path", str(tmp / "separate" / run.id), "--log_samples", "--seed", str(run.seed),
            ]
            if config.lmms_eval.gen_kwargs:
                command += ["--gen_kwargs", config.lmms_eval.gen_kwargs]
            if run.limit is not None:
                command += ["--limit", str(run.limit)]
            print(f"separate process {index + 1}/{len(runs)}: {run.id}", file=sys.stderr, flush=True)
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        separate_s = time.perf_counter() - start
    print(f"runs: {len(runs)}")
    print(f"sweep (one process, model loaded once): {sweep_s:.1f} s")
    print(f"separate python -m lmms_eval processes: {separate_s:.1f} s")
    print(f"ratio separate / sweep: {separate_s / sweep_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
