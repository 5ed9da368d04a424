"""Tiny offline models (saved, reloaded, deterministic) and the thin CLI."""

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from visionzip_eval import VisionZip, visionzip, visionzip_processor
from visionzip_eval.cli import main
from visionzip_eval.backends.llava_hf import build_tiny_llava
from visionzip_eval.testing import sample_images

PROMPT = "USER: <image>\nDescribe it. ASSISTANT:"


def test_tiny_model_is_deterministic_by_seed():
    a, pa = build_tiny_llava(seed=5)
    b, pb = build_tiny_llava(seed=5)
    c, _ = build_tiny_llava(seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert pa.tokenizer.get_vocab() == pb.tokenizer.get_vocab()


def test_tiny_model_has_llava15_geometry(tiny):
    model, processor = tiny
    inputs = processor(images=sample_images()["chelsea"], text=PROMPT, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"])
    assert out.last_hidden_state.shape[1] == 577
    text = "Is there a cat? Yes, a small one."
    assert processor.tokenizer.decode(processor.tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_cli_tiny_model_saves_a_model_that_loads_offline(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "tiny"), "--seed", "4"]) == 0
    assert "saved to" in capsys.readouterr().out
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "tiny").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "tiny")
    reference, _ = build_tiny_llava(seed=4)
    image = sample_images()["astronaut"]
    visionzip(model, 54, 10)
    visionzip_processor(processor, model)
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64
    with torch.no_grad():
        got = model(**inputs).logits
        with VisionZip(54, 10)(reference):
            want = reference(**inputs).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_cli_demo_runs_sweep_report_and_picture(tmp_path, capsys):
    from visionzip_eval.demos.demo import run_demo

    summary, report, pictures = run_demo(
        tmp_path / "demo", progress=False, tasks=["visionzip_synth_pope"], budgets=("full", 64), limit=6
    )
    assert summary.counts["ok"] == 3  # full once, VisionZip and random at 64
    names = {p.name for p in report.paths}
    assert {"table.md", "table.tex", "efficiency.md", "retention.png", "pareto.png"} <= names
    assert "Random" in report.main_table and "VisionZip" in report.main_table
    from PIL import Image

    assert [p.name for p in pictures] == ["selection_synth.png", "selection.png"]
    assert all(Image.open(p).size[0] == 4 * 336 + 3 * 8 for p in pictures)
    # the trained model answers: the full-budget POPE row has a real, non-zero score
    import pandas as pd

    table = pd.read_csv(report.directory / "table.csv")
    assert (table.select_dtypes("number") > 0).any().any()


def test_cli_bad_budget_is_one_line_error(capsys):
    assert main(["demo", "--budgets", "54+0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["visionzip-eval: error: contextual must be >= 1, got 0"]


def test_cli_visualize_writes_a_picture(tmp_path, capsys):
    image = tmp_path / "coffee.png"
    sample_images()["coffee"].save(image)
    out = tmp_path / "sel.png"
    assert main(["visualize", str(image), "--budget", "128,64", "--out", str(out)]) == 0
    from PIL import Image

    from visionzip_eval.demos.visualize import CAPTION_HEIGHT

    assert Image.open(out).size == (3 * 336 + 2 * 8, 336 + CAPTION_HEIGHT)  # two budgets + attention map
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    assert main(["visualize", str(broken)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_cli_bench_tower_tiny_prints_a_row_per_batch(capsys):
    assert main(["bench", "tower", "--tiny", "--batch", "1", "--repeats", "1", "--quiet", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert [r["batch"] for r in rows] == [1]
    assert rows[0]["step_ms"] > 0 and rows[0]["official_tower_ms"] > 0


def test_cli_bench_prefill_tiny_reports_tokens_and_flops_ratio(capsys):
    import json

    assert main(["bench", "prefill", "--tiny", "--budgets", "full", "64", "--repeats", "1", "--quiet", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["visual_tokens"] for r in rows] == [576, 64]
    assert rows[0]["flops_predicted_speedup"] == 1.0 and rows[1]["flops_predicted_speedup"] > 5
    assert rows[1]["prompt_tokens"] == rows[0]["prompt_tokens"] - 512


def test_cli_bench_prefill_compares_in_llm_methods(capsys):
    """fastv enters the LLM with every token and keeps 64 from layer 2 of the 4 on:
    its prefill FLOPs lie between VisionZip's at 64 and the full model's."""
    import json

    sizes = ["bench", "prefill", "--tiny", "--budgets", "full", "64", "--methods", "visionzip", "fastv",
             "--repeats", "1", "--quiet", "--json"]
    assert main(sizes) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"none", "visionzip", "fastv"}
    assert (rows["fastv"]["visual_tokens"], rows["fastv"]["visual_tokens_after_pruning"]) == (576, 64)
    assert rows["fastv"]["prompt_tokens"] == rows["none"]["prompt_tokens"]
    assert 1 < rows["fastv"]["flops_predicted_speedup"] < rows["visionzip"]["flops_predicted_speedup"]
