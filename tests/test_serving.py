"""The vLLM serving path's CPU-side parts, without vLLM: refusals, key conversion, the bench's
row arithmetic and the sweep/adapter plumbing. Serving through vLLM itself: tests/test_serving_vllm.py
(run with .venv-vllm/bin/python)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from visionzip_eval.methods.registry import list_methods
from visionzip_eval.serving import checkpoint
from visionzip_eval.serving.bench import _speedups, check_shape_fits, percentile, request_image, shape_bytes_needed
from visionzip_eval.serving.served import check_servable


@pytest.mark.parametrize("info", list_methods("pre-llm"), ids=lambda i: i.name)
def test_every_pre_llm_method_is_servable(info):
    assert check_servable(info.name).name == info.name


@pytest.mark.parametrize("info", list_methods("in-llm"), ids=lambda i: i.name)
def test_in_llm_methods_are_refused_in_one_line(info):
    with pytest.raises(ValueError) as caught:
        check_servable(info.name)
    message = str(caught.value)
    assert "\n" not in message and info.name in message and "inside the LLM" in message


def test_bench_serve_refuses_an_in_llm_method_with_exit_2(capsys):
    from visionzip_eval.cli import main

    assert main(["bench", "serve", "--methods", "fastv", "visionzip", "--budgets", "full", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'fastv' prunes inside the LLM" in err


def test_adapter_refuses_an_in_llm_method_and_an_unknown_engine_before_loading():
    from visionzip_eval.lmms.adapter import VisionZipLMM

    with pytest.raises(ValueError, match="'pdrop' prunes inside the LLM"):
        VisionZipLMM(pretrained="does-not-exist", method="pdrop", budget=64, engine="vllm")
    with pytest.raises(ValueError, match="engine must be one of transformers, vllm"):
        VisionZipLMM(pretrained="does-not-exist", budget=64, engine="tgi")


@pytest.mark.parametrize("key, expected", [
    ("vision_tower.encoder.layers.0.mlp.fc1.weight", "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
    ("model.vision_tower.embeddings.class_embedding", "model.vision_tower.vision_model.embeddings.class_embedding"),
    ("vision_tower.vision_model.post_layernorm.bias", "vision_tower.vision_model.post_layernorm.bias"),
    ("language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.layers.0.self_attn.q_proj.weight"),
    ("multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
])
def test_llava_hf_key(key, expected):
    assert checkpoint.llava_hf_key(key) == expected


def test_the_shipped_tiny_model_converts_to_the_llava_hf_layout(tmp_path):
    source = checkpoint.source_folder(checkpoint.SERVABLE_BUILTIN)
    folder = checkpoint.vllm_checkpoint(checkpoint.SERVABLE_BUILTIN, tmp_path / "converted")
    assert folder == tmp_path / "converted"
    with safe_open(str(source / "model.safetensors"), "pt") as old, safe_open(str(folder / "model.safetensors"), "pt") as new:
        assert len(list(new.keys())) == len(list(old.keys())) == 105
        tower = [k for k in new.keys() if "vision_tower" in k]
        assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
        for key in old.keys():
            assert torch.equal(old.get_tensor(key), new.get_tensor(checkpoint.llava_hf_key(key)))
    assert json.loads((folder / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    assert (folder / "tokenizer.json").is_file()
    # already in the hub layout: served as it is, nothing written
    assert checkpoint.vllm_checkpoint(str(folder), tmp_path / "again") == folder
    assert not (tmp_path / "again").exists()


def test_source_folder_refuses_in_memory_builtins_and_missing_folders(tmp_path):
    with pytest.raises(ValueError, match="builtin:tiny-llava-synth or a checkpoint folder"):
        checkpoint.source_folder("builtin:tiny-llava")
    with pytest.raises(ValueError, match="config.json"):
        checkpoint.source_folder(str(tmp_path))


def test_the_7b_shape_refuses_in_one_line_when_memory_is_short():
    needed = shape_bytes_needed()
    assert 15 * 2**30 < needed < 20 * 2**30  # 7.06 B parameters in bfloat16 + margin
    check_shape_fits(needed)
    with pytest.raises(ValueError) as caught:
        check_shape_fits(needed - 1)
    assert "\n" not in str(caught.value) and "GiB" in str(caught.value)


def test_percentile_and_distinct_request_images():
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)
    assert math.isnan(percentile([], 0.5))
    assert request_image(0).tobytes() != request_image(1).tobytes()
    assert request_image(3).tobytes() == request_image(3).tobytes()


def test_speedups_are_against_full_at_the_same_concurrency():
    rows = [
        dict(budget="full", concurrency=1, prefill_tflops=4.0, roofline_batch_prefill_ms=10.0, requests_per_s=1.0, ttft_ms_p50=100.0),
        dict(budget="64", concurrency=1, prefill_tflops=1.0, roofline_batch_prefill_ms=5.0, requests_per_s=3.0, ttft_ms_p50=25.0),
        dict(budget="full", concurrency=8, prefill_tflops=4.0, roofline_batch_prefill_ms=80.0, requests_per_s=2.0, ttft_ms_p50=400.0),
        dict(budget="64", concurrency=8, prefill_tflops=1.0, roofline_batch_prefill_ms=20.0, requests_per_s=7.0, ttft_ms_p50=100.0),
    ]
    _speedups(rows)
    assert [r["flops_predicted_speedup"] for r in rows] == [1.0, 4.0, 1.0, 4.0]
    assert [r["roofline_predicted_speedup"] for r in rows] == [1.0, 2.0, 1.0, 4.0]
    assert [r["rps_speedup"] for r in rows] == [1.0, 3.0, 1.0, 3.5]
    assert [r["ttft_speedup"] for r in rows] == [1.0, 4.0, 1.0, 4.0]


def test_sweep_engine_field_travels_with_the_model_args():
    from visionzip_eval.sweep.config import ModelSpec

    spec = ModelSpec(name="tiny", pretrained="builtin:tiny-llava-synth", engine="vllm")
    assert spec.args["engine"] == "vllm"
    assert "engine" not in ModelSpec(name="tiny", pretrained="builtin:tiny-llava-synth").args
    with pytest.raises(ValueError, match="give it once"):
        ModelSpec(name="tiny", pretrained="x", engine="vllm", args={"engine": "transformers"})
    with pytest.raises(ValueError):
        ModelSpec(name="tiny", pretrained="x", engine="tgi")


def test_serve_json_reads_back_into_a_plot(tmp_path):
    from PIL import Image

    from visionzip_eval.report.serving import plot_serving, read_serve_json

    rows = [dict(method=m, budget=b, concurrency=c, requests_per_s=c / (2.0 if b == "full" else 1.0), visual_tokens=t)
            for m, b, t in (("none", "full", 576), ("visionzip", "64", 64), ("divprune", "64", 64)) for c in (1, 8)]
    (tmp_path / "serve.json").write_text(json.dumps({"rows": rows, "run": {}}))
    path = plot_serving(read_serve_json(tmp_path / "serve.json"), tmp_path / "plot" / "serving.png")
    width, height = Image.open(path).size
    assert width > 2 * height  # two method panels side by side
    (tmp_path / "bad.json").write_text(json.dumps({"rows": [{"method": "x"}]}))
    with pytest.raises(ValueError, match="not bench serve --json output"):
        read_serve_json(tmp_path / "bad.json")


def test_the_7b_shape_folder_names_its_architecture_and_shape(tmp_path):
    folder = checkpoint.shape_checkpoint(tmp_path / "shape")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]  # vLLM's generate runner needs it
    text = config["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"], text["vocab_size"]) == (
        4096, 32, 11008, 32064)
    assert (folder / "tokenizer.json").is_file() and not list(folder.glob("*.safetensors"))
