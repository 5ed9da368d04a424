"""The roofline: the device table, the bound (values worked out by hand), what a run records for
it, and the report's roofline columns, notes and figure (on synthetic results in the runner's
format, and on a real one-model sweep)."""

import csv
import json
import math
from io import StringIO
from types import SimpleNamespace

import pytest
from PIL import Image

from visionzip_eval import roofline
from visionzip_eval.cli import main
from visionzip_eval.profiling import DecoderShape, prefill_flops
from visionzip_eval.records import RUN_JSON, RunRecord
from visionzip_eval.report import load_results, write_report
from visionzip_eval.report.render import format_value
from synthetic import make_results, prefill_ms
from visionzip_eval.report.tables import efficiency_tables
from visionzip_eval.roofline import Device, ModelFacts, device_for, for_run, request_bound

# -- the device table ------------------------------------------------------------------------------

# (what torch.cuda.get_device_name says, the entry it must get; None: not in the table)
DEVICE_NAMES = [
    ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB"),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 40GB"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB SXM4"),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB PCIe"),
    ("NVIDIA A800-SXM4-80GB", "NVIDIA A800 80GB SXM4"),
    ("NVIDIA A800 80GB PCIe", "NVIDIA A800 80GB PCIe"),
    ("NVIDIA A800-PCIE-40GB", "NVIDIA A800 40GB PCIe"),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL"),
    ("NVIDIA H200", "NVIDIA H200 SXM"),
    ("NVIDIA H200 NVL", "NVIDIA H200 NVL"),
    ("NVIDIA L40S", "NVIDIA L40S"),
    ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"),
    ("NVIDIA L40", None),
    ("NVIDIA L4", None),
    ("Tesla T4", None),
    ("NVIDIA GeForce RTX 4090 D", None),
    ("NVIDIA A800 40GB Active", None),
    ("cpu", None),
]


@pytest.mark.parametrize("name, entry", DEVICE_NAMES)
def test_device_names_pick_their_datasheet_entry(name, entry):
    device = device_for(name)
    assert (device.name if device else None) == entry


def test_every_entry_is_sourced_positive_and_finds_itself():
    figures = {d.name: (d.tflops, d.bandwidth_gbs) for d in roofline.DEVICES}
    assert figures["NVIDIA H100 SXM"] == (989.5, 3350.0)  # 1,979 with sparsity / 2
    assert figures["NVIDIA H200 SXM"] == (989.5, 4800.0)
    assert figures["NVIDIA A100 80GB SXM4"] == (312.0, 2039.0)
    assert figures["NVIDIA L40S"] == (362.05, 864.0)
    assert figures["NVIDIA GeForce RTX 4090"] == (165.2, 1008.0)  # FP32 accumulate, as PyTorch runs it
    for device in roofline.DEVICES:
        assert device.source.startswith("https://") and device.tflops > 0 and device.bandwidth_gbs > 0
        assert device_for(device.name) is device
    assert len({d.name for d in roofline.DEVICES}) == len(roofline.DEVICES)


def test_bad_device_figures_are_one_line_errors():
    with pytest.raises(ValueError, match="peak TFLOP/s must be a positive number"):
        Device("broken", 0.0, 100.0, "hand")
    with pytest.raises(ValueError, match="no usable CPU matmul probe GFLOP/s"):
        roofline.cpu_device(math.nan, 10.0)
    with pytest.raises(ValueError, match="no usable CPU copy probe GB/s"):
        roofline.cpu_device(50.0, -1.0)
    cpu = roofline.cpu_device(50.0, 10.0)
    assert (cpu.tflops, cpu.bandwidth_gbs) == (0.05, 10.0)


# -- the bound, by hand ------------------------------------------------------------------------------

# A decoder of 2 layers, hidden 8, MLP 16, 2 heads of 4, 1 KV head, vocabulary 10, 2 bytes/element.
SHAPE = DecoderShape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10)
FACTS = ModelFacts(accelerator="cpu", dtype="bfloat16", bytes_per_element=2, decoder_weight_bytes=1_000_000,
                   lm_head_weight_bytes=20_000, vision_weight_bytes=500_000,
                   layers=2, hidden=8, kv_heads=1, head_dim=4, vocab=10)
GFLOP_DEVICE = Device("1 GFLOP/s, 1 GB/s", tflops=1e-3, bandwidth_gbs=1.0, source="hand")


def test_bound_of_one_request_by_hand():
    # prefill FLOPs over 10 positions, per layer in MACs: q, o 10*8*4*2*2 = 1280 + k, v 10*8*4*2*1 = 640,
    # scores and AV 2*10*10*2*4 = 1600, MLP 3*10*8*16 = 3840: 7360; x 2 layers = 14720; logits 8*10 = 80;
    # FLOPs = 2 * 14800 = 29600, of which the decoder's 29600 - 2*8*10 = 29440
    flops = prefill_flops(SHAPE, 10)
    assert flops == 29600
    bound = request_bound(FACTS, GFLOP_DEVICE, flops, cached_positions=10, vision_flops=2_000_000)
    assert FACTS.kv_bytes_per_position == 32  # K and V, 2 layers, 1 head of 4, 2 bytes
    # compute 29440 FLOP at 1e9/s = 0.02944 ms; memory 1_000_000 + 10*32 bytes at 1e9 B/s = 1.00032 ms
    assert bound.prefill.compute_ms == pytest.approx(0.02944, rel=1e-12)
    assert bound.prefill.memory_ms == pytest.approx(1.00032, rel=1e-12)
    assert bound.prefill_ms == pytest.approx(1.00032, rel=1e-12) and bound.prefill.bound_by == "memory"
    # TTFT: tower max(2 ms, 0.5 ms) + prefill + head max(160 FLOP -> 0.00016 ms, 20_000 B -> 0.02 ms)
    assert bound.vision.ms == pytest.approx(2.0, rel=1e-12) and bound.vision.bound_by == "compute"
    assert bound.head.ms == pytest.approx(0.02, rel=1e-12)
    assert bound.ttft_ms == pytest.approx(2.0 + 1.00032 + 0.02, rel=1e-12)


def test_bound_compute_side_batch_reuse_and_unknown_vision():
    slow = Device("1 MFLOP/s, 1 GB/s", tflops=1e-6, bandwidth_gbs=1.0, source="hand")
    bound = request_bound(FACTS, slow, 29600, cached_positions=10)
    assert bound.prefill_ms == pytest.approx(29.44, rel=1e-12) and bound.prefill.bound_by == "compute"
    assert math.isnan(bound.ttft_ms)  # vision FLOPs unknown: no TTFT bound
    # a batch of 3 like it: FLOPs and KV x 3, weights once: compute 0.08832 ms, memory 1.00096 ms
    batch = request_bound(FACTS, GFLOP_DEVICE, 29600, cached_positions=10, vision_flops=2_000_000, batch=3)
    assert batch.prefill.compute_ms == pytest.approx(0.08832, rel=1e-12)
    assert batch.prefill.memory_ms == pytest.approx(1.00096, rel=1e-12)
    assert batch.vision.ms == pytest.approx(6.0, rel=1e-12)  # 3 x 2 MFLOP at 1 GFLOP/s
    # image tokens reused from an earlier turn: the tower did not run
    reused = request_bound(FACTS, GFLOP_DEVICE, 29600, cached_positions=10, vision_flops=0)
    assert reused.vision.ms == 0 and reused.ttft_ms == pytest.approx(1.00032 + 0.02, rel=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prefill_flops=-1.0, cached_positions=10), "prefill_flops must be a non-negative number"),
    (dict(prefill_flops=math.nan, cached_positions=10), "prefill_flops must be a non-negative number"),
    (dict(prefill_flops=100.0, cached_positions=None), "cached_positions must be a non-negative number"),
    (dict(prefill_flops=100.0, cached_positions=10, batch=0), "batch must be a positive integer"),
])
def test_bad_request_inputs_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        request_bound(FACTS, GFLOP_DEVICE, **kwargs)


# The worked example: LLaVA-1.5-7B (Llama-2-7B decoder, vocabulary 32064) in fp16, batch 1, H100 SXM.
LLAMA_7B = DecoderShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, vocab=32064)
# decoder weights: 32 x (q, k, v, o 4 x 4096 x 4096 + MLP 3 x 4096 x 11008 + 2 norms x 4096) + final norm 4096
LLAMA_7B_DECODER_BYTES = 2 * (32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096)
LLAVA_7B_H100 = dict(accelerator="NVIDIA H100 80GB HBM3", dtype="float16", bytes_per_element=2,
                     decoder_weight_bytes=LLAMA_7B_DECODER_BYTES, lm_head_weight_bytes=2 * 32064 * 4096,
                     vision_weight_bytes=600_000_000, layers=32, hidden=4096, kv_heads=32, head_dim=128, vocab=32064)


def test_worked_example_llava_7b_on_h100():
    facts, h100 = for_run(LLAVA_7B_H100)
    assert h100.name == "NVIDIA H100 SXM" and LLAMA_7B_DECODER_BYTES == 12_952_543_232
    full, low = prefill_flops(LLAMA_7B, 636), prefill_flops(LLAMA_7B, 124)  # 576 / 64 visual + 60 text
    assert full / 1e12 == pytest.approx(8.45, abs=0.01) and full / low == pytest.approx(5.23, abs=0.01)
    at_full = request_bound(facts, h100, full, 636)
    at_64 = request_bound(facts, h100, low, 124)
    head = 2 * 4096 * 32064
    # full: (8.4498 TFLOP - the head's) at 989.5 TFLOP/s = 8.54 ms, compute-bound
    assert at_full.prefill_ms == pytest.approx((full - head) / 989.5e12 * 1e3, rel=1e-12)
    assert at_full.prefill.bound_by == "compute" and at_full.prefill_ms == pytest.approx(8.54, abs=0.01)
    # 64 tokens: 12.95 GB of weights + 124 x 524,288 B of K/V at 3.35 TB/s = 3.89 ms, memory-bound
    assert at_64.prefill_ms == pytest.approx((LLAMA_7B_DECODER_BYTES + 124 * 524_288) / 3.35e12 * 1e3, rel=1e-12)
    assert at_64.prefill.bound_by == "memory" and at_64.prefill_ms == pytest.approx(3.89, abs=0.01)
    # so at batch 1 the reduction can buy 2.2x, not the 5.2x the FLOPs promise
    assert at_full.prefill_ms / at_64.prefill_ms == pytest.approx(2.20, abs=0.01)


# -- what a run records ------------------------------------------------------------------------------


def test_facts_round_trip_and_bad_records():
    assert ModelFacts.from_record(FACTS.to_record()) == FACTS
    with pytest.raises(ValueError, match="records no roofline facts.*re-run it"):
        ModelFacts.from_record({})
    with pytest.raises(ValueError, match="lacks 'vocab'"):
        ModelFacts.from_record({k: v for k, v in FACTS.to_record().items() if k != "vocab"})
    with pytest.raises(ValueError, match="layers must be a non-negative integer, got -2"):
        ModelFacts.from_record(dict(FACTS.to_record(), layers=-2))
    with pytest.raises(ValueError, match="decoder_weight_bytes must be a non-negative integer, got True"):
        ModelFacts.from_record(dict(FACTS.to_record(), decoder_weight_bytes=True))
    with pytest.raises(ValueError, match="dtype must be a name"):
        ModelFacts.from_record(dict(FACTS.to_record(), dtype=None))


def test_for_run_says_why_a_run_gets_no_bound():
    with pytest.raises(ValueError, match=r"no datasheet figures for 'NVIDIA L4' \(add it to DEVICES"):
        for_run(dict(LLAVA_7B_H100, accelerator="NVIDIA L4"))
    with pytest.raises(ValueError, match="peaks are for float16/bfloat16 and this run is float32"):
        for_run(dict(LLAVA_7B_H100, dtype="float32"))
    with pytest.raises(ValueError, match="no usable CPU matmul probe"):
        for_run(FACTS.to_record())
    facts, cpu = for_run(FACTS.to_record(), 80.0, 12.0)
    assert cpu.name == roofline.CPU_NAME and (cpu.tflops, cpu.bandwidth_gbs) == (0.08, 12.0)


def test_describe_counts_the_weights_each_stage_reads(tiny):
    """Decoder without the embedding table, the head, and only the tower layers that run."""
    from visionzip_eval.backends import backend_for

    model, _ = tiny
    record = roofline.describe(backend_for(model), "cpu")
    text, vision = model.config.text_config, model.config.vision_config
    h, i, L = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    hd = getattr(text, "head_dim", None) or h // heads
    d, m, n, p = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.patch_size
    patches = (vision.image_size // p) ** 2
    run = n + model.config.vision_feature_layer + 1  # the feature layer (-2) is the last one run
    clip_layer = 4 * (d * d + d) + 2 * (2 * d) + (d * m + m) + (m * d + d)  # q k v o, 2 norms, fc1 fc2
    tower = 3 * p * p * d + d + (patches + 1) * d + 2 * d + run * clip_layer + 2 * d  # conv, CLS, positions, 2 norms
    projector = (d * h + h) + (h * h + h)
    assert record == dict(
        accelerator="cpu", dtype="float32", bytes_per_element=4,
        decoder_weight_bytes=4 * (L * (h * hd * (2 * heads + 2 * kv) + 3 * h * i + 2 * h) + h),
        lm_head_weight_bytes=4 * text.vocab_size * h,
        vision_weight_bytes=4 * (tower + projector),
        layers=L, hidden=h, kv_heads=kv, head_dim=hd, vocab=text.vocab_size,
    )
    assert ModelFacts.from_record(record).accelerator == "cpu"


def test_runner_never_fails_a_run_over_the_facts():
    from visionzip_eval.sweep.runner import _roofline_facts

    assert _roofline_facts(SimpleNamespace(engine=SimpleNamespace(backend=object(), device="cpu"))) == {}
    # the record field is optional: run.json without it (older runs) still reads
    assert json.loads(RunRecord(status="ok", run_id="r", identity={}).to_json())["roofline"] == {}


# -- the report --------------------------------------------------------------------------------------


def _add_facts(root, facts: dict, skip_task: str | None = None):
    """Give the synthetic runs' run.json a roofline record, as the runner now writes it."""
    for path in (root / "runs").glob(f"*/{RUN_JSON}"):
        if skip_task and f"__{skip_task}__" in path.parent.name:
            continue
        info = json.loads(path.read_text())
        info["roofline"] = facts
        path.write_text(json.dumps(info))


@pytest.fixture(scope="module")
def h100_results(tmp_path_factory):
    root = make_results(tmp_path_factory.mktemp("roofline") / "sweep")
    _add_facts(root, LLAVA_7B_H100, skip_task="gqa")  # gqa's runs: as recorded before the roofline
    return root


def _block(blocks, title):
    (block,) = [b for b in blocks if b.title == title]
    return block


def test_efficiency_table_roofline_columns_on_h100(h100_results):
    """Synthetic rows: prompt = visual + 60 tokens, prefill FLOPs 7e9 x 2 per token, vision 3.5e11."""
    blocks = efficiency_tables(load_results(h100_results))
    pooled = _block(blocks, "llava-1.5-7b: all image tasks")
    assert [c.header for c in pooled.columns if "oofline" in c.header] == [
        "Prefill roofline ms", "Prefill measured / roofline", "TTFT roofline ms", "TTFT measured / roofline",
        "Roofline speed-up"]
    frame = pooled.frame.set_index(["method", "budget"])
    head = 2 * 4096 * 32064
    kv = 2 * 32 * 32 * 128 * 2  # bytes per cached position
    full_bound = (7e9 * 2 * 636 - head) / 989.5e12 * 1e3  # compute: 8.998 ms
    low_bound = (LLAMA_7B_DECODER_BYTES + 124 * kv) / 3.35e12 * 1e3  # memory: 3.886 ms
    assert frame.loc[("none", "full"), "roofline_p50"] == pytest.approx(full_bound, rel=1e-9)
    assert frame.loc[("visionzip", "64"), "roofline_p50"] == pytest.approx(low_bound, rel=1e-9)
    assert frame.loc[("visionzip", "64"), "bound_by"] == "memory" and frame.loc[("none", "full"), "bound_by"] == "compute"
    # measured: the synthetic prefill of the median measured request (i = 4) over its bound
    assert frame.loc[("visionzip", "64"), "roofline_ratio"] == pytest.approx((prefill_ms(64) + 4) / low_bound, rel=1e-9)
    tower = 3.5e11 / 989.5e12 * 1e3  # compute-bound (600 MB of weights: 0.18 ms)
    lm_head = head / 3.35e12 * 1e3  # memory-bound
    assert frame.loc[("visionzip", "64"), "ttft_roofline_p50"] == pytest.approx(tower + low_bound + lm_head, rel=1e-9)
    assert frame.loc[("visionzip", "64"), "roofline_speedup"] == pytest.approx(full_bound / low_bound, rel=1e-9)
    assert frame.loc[("none", "full"), "roofline_speedup"] == pytest.approx(1.0)
    notes = " ".join(pooled.notes)
    assert "Device: NVIDIA H100 SXM: 989.5 TFLOP/s, 3350 GB/s" in notes and roofline.H100_DATASHEET in notes
    assert "Prefill limited by: compute: Vanilla full" in notes and "memory: " in notes
    # gqa's runs have no facts: dashes, and the reason
    gqa = _block(blocks, "llava-1.5-7b: gqa")
    assert gqa.frame["roofline_p50"].isna().all() and gqa.frame["roofline_speedup"].isna().all()
    assert any(n.startswith("No roofline (–) for Vanilla full, ") and "records no roofline facts" in n
               for n in gqa.notes)


def test_unknown_gpu_and_fp32_get_dashes_and_the_reason(tmp_path):
    root = make_results(tmp_path / "sweep", problems=False)
    _add_facts(root, dict(LLAVA_7B_H100, accelerator="NVIDIA L4"))
    (block, *_) = efficiency_tables(load_results(root))
    assert block.frame["roofline_p50"].isna().all()
    assert any("no datasheet figures for 'NVIDIA L4'" in n for n in block.notes)
    _add_facts(root, dict(LLAVA_7B_H100, dtype="float32"))
    (block, *_) = efficiency_tables(load_results(root))
    assert any("this run is float32" in n for n in block.notes)


def test_report_command_on_cpu_results_shows_the_columns_and_the_figure(tmp_path, capsys):
    """The CPU entry: every run bounded with its own probe (synthetic: 100 GFLOP/s, 10 GB/s)."""
    root = make_results(tmp_path / "sweep", device="cpu")
    _add_facts(root, dict(LLAVA_7B_H100, accelerator="cpu", dtype="float32", bytes_per_element=4))
    assert main(["report", str(root)]) == 0
    report = root / "report"
    markdown = (report / "efficiency.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Method |"))
    assert "| Prefill roofline ms | Prefill measured / roofline | TTFT roofline ms | TTFT measured / roofline |" \
           " Roofline speed-up |" in header
    assert "Device: CPU, each run bounded with the run's own probe in run.json" in markdown
    assert "(100 GFLOP/s, 10 GB/s over these runs)" in markdown
    rows = list(csv.DictReader(StringIO((report / "efficiency.csv").read_text())))
    vz64 = next(r for r in rows if r["scope"] == "all image tasks" and r["method"] == "visionzip" and r["budget"] == "64")
    # fp32 K/V: 4 bytes; compute 1.7357e12 FLOP at 0.1 TFLOP/s = 17357 ms beats 13.0 GB at 10 GB/s
    bound = (7e9 * 2 * 124 - 2 * 4096 * 32064) / 100e9 * 1e3
    assert float(vz64["Prefill roofline ms"]) == pytest.approx(bound, rel=1e-9)
    assert float(vz64["Prefill measured / roofline"]) == pytest.approx((prefill_ms(64) + 4) / bound, rel=1e-9)
    assert "| 17357 | 0.0018× |" in markdown  # ms_sig and ratio formats
    with Image.open(report / "roofline.png") as image:
        assert image.width > 800 and image.height > 300
    assert (report / "roofline.pdf").stat().st_size > 0
    runs = list(csv.DictReader(StringIO((report / "runs.csv").read_text())))
    assert {r["roofline_device"] for r in runs if r["status"] == "ok"} == {
        f"{roofline.CPU_NAME}: 0.1 TFLOP/s, 10 GB/s"}


def test_ratio_and_significant_ms_formats():
    assert format_value(0.00123, "ms_sig") == "0.00123" and format_value(12345.6, "ms_sig") == "12346"
    assert format_value(4.306, "ratio") == "4.31×" and format_value(146.92, "ratio") == "146.9×"
    assert format_value(2345.0, "ratio") == "2345×" and format_value(math.nan, "ratio") == "–"
    assert format_value(0.00175, "ratio") == "0.0018×" and format_value(1.0, "ratio") == "1.00×"


def test_a_real_sweep_records_the_facts_and_the_report_bounds_it(tmp_path):
    """The runner writes run.json's roofline record; the report turns it into numbers (CPU entry)."""
    import yaml

    from visionzip_eval.demos.demo import REPO_TASKS

    config = {
        "name": "roof", "models": [{"name": "tiny", "pretrained": "builtin:tiny-llava", "dtype": "float32"}],
        "methods": ["visionzip"], "budgets": ["full", 64], "tasks": ["visionzip_smoke_pope"],
        "include_path": str(REPO_TASKS), "limit": 3, "output_dir": str(tmp_path / "out"),
        "lmms_eval": {"gen_kwargs": "max_new_tokens=2", "bootstrap_iters": 0, "warmup": 1},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--quiet"]) == 0
    for run in (tmp_path / "out" / "runs").iterdir():
        facts = json.loads((run / RUN_JSON).read_text())["roofline"]
        assert facts["accelerator"] == "cpu" and facts["dtype"] == "float32" and facts["decoder_weight_bytes"] > 0
    report = write_report(tmp_path / "out")
    assert (report.directory / "roofline.png") in report.figures
    (block, *_) = efficiency_tables(load_results(tmp_path / "out"))
    assert block.frame["roofline_p50"].gt(0).all() and block.frame["roofline_ratio"].gt(0).all()
    assert block.frame["ttft_roofline_p50"].gt(block.frame["roofline_p50"]).all()
