"""The lmms-eval model adapter, driven with lmms-eval Instances on a tiny model (no evaluator)."""

import json

import pytest
from helpers import doc_visuals, generate_requests
from lmms_eval.api.instance import Instance

from visionzip_eval.lmms.adapter import SAMPLE_ERROR, VisionZipLMM, _cli_output_path
from visionzip_eval.records import EFFICIENCY_FIELDS as FIELDS
from visionzip_eval.backends.llava_hf import build_tiny_llava
from visionzip_eval.testing import sample_images

GEN = {"max_new_tokens": 4, "until": ["\n\n"]}


def make_lm(tmp_path, **kwargs):
    lm = VisionZipLMM(model=build_tiny_llava(seed=0), output_dir=str(tmp_path), warmup=1, **kwargs)
    images = sample_images()
    docs = [{"image": images["astronaut"]}, {"image": b"not an image"}, {"image": images["coffee"]},
            {"image": [images["rocket"], images["chelsea"]]}]
    lm.task_dict = {"demo": {"test": docs}}
    return lm


def rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "efficiency.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("budget, per_image", [("64", 64), ("128", 128), ("50+14", 64), ("full", 576)])
@pytest.mark.parametrize("method", ["visionzip", "random", "pool"])
def test_visual_tokens_per_request(tmp_path, budget, per_image, method):
    lm = make_lm(tmp_path, budget=budget, method=method)
    results = lm.generate_until(generate_requests([0, 2, 3]))
    lm.clean()
    assert [r.text != SAMPLE_ERROR for r in results] == [True, True, True]
    got = {r["doc_id"]: r for r in rows(tmp_path)}
    assert {d: got[d]["visual_tokens"] for d in got} == {0: per_image, 2: per_image, 3: 2 * per_image}
    for result, doc in zip(results, (0, 2, 3)):
        assert result.token_counts.input_tokens == got[doc]["prompt_tokens"]
        assert result.token_counts.output_tokens == got[doc]["generated_tokens"] <= 4
        assert got[doc]["prompt_tokens"] > got[doc]["visual_tokens"]


def test_efficiency_rows_are_complete(tmp_path):
    lm = make_lm(tmp_path, budget=64, batch_size=2)
    lm.generate_until(generate_requests([0, 1, 2, 3]))
    lm.clean()
    table = rows(tmp_path)
    assert len(table) == 4 and all(set(FIELDS) <= set(r) for r in table)
    ok = [r for r in table if r["error"] is None]
    assert [r["warmup"] for r in sorted(ok, key=lambda r: r["doc_id"])].count(True) == 1
    for r in ok:
        assert r["method"] == "visionzip" and r["budget"] == "64" and r["device"] == "cpu"
        assert r["attn_implementation"] == "sdpa"
        for key in ("vision_ms", "prefill_ms", "ttft_ms", "total_ms"):
            assert r[key] > 0, key
        assert r["decode_ms"] >= 0 and r["ttft_ms"] <= r["total_ms"]
        assert r["vision_ms"] + r["prefill_ms"] <= r["ttft_ms"] + 1e-6
        assert r["peak_memory_bytes"] > 0 and r["peak_memory_kind"] == "process_peak_rss"
        assert r["prefill_flops"] > 0 and r["vision_flops"] > 0


def test_broken_image_costs_one_sample(tmp_path):
    lm = make_lm(tmp_path, budget=64, batch_size=4)
    results = lm.generate_until(generate_requests([0, 1, 2]))
    lm.clean()
    assert [r.text == SAMPLE_ERROR for r in results] == [False, True, False]
    errors = {r["doc_id"]: r["error"] for r in rows(tmp_path)}
    assert errors[0] is None and errors[2] is None and errors[1].startswith("broken image")


def test_full_prefill_flops_exceed_reduced(tmp_path):
    full = make_lm(tmp_path / "full", budget="full")
    small = make_lm(tmp_path / "small", budget=64)
    full.generate_until(generate_requests([0]))
    small.generate_until(generate_requests([0]))
    assert rows(tmp_path / "full")[0]["prefill_flops"] > 5 * rows(tmp_path / "small")[0]["prefill_flops"]


def test_multi_round_reuses_the_image_tokens(tmp_path):
    lm = make_lm(tmp_path, budget=64)

    def next_turn(doc, previous_output, round_idx, previous_round_info):
        done = round_idx >= 3
        return None, f"And now, question {round_idx}?", done, previous_output, previous_round_info

    request = Instance(
        "generate_until_multi_round",
        ("What is shown?", dict(GEN), doc_visuals("image"), next_turn, 0, "demo", "test"), 0,
        {"task": "demo", "doc_id": 0, "repeats": 1},
    )
    before = lm.engine.vision_calls
    replies = lm.generate_until_multi_round([request])[0]
    assert len(replies) == 3
    assert lm.engine.vision_calls - before == 1  # the tower ran once for three turns
    table = rows(tmp_path)
    assert [r["round"] for r in table] == [0, 1, 2]
    assert [r["image_tokens_reused"] for r in table] == [False, True, True]
    assert table[0]["vision_ms"] > 0 and table[1]["vision_ms"] == table[2]["vision_ms"] == 0
    assert all(r["visual_tokens"] == 64 for r in table)
    assert table[0]["prompt_tokens"] < table[1]["prompt_tokens"] < table[2]["prompt_tokens"]


def test_multi_round_answers_equal_a_fresh_encode(tmp_path):
    """Reusing cached image tokens changes nothing in the answer."""
    lm = make_lm(tmp_path, budget=64)
    image = sample_images()["astronaut"]
    from visionzip_eval.engine import Generation, Request

    settings = Generation(max_new_tokens=6)
    turns = [("What is shown?", "a person"), ("Where?", None)]
    fresh = lm.engine.generate([Request(turns=turns, images=[image])], settings)[0].text
    features, _ = lm.engine.encode([image])
    cached = lm.engine.generate([Request(turns=turns, images=[image])], settings, image_features=features)[0].text
    assert fresh == cached


def test_bad_model_args_are_refused():
    with pytest.raises(ValueError, match="method 'visionzip' has no option budgett: its options are merge .*"
                       "the adapter's own model_args are pretrained, budget"):
        VisionZipLMM(model=build_tiny_llava(), budgett=64)
    with pytest.raises(ValueError, match="method 'vispruner' has no option merge: its options are important_ratio"):
        VisionZipLMM(model=build_tiny_llava(), method="vispruner", merge="average")
    with pytest.raises(ValueError, match="unknown method 'fastvv'"):
        VisionZipLMM(model=build_tiny_llava(), method="fastvv")
    with pytest.raises(ValueError, match=r"fastv: pruning layers \(2,\) do not fit a 2-layer LLM"):
        VisionZipLMM(model=build_tiny_llava(), method="fastv", budget=64)
    with pytest.raises(ValueError, match="contextual must be >= 1"):
        VisionZipLMM(model=build_tiny_llava(), budget="54+0")
    with pytest.raises(ValueError, match="either budget or dominant"):
        VisionZipLMM(model=build_tiny_llava(), budget=64, dominant=54, contextual=10)


def test_dominant_contextual_args(tmp_path):
    lm = make_lm(tmp_path, dominant=30, contextual=2)
    assert lm.engine.tokens_per_image == 32 and lm.budget.label == "30+2"


def test_output_path_is_read_from_the_lmms_eval_command_line():
    assert _cli_output_path(["--model", "visionzip", "--output_path", "OUT", "--limit", "2"]) == "OUT"
    assert _cli_output_path(["--model", "visionzip"]) is None


def test_registered_through_the_entry_point():
    from lmms_eval.models import get_model

    assert get_model("visionzip") is VisionZipLMM
