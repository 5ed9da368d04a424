"""VisionZip on a tiny Qwen2.5-VL with the real architecture (14 px patches, 112 px attention
windows with full-attention blocks, 2x2 PatchMerger, M-RoPE Qwen2 LLM).

Documented: visual tokens per image = min(dominant + contextual, t*h*w/4); the score of a merged
token is the attention its 4 patches receive (mean over queries, mean over the 4 patches, summed
over heads) in the last full-attention block; kept tokens keep their original M-RoPE positions.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import generate_requests
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.vision_utils import get_vision_window_index

from visionzip_eval import NoReduction, VisionZip, visionzip_processor
from visionzip_eval.backends import backend_for
from visionzip_eval.loading import load_pretrained
from visionzip_eval.backends.qwen2_5_vl import Qwen2_5_VLBackend
from visionzip_eval import PoolTokens, RandomTokens
from visionzip_eval.lmms.adapter import SAMPLE_ERROR, VisionZipLMM
from visionzip_eval.media import load_visuals
from visionzip_eval.selection import visionzip_select
from visionzip_eval.backends.qwen2_5_vl import build_tiny_qwen2_5_vl
from visionzip_eval.testing import sample_images

VIDEO = Path(__file__).resolve().parents[1] / "tasks/visionzip_smoke/data/videomme/data/vz_red_ball.mp4"


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa")


def photos():
    images = sample_images()
    # astronaut 512x512 -> 16x16 patches (64 merged), coffee -> 12x18 (54), a small one -> 4x4 (4)
    return [images["astronaut"], images["coffee"], images["rocket"].resize((60, 60))]


def prompt(processor, images=1, text="What is shown?"):
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def merged_counts(processor, images):
    grids = processor.image_processor(images, return_tensors="pt")["image_grid_thw"]
    return [int(g.prod()) // 4 for g in grids], grids


def pixels_of(processor, image):
    out = processor.image_processor([image], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"][0]


# -- selection against a plain loop -----------------------------------------------------------


def reference_loop(hidden, scores, keys, dominant, contextual):
    """One token at a time: score = per-head scores summed; the ``dominant`` best kept in raster
    order; the rest merged into strided targets by cosine similarity of keys (target + mean)."""
    x, k = hidden.double(), keys.double()
    n = x.shape[0]
    score = [float(scores[:, j].sum()) for j in range(n)]
    kept = sorted(sorted(range(n), key=lambda j: score[j], reverse=True)[:dominant])
    rest = [j for j in range(n) if j not in set(kept)]
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    unit = [k[j] / k[j].norm() for j in rest]
    members = {t: [] for t in range(len(targets))}
    for i in range(len(rest)):
        if i not in targets:
            sims = [float(unit[i] @ unit[targets[t]]) for t in range(len(targets))]
            members[max(range(len(targets)), key=lambda t: sims[t])].append(rest[i])
    rows = [x[j] for j in kept]
    for t, target in enumerate(targets):
        merged = x[rest[target]].clone()
        if members[t]:
            merged += torch.stack([x[j] for j in members[t]]).mean(0)
        rows.append(merged)
    return torch.stack(rows), kept, [rest[t] for t in targets]


@pytest.mark.parametrize("image_index, dominant, contextual", [(0, 27, 5), (1, 45, 9), (0, 1, 1), (1, 53, 1)])
def test_selection_matches_plain_loop(qwen, image_index, dominant, contextual):
    model, processor = qwen
    backend = backend_for(model)
    pixels, grid = pixels_of(processor, photos()[image_index])
    with torch.no_grad():
        signals = backend.capture(pixels, attention=True, grid_thw=grid)
    merged = int(grid.prod()) // 4
    assert signals.hidden.shape == (1, merged, 4 * model.config.vision_config.hidden_size)
    selection = visionzip_select(signals.hidden, signals.cls_attention, signals.metric, dominant, contextual,
                                 cls_token=False)
    rows, kept, targets = reference_loop(signals.hidden[0], signals.cls_attention[0], signals.metric[0],
                                         dominant, contextual)
    torch.testing.assert_close(selection.tokens[0].double(), rows, atol=1e-5, rtol=1e-5)
    assert selection.dominant_index[0].tolist() == kept
    assert selection.contextual_index[0].tolist() == targets


# -- the signal against an eager tower's attention probabilities --------------------------------


def eager_signal(model, pixels, grid, monkeypatch):
    """The attention probabilities the eager tower computes in the last full-attention block,
    recorded as it runs: per head mean over queries, per merged token mean over its 4 patches,
    raster order. Returns (H, M)."""
    vision = model.config.vision_config
    block = model.model.visual.blocks[max(vision.fullatt_block_indexes)]
    recorded, active = [], []
    original = modeling_qwen2_5_vl.eager_attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, **kwargs)
        if active:
            recorded.append(weights.detach().double())
        return out, weights

    monkeypatch.setattr(modeling_qwen2_5_vl, "eager_attention_forward", recording)
    handles = [block.attn.register_forward_pre_hook(lambda *a: active.append(1)),
               block.attn.register_forward_hook(lambda *a: active.clear())]
    try:
        with torch.no_grad():
            model.model.visual(pixels, grid_thw=grid.reshape(1, 3))
    finally:
        for h in handles:
            h.remove()
    per_patch = torch.cat([w[0].mean(dim=1) for w in recorded], dim=1)  # (H, P), window order
    window_index, _ = get_vision_window_index(grid.reshape(1, 3), 2, vision.window_size, vision.patch_size)
    window_of = {int(r): i for i, r in enumerate(window_index)}
    merged = per_patch.shape[1] // 4
    return torch.stack(
        [per_patch[:, 4 * window_of[r] : 4 * window_of[r] + 4].mean(dim=1) for r in range(merged)], dim=1
    )


@pytest.mark.parametrize("image_index", [0, 1])
def test_signal_equals_eager_attention(qwen, monkeypatch, image_index):
    sdpa_model, processor = qwen
    eager_model, _ = build_tiny_qwen2_5_vl(seed=0, attn_implementation="eager")
    pixels, grid = pixels_of(processor, photos()[image_index])
    reference = eager_signal(eager_model, pixels, grid, monkeypatch)
    for model in (eager_model, sdpa_model):
        with torch.no_grad():
            ours = backend_for(model).capture(pixels, attention=True, grid_thw=grid).cls_attention[0]
        torch.testing.assert_close(ours.double(), reference, atol=1e-4, rtol=1e-4)
    # probabilities averaged over the 4 patches of each merged token: they sum to 1/4 per head
    assert torch.allclose(4 * reference.sum(dim=1), torch.ones(reference.shape[0], dtype=reference.dtype))
    assert reference.sum(dim=0).std() > 1e-3  # not uniform: the comparison means something


def test_full_path_equals_vanilla_features(qwen):
    model, processor = qwen
    inputs = processor.image_processor(photos(), return_tensors="pt")
    with torch.no_grad():
        vanilla = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        with NoReduction()(model):
            ours = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    for a, b in zip(vanilla, ours):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -- generation: counts, positions, restoring -----------------------------------------------


def run_generate(model, processor, images, max_new_tokens=4):
    texts = [prompt(processor) for _ in images]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    captured = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: captured.append((k["inputs_embeds"].detach().clone(), k["position_ids"].detach().clone())),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        hook.remove()
    return inputs, out, captured


@pytest.mark.parametrize("dominant, contextual", [(27, 5), (54, 10)])
def test_generation_feeds_the_documented_rows_and_positions(qwen, dominant, contextual):
    model, processor = qwen
    images = photos()
    counts, grids = merged_counts(processor, images)
    vanilla_inputs, _, vanilla_captured = run_generate(model, processor, images)
    budget = dominant + contextual
    tower_calls = []
    counter = model.model.visual.register_forward_pre_hook(lambda *a: tower_calls.append(1))
    with VisionZip(dominant, contextual)(model):
        visionzip_processor(processor, model)
        inputs, out, captured = run_generate(model, processor, images)
    counter.remove()
    assert len(tower_calls) == len(images)  # encoded once (when generate asked for positions), reused
    visionzip_processor(processor, model)
    image_id = model.config.image_token_id
    want = [min(budget, c) for c in counts]
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == want
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    embeds, positions = captured[0]  # prefill
    assert embeds.shape[:2] == inputs["input_ids"].shape
    # the rows the LLM receives are the reduced image tokens, exactly
    backend = Qwen2_5_VLBackend(model)
    vz = VisionZip(dominant, contextual)
    for row, (image, count, grid) in enumerate(zip(images, counts, grids)):
        mask = inputs["input_ids"][row] == image_id
        pixels, _ = pixels_of(processor, image)
        with torch.no_grad():
            if count > budget:
                signals = backend.capture(pixels, attention=True, grid_thw=grid)
                backend._grid = (int(grid[1]) // 2, int(grid[2]) // 2)
                selection = vz.reduce(signals, backend)
                expected = backend.project(selection.tokens)[0]
                cells = torch.cat([selection.dominant_index[0], selection.contextual_index[0]])
            else:
                expected = backend.project(backend.capture(pixels, attention=False, grid_thw=grid).hidden)[0]
                cells = torch.arange(count)
        torch.testing.assert_close(embeds[row][mask], expected, atol=1e-5, rtol=1e-5)
        # M-RoPE: kept tokens carry their original cell's positions, text after the image is unmoved
        _, v_positions = vanilla_captured[0]
        v_mask = vanilla_inputs["input_ids"][row] == image_id
        torch.testing.assert_close(positions[1:, row][:, mask], v_positions[1:, row][:, v_mask][:, cells])
        after = inputs["attention_mask"][row].bool() & ~mask
        v_after = vanilla_inputs["attention_mask"][row].bool() & ~v_mask
        assert torch.equal(positions[1:, row][:, after], v_positions[1:, row][:, v_after])


def test_videos_are_refused_under_a_reduction(qwen):
    # wrong placeholder counts: tests/test_families.py
    model, processor = qwen
    with VisionZip(27, 5)(model):
        visionzip_processor(processor, model)
        with pytest.raises(ValueError, match="videos"):
            processor(videos=[[photos()[0]] * 2], text=["<|vision_start|><|video_pad|><|vision_end|>hi"],
                      return_tensors="pt")
    visionzip_processor(processor, model)


@pytest.mark.parametrize("reducer", [RandomTokens(32), PoolTokens(32)])
def test_baselines_pass_the_same_counts(qwen, reducer):
    model, processor = qwen
    images = photos()
    counts, _ = merged_counts(processor, images)
    with reducer(model):
        visionzip_processor(processor, model)
        inputs, _, _ = run_generate(model, processor, images, max_new_tokens=2)
    visionzip_processor(processor, model)
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [min(32, c) for c in counts]


def test_backend_geometry_and_flops(qwen):
    model, _ = qwen
    backend = backend_for(model)
    assert isinstance(backend, Qwen2_5_VLBackend)
    assert backend.signal_block == 3 and backend.full_tokens == 256
    assert backend.tokens_for_grid(torch.tensor([1, 16, 16]), 32) == 32
    assert backend.tokens_for_grid(torch.tensor([1, 4, 4]), 32) == 4
    assert backend.vision_flops(64) < backend.vision_flops(256)
    assert set(backend.modules()) == {"vision_tower", "projector", "language_model", "lm_head"}


def test_loads_by_model_type(tmp_path):
    model, processor = build_tiny_qwen2_5_vl(seed=1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_pretrained(str(tmp_path), torch.float32, "cpu")
    assert isinstance(backend_for(loaded), Qwen2_5_VLBackend)
    assert loaded_processor.image_token == "<|image_pad|>"
    built, _ = load_pretrained("builtin:tiny-qwen2.5-vl", torch.float32, "cpu")
    assert isinstance(backend_for(built), Qwen2_5_VLBackend)


def test_tiny_model_is_deterministic_by_seed():
    a, _ = build_tiny_qwen2_5_vl(seed=3)
    b, _ = build_tiny_qwen2_5_vl(seed=3)
    c, _ = build_tiny_qwen2_5_vl(seed=4)
    pa, pb, pc = (dict(m.named_parameters())["model.visual.merger.mlp.0.weight"] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


# -- lmms-eval adapter ------------------------------------------------------------------------


@pytest.mark.parametrize("budget, per_image", [("32", 32), ("64", 64), ("full", None)])
def test_adapter_reports_the_documented_counts(tmp_path, qwen, budget, per_image):
    model, processor = qwen
    astronaut, coffee, small = photos()
    assert VIDEO.is_file()
    docs = [{"visual": astronaut}, {"visual": [coffee, small]}, {"visual": coffee}, {"visual": str(VIDEO)}]
    lm = VisionZipLMM(model=(model, processor), budget=budget, output_dir=str(tmp_path), warmup=0, batch_size=2,
                      max_frames=2)
    lm.task_dict = {"demo": {"test": docs}}
    try:
        results = lm.generate_until(generate_requests([0, 1, 2, 3], key="visual", max_new_tokens=3))
    finally:
        lm.clean()
        lm.engine.close()
    assert all(r.text != SAMPLE_ERROR for r in results)
    rows = {r["doc_id"]: r for r in map(json.loads, (tmp_path / "efficiency.jsonl").read_text().splitlines())}
    (a,), _ = merged_counts(processor, [astronaut])
    (c, s), _ = merged_counts(processor, [coffee, small])

    def n(count):
        return count if per_image is None else min(per_image, count)

    frames, _ = load_visuals([str(VIDEO)], 2)  # a video: its frames as images
    f1, f2 = merged_counts(processor, frames)[0]
    assert {d: rows[d]["visual_tokens"] for d in rows} == {0: n(a), 1: n(c) + n(s), 2: n(c), 3: n(f1) + n(f2)}
    assert {d: rows[d]["vision_units"] for d in rows} == {0: 1, 1: 2, 2: 1, 3: 2}
    assert all(not rows[d]["error"] for d in rows)
    assert "get_rope_index" not in model.model.__dict__


def test_adapter_multi_round_reuses_image_tokens_with_their_positions(tmp_path, qwen):
    model, processor = qwen
    lm = VisionZipLMM(model=(model, processor), budget=32, output_dir=str(tmp_path), warmup=0)
    engine = lm.engine
    try:
        from visionzip_eval.engine import Generation, Request

        image = photos()[0]
        features, _ = engine.encode([image])
        request = Request(turns=[("What is shown?", None)], images=[image])
        reused = engine.generate([request], Generation(max_new_tokens=4), image_features=features)
        fresh = engine.generate([request], Generation(max_new_tokens=4))
    finally:
        lm.clean()
        engine.close()
    assert reused[0].metrics["visual_tokens"] == fresh[0].metrics["visual_tokens"] == 32
    assert reused[0].text == fresh[0].text
