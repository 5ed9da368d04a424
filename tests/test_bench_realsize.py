"""``bench realsize``: LLaVA-1.5-7B's exact shape, its memory and time checks, and the table
(the timing itself on a tiny stand-in: the 7B shape needs 28 GiB in float32)."""

import pytest
import torch

from visionzip_eval import bench
from visionzip_eval.backends import llava_hf
from visionzip_eval.cli import main

CLIP_L_336_VISION = 303_507_456  # openai/clip-vit-large-patch14-336's vision model
LLAMA2_7B = 6_738_415_616  # meta-llama/Llama-2-7b-hf (vocab 32000)


def test_the_shape_has_llava_15_7b_parameter_count():
    total, per_layer, vision = bench._parameter_counts(32)
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    vocab_rows = 2 * (32064 - 32000) * 4096  # llava-hf's vocabulary adds 64 rows to the embedding and head
    assert vision == CLIP_L_336_VISION + projector
    assert total == LLAMA2_7B + vocab_rows + vision == 7_063_427_072
    assert per_layer == 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert bench._parameter_counts(3)[0] == total - 29 * per_layer


def test_check_fits_names_the_largest_layer_count_that_fits():
    free = 20 * 2**30
    with pytest.raises(ValueError, match=r"needs 28\.3 GiB .* 20\.0 GiB is free: pass --layers (\d+)") as error:
        bench.check_fits(32, torch.float32, free)
    largest = int(error.value.args[0].rsplit("--layers ", 1)[1].split()[0])
    assert bench.check_fits(largest, torch.float32, free) <= free
    with pytest.raises(ValueError):
        bench.check_fits(largest + 1, torch.float32, free)
    assert bench.check_fits(32, torch.float16, free) == 7_063_427_072 * 2 + bench.MEMORY_MARGIN_BYTES
    with pytest.raises(ValueError, match="no decoder layer fits"):
        bench.check_fits(32, torch.float32, 2 * 2**30)
    with pytest.raises(ValueError, match="layers must be 1 to 32"):
        llava_hf.llava15_7b_config(33)


def test_refuses_a_run_too_slow_for_the_limit_before_building(monkeypatch, capsys):
    def no_build(*args, **kwargs):
        raise AssertionError("built the model despite the refusal")

    monkeypatch.setattr(llava_hf, "build_llava15_7b_shape", no_build)
    monkeypatch.setattr(bench, "_free_bytes", lambda device: 64 * 2**30)
    assert main(["bench", "realsize", "--layers", "1", "--max-minutes", "0.00001", "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("visionzip-eval: error: at the measured") and "--max-minutes" in error
    assert "\n" not in error


def test_cuda_asked_for_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        bench._resolve("cuda", "auto")
    assert bench._resolve(None, "auto") == (torch.device("cpu"), torch.float32)


def test_rows_carry_roofline_and_kv_cache_on_a_stand_in(monkeypatch):
    monkeypatch.setattr(llava_hf, "build_llava15_7b_shape",
                        lambda layers, dtype, device: llava_hf.build_tiny_llava(seed=0))
    rows, info = bench.bench_realsize(budgets=("full", 64), repeats=1, layers=1, progress=lambda msg: None)
    full, reduced = rows
    assert (full["visual_tokens"], reduced["visual_tokens"]) == (576, 64)
    assert full["prompt_tokens"] - reduced["prompt_tokens"] == 576 - 64
    kv_per_position = 2 * 2 * 2 * 16 * 4  # tiny model: 2 layers, 2 KV heads of 16, float32
    assert full["kv_cache_bytes"] == full["prompt_tokens"] * kv_per_position
    assert reduced["kv_cache_bytes"] == reduced["prompt_tokens"] * kv_per_position
    for row in rows:
        assert row["prefill_roofline_ms"] > 0 and row["prefill_vs_roofline"] > 0
        assert row["ttft_roofline_ms"] > row["prefill_roofline_ms"]
    assert full["roofline_predicted_speedup"] == 1.0 and reduced["roofline_predicted_speedup"] > 1.0
    assert info["dtype"] == "float32" and info["device"] == "cpu" and "probe" in info["roofline_device"]
    table = bench.format_realsize(rows, info)
    assert "1 of its 32 decoder layers" in table and "| visionzip | 64 | 64 / 64 |" in table
    assert "process's peak RSS" in table


def test_batched_rows_report_requests_per_second_per_batch_size(monkeypatch):
    monkeypatch.setattr(llava_hf, "build_llava15_7b_shape",
                        lambda layers, dtype, device: llava_hf.build_tiny_llava(seed=0))
    rows, info = bench.bench_realsize(budgets=("full", 64), repeats=1, layers=1, progress=lambda msg: None,
                                      batches=(1, 2))
    assert [(r["batch"], r["budget"]) for r in rows] == [(1, "full"), (1, "64"), (2, "full"), (2, "64")]
    for row in rows:
        assert row["requests_per_s"] == pytest.approx(row["batch"] / (row["ttft_ms"] / 1e3))
    assert rows[0]["requests_per_s_speedup"] == rows[2]["requests_per_s_speedup"] == 1.0
    # the batch's KV cache is the batch's; the roofline reads the weights once for the batch
    assert rows[2]["kv_cache_bytes"] == 2 * rows[0]["kv_cache_bytes"]
    assert rows[0]["prefill_roofline_ms"] < rows[2]["prefill_roofline_ms"] <= 2 * rows[0]["prefill_roofline_ms"] * (1 + 1e-9)
    assert "| 2 | " in bench.format_realsize(rows, info)
    with pytest.raises(ValueError, match="batch sizes must be integers >= 1"):
        bench.bench_realsize(batches=(0,), progress=lambda msg: None)
