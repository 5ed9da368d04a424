"""The tiny trained model served by vLLM (the embeds route) against the transformers engine.

Runs in the vLLM environment: ``.venv-vllm/bin/python -m pytest -q tests/test_serving_vllm.py``
(``scripts/setup_vllm.sh`` builds it). Elsewhere it skips, naming why; with
``VISIONZIP_REQUIRE_VLLM=1`` (set by ``.ci/run``) a missing vLLM fails instead. One vLLM engine is
shared by the module (it loads in ~17 s here): reducers switch on its encoder, the LLM is the same.
"""

from __future__ import annotations

import os

import pytest
import torch

from visionzip_eval.serving.served import vllm_unavailable

_REASON = vllm_unavailable()
if _REASON and os.environ.get("VISIONZIP_REQUIRE_VLLM") == "1":
    raise RuntimeError(f"VISIONZIP_REQUIRE_VLLM=1 but {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

from visionzip_eval.engine import Engine, Generation, Request  # noqa: E402
from visionzip_eval.methods.base import NoReduction  # noqa: E402
from visionzip_eval.methods.registry import MethodSpec, list_methods  # noqa: E402

TINY = "builtin:tiny-llava-synth"
QUESTIONS_PER_BENCH = 10  # pope (yes/no) and gqa (a word): 20 questions per method and budget
GREEDY = Generation(max_new_tokens=8)


@pytest.fixture(scope="module")
def engines():
    from visionzip_eval.loading import load_pretrained
    from visionzip_eval.serving.served import ServedEngine

    served_model, processor = load_pretrained(TINY, torch.float32, torch.device("cpu"))
    served = ServedEngine.load(served_model, processor, NoReduction(), TINY, max_num_seqs=8)
    reference_model, reference_processor = load_pretrained(TINY, torch.float32, torch.device("cpu"))
    reference = Engine(reference_model, reference_processor, NoReduction())
    return served, reference


@pytest.fixture(scope="module")
def questions():
    from visionzip_eval.synth.benchmark import build_docs
    from visionzip_eval.synth.model import doc_prompt
    from visionzip_eval.synth.scenes import render

    out = []
    for bench in ("pope", "gqa"):
        docs, scenes = build_docs(bench, n_scenes=QUESTIONS_PER_BENCH)
        for doc in docs[:QUESTIONS_PER_BENCH]:
            image = render(scenes[doc["_scene"]])[0]
            out.append((Request(turns=[(doc_prompt(bench, doc), None)], images=[image]), str(doc["answer"])))
    return out


def _correct(text: str, answer: str) -> bool:
    return text.strip().lower().rstrip(".") == answer.strip().lower()


@pytest.mark.parametrize("budget", ["full", 64])
def test_placeholders_follow_the_rows(engines, budget):
    served, _ = engines
    served.set_reducer(MethodSpec.parse("visionzip").build(budget))
    request = Request(turns=[("What is in the picture?", None)], images=[_image()])
    metrics = served.generate([request], Generation(max_new_tokens=2))[0].metrics
    expected = 576 if budget == "full" else 64
    assert metrics["visual_rows"] == metrics["visual_tokens"] == expected
    assert metrics["ttft_ms"] > 0 and metrics["total_ms"] >= metrics["ttft_ms"]


METHODS = ["none"] + [info.name for info in list_methods("pre-llm")]


@pytest.mark.parametrize("method", METHODS)
def test_greedy_answers_match_the_transformers_engine(engines, questions, method):
    """>= 95% equal answers per method and budget (fp32), accuracy within 1 point."""
    served, reference = engines
    budget = "full" if method == "none" else 64
    # one reducer each: the random baseline draws anew per call from its own seeded generator
    served.set_reducer(MethodSpec.parse(method).build(budget, seed=0))
    reference.set_reducer(MethodSpec.parse(method).build(budget, seed=0))
    requests = [r for r, _ in questions]
    ours = [o.text for o in served.generate(requests, GREEDY)]
    theirs = [reference.generate([r], GREEDY)[0].text for r in requests]
    same = sum(a == b for a, b in zip(ours, theirs)) / len(requests)
    assert same >= 0.95, list(zip(ours, theirs))
    score = lambda texts: 100 * sum(_correct(t, a) for t, (_, a) in zip(texts, questions)) / len(questions)  # noqa: E731
    assert abs(score(ours) - score(theirs)) <= 1.0


@pytest.mark.parametrize("method", ["visionzip", "divprune"])
def test_the_tiny_trained_model_served_at_64_answers_as_transformers_does(engines, questions, method):
    served, reference = engines
    reducer = MethodSpec.parse(method).build(64)
    served.set_reducer(reducer)
    reference.set_reducer(reducer)
    requests = [r for r, _ in questions[:8]]
    outputs = served.generate(requests, GREEDY)
    assert [o.metrics["visual_tokens"] for o in outputs] == [64] * 8
    assert [o.text for o in outputs] == [reference.generate([r], GREEDY)[0].text for r in requests]


def _image():
    from visionzip_eval.serving.bench import request_image

    return request_image(0)
