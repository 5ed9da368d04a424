#!/usr/bin/env bash
# One GPU check for a machine with one CUDA GPU (and, for the real-weight steps, LLaVA-1.5-7B in
# the Hugging Face cache): CUDA-event timing, the allocator's peak, fp16/bf16, flash attention or
# SDPA, fp16 selection parity, bench realsize, and MME + POPE at full and 64 tokens with a
# baselines/gpu_ci.json candidate, within 10 minutes. Without the weights it runs the tiny trained
# model and says so. Summary: results/gpu_check/summary.md (--output-dir to change); --help lists
# the options. Exit: 0 all ran passed, 1 a step failed, 2 nothing could be checked.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# SIGINT at the limit: the step running is cut short; the summary of the steps before it stays.
exec timeout --signal=INT --kill-after=20 600 "$PY" scripts/gpu_check.py "$@"
