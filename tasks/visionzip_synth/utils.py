"""Hooks of the visionzip_synth_* tasks. The data is generated on first use by
visionzip_eval.synth.benchmark (seeded; cached under the data root); prompts and scoring are
lmms-eval's own, as for the real benchmarks."""

from visionzip_eval.datasets import gqa_process_docs_for
from visionzip_eval.synth.benchmark import ensure_benchmark

gqa_process_docs = gqa_process_docs_for(ensure_benchmark)
