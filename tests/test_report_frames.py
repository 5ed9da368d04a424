"""The frames-vs-cost table: runs at several max_frames, measured TTFT and FLOPs per (frames,
budget), and the roofline-predicted GPU time of LLaVA-1.5-7B and LLaVA-OneVision-7B beside them."""

import pytest
import yaml

from visionzip_eval import records, roofline
from visionzip_eval.cli import main
from visionzip_eval.profiling import DecoderShape, prefill_flops
from visionzip_eval.report import load_results, write_report
from visionzip_eval.report.frames import PREDICTION_DEVICE, frames_tables, predicted_ttft_ms, reference_model
from synthetic import prefill_ms, write_run

PER_FRAME = {"full": 196, "64": 64}


def _runs(root, frame_counts=(8, 16, 32), pretrained="builtin:tiny-llava-onevision"):
    runs = root / "runs"
    for frames in frame_counts:
        for method, budget in (("none", "full"), ("visionzip", "64")):
            model = f"tiny-{frames}f"
            folder = write_run(runs, model, pretrained, method, budget, "smoke_videomme",
                               {"videomme_perception_score": 40.0}, tokens=frames * PER_FRAME[budget])
            config_path = folder / records.CONFIG_YAML
            config = yaml.safe_load(config_path.read_text())
            config["model"]["args"] = {"max_frames": frames}
            config_path.write_text(yaml.safe_dump(config))
    return root


def test_reference_models_have_the_checkpoints_shapes():
    llava, _ = reference_model("LLaVA-1.5-7B")
    assert (llava.layers, llava.hidden, llava.kv_heads, llava.vocab, llava.dtype) == (32, 4096, 32, 32064, "float16")
    assert llava.decoder_weight_bytes == 2 * (32 * 202_383_360 + 4096)
    onevision, backend = reference_model("LLaVA-OneVision-7B")
    assert (onevision.layers, onevision.hidden, onevision.kv_heads, onevision.head_dim) == (28, 3584, 4, 128)
    assert onevision.accelerator == PREDICTION_DEVICE and roofline.device_for(PREDICTION_DEVICE) is not None
    assert backend.config.vision_config.hidden_size == 1152


def test_predicted_ttft_is_the_roofline_of_the_request_it_describes():
    facts, backend = reference_model("LLaVA-OneVision-7B")
    prompt = 30 + 16 * 196 + 1  # text, 16 pooled frames, one newline
    shape = DecoderShape.from_config(backend.config.text_config)
    expected = roofline.request_bound(facts, roofline.device_for(PREDICTION_DEVICE), prefill_flops(shape, prompt),
                                      prompt, 16 * backend.vision_flops(196)).ttft_ms
    assert predicted_ttft_ms("LLaVA-OneVision-7B", 16, "full", 30) == pytest.approx(expected)
    for name in ("LLaVA-1.5-7B", "LLaVA-OneVision-7B"):
        times = [predicted_ttft_ms(name, frames, "full", 30) for frames in (8, 16, 32)]
        assert times == sorted(times) and times[0] > 0
        assert predicted_ttft_ms(name, 32, "64", 30) < predicted_ttft_ms(name, 32, "full", 30)


def test_frames_table_rows_speedups_and_the_claim_note(tmp_path):
    blocks = frames_tables(load_results(_runs(tmp_path / "sweep")))
    assert len(blocks) == 1
    block = blocks[0]
    frame = block.frame
    assert list(zip(frame["frames"], frame["budget"])) == [
        (8, "full"), (8, "64"), (16, "full"), (16, "64"), (32, "full"), (32, "64")]
    assert list(frame["visual_tokens"]) == [8 * 196, 8 * 64, 16 * 196, 16 * 64, 32 * 196, 32 * 64]
    anchor = frame[(frame["frames"] == 16) & (frame["budget"] == "full")].iloc[0]
    assert anchor["ttft_speedup"] == 1.0 and anchor["LLaVA-1.5-7B_speedup"] == 1.0
    claim = frame[(frame["frames"] == 32) & (frame["budget"] == "64")].iloc[0]
    # the synthetic runs' TTFT: prefill_ms(tokens) + i + 16 over measured requests i = 2..6 (median i = 4)
    ttft = lambda tokens: prefill_ms(tokens) + 4 + 16.0  # noqa: E731
    assert claim["ttft_ms"] == pytest.approx(ttft(32 * 64))
    assert claim["ttft_speedup"] == pytest.approx(ttft(16 * 196) / ttft(32 * 64))
    text = claim["text_tokens"]
    assert claim["LLaVA-1.5-7B_ms"] == pytest.approx(predicted_ttft_ms("LLaVA-1.5-7B", 32, "64", text))
    assert claim["LLaVA-OneVision-7B_speedup"] == pytest.approx(
        predicted_ttft_ms("LLaVA-OneVision-7B", 16, "full", text) / predicted_ttft_ms("LLaVA-OneVision-7B", 32, "64", text))
    assert claim["label"] == "VisionZip 64" and claim["group"] == "32 frames"
    note = block.notes[-1]
    assert note.startswith("The seed's claim, VisionZip 64 at 32 frames") and f"measured {claim['ttft_speedup']:.2f}×" in note


def test_report_writes_and_prints_the_frames_table_only_when_frames_vary(tmp_path, capsys):
    root = _runs(tmp_path / "sweep")
    report = write_report(root, plots=False)
    assert (root / "report" / "frames.md").is_file() and (root / "report" / "frames.csv").is_file()
    assert "frames vs. cost" in report.frames_table
    assert main(["report", str(root), "--no-plots"]) == 0
    assert "vs full@16 (LLaVA-OneVision-7B, predicted)" in capsys.readouterr().out
    single = _runs(tmp_path / "single", frame_counts=(8,))
    assert frames_tables(load_results(single)) == []
    assert not (single / "report" / "frames.md").exists() and write_report(single, plots=False).frames_table == ""
