"""VisionZip on a tiny LLaVA-OneVision with the real architecture (SigLIP 384/14 without CLS,
AnyRes images, videos, Qwen2).

Documented counts: a one-image prompt's image of ``1 + crops`` units receives
``(1 + crops) * (dominant + contextual)`` rows; each image of a multi-image prompt
``dominant + contextual``; a video of F frames ``F * (dominant + contextual)``; no newlines.
"""

import json
from pathlib import Path

import pytest
import torch
from lmms_eval.api.instance import Instance

from visionzip_eval import (
    NoReduction,
    VisionZip,
    applied_reducer,
    remove_reduction,
    visionzip,
    visionzip_processor,
)
from visionzip_eval.backends import backend_for
from visionzip_eval.loading import load_pretrained
from visionzip_eval.backends.llava_onevision import LlavaOnevisionBackend
from visionzip_eval.lmms.adapter import SAMPLE_ERROR, VisionZipLMM
from visionzip_eval.selection import received_attention, visionzip_select
from visionzip_eval.backends.llava_onevision import build_tiny_llava_onevision
from visionzip_eval.testing import sample_images
from helpers import generate_requests, hooks, llm_input_embeddings

VIDEO = Path(__file__).resolve().parents[1] / "tasks/visionzip_smoke/data/videomme/data/vz_red_ball.mp4"


def prompt(images=1, videos=0):
    return f"<|im_start|>user {'<image>' * images}{'<video>' * videos}\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ov_tiny():
    return build_tiny_llava_onevision(seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def ov_eager():
    return build_tiny_llava_onevision(seed=0, attn_implementation="eager")


def frames(count=4, size=(320, 240)):
    photos = list(sample_images().values())
    return [photos[i % len(photos)].resize(size) for i in range(count)]


# -- no-CLS scoring and selection against plain loops ---------------------------------------


def reference_no_cls(hidden, attention_map, metric, dominant, contextual):
    """One image at a time, one token at a time: each token's score is the attention it receives,
    averaged over all queries and summed over heads; the ``dominant`` best tokens are kept (no CLS
    kept unconditionally), then the usual contextual merge. Returns the rows and, per row, the
    position it was taken from (-1 for a contextual merge)."""
    out_rows, out_positions = [], []
    for b in range(hidden.shape[0]):
        x, keys, a = hidden[b].double(), metric[b].double(), attention_map[b].double()
        heads, queries, n = a.shape[0], a.shape[1], x.shape[0]
        score = [sum(sum(float(a[h, i, j]) for i in range(queries)) / queries for h in range(heads)) for j in range(n)]
        kept = sorted(sorted(range(n), key=lambda j: score[j], reverse=True)[:dominant])
        rest = [j for j in range(n) if j not in set(kept)]
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        unit = [keys[j] / keys[j].norm() for j in rest]
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
        out_rows.append(torch.stack(rows))
        out_positions.append(kept + [-1] * contextual)
    return torch.stack(out_rows), out_positions


def random_map(batch, tokens, dim=16, heads=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, tokens, dim, generator=g)
    attention_map = torch.randn(batch, heads, tokens, tokens, generator=g).softmax(-1)
    metric = torch.randn(batch, tokens, dim // heads, generator=g)
    return hidden, attention_map, metric


@pytest.mark.parametrize(
    "batch, tokens, dominant, contextual",
    [(1, 729, 54, 10), (2, 729, 108, 20), (1, 729, 1, 1), (1, 729, 728, 1), (3, 50, 7, 5), (2, 60, 27, 5)],
)
def test_no_cls_selection_matches_plain_loop(batch, tokens, dominant, contextual):
    hidden, attention_map, metric = random_map(batch, tokens, seed=dominant + contextual)
    if tokens > 100:  # the loop reference is O(N^2) in Python: 3 queries stand for all of them
        attention_map = attention_map[:, :, :3]
    got = visionzip_select(hidden, attention_map.mean(2), metric, dominant, contextual, cls_token=False)
    want, positions = reference_no_cls(hidden, attention_map, metric, dominant, contextual)
    assert got.tokens.shape == (batch, dominant + contextual, hidden.shape[-1])
    torch.testing.assert_close(got.tokens.double(), want, atol=1e-5, rtol=1e-5)
    assert got.dominant_index.tolist() == [p[:dominant] for p in positions]


@pytest.mark.parametrize("max_elements", [1 << 24, 4 * 2 * 40 * 7, 1])
def test_received_attention_is_the_column_mean_of_the_full_map(max_elements):
    g = torch.Generator().manual_seed(11)
    batch, tokens, heads, dim = 2, 40, 4, 32
    q = torch.randn(batch, tokens, dim, generator=g)
    k = torch.randn(batch, tokens, dim, generator=g)
    qh = q.view(batch, tokens, heads, -1).transpose(1, 2)
    kh = k.view(batch, tokens, heads, -1).transpose(1, 2)
    full = ((qh @ kh.transpose(-1, -2)) * (dim // heads) ** -0.5).softmax(-1)  # (B, H, N, N)
    got = received_attention(q, k, heads, max_elements=max_elements)
    torch.testing.assert_close(got, full.mean(2))
    assert torch.allclose(got.sum(-1), torch.ones(batch, heads))  # each query row sums to 1
    assert received_attention(q.half(), k.half(), heads).dtype == torch.float32


# -- the model ----------------------------------------------------------------------------


def reference_encode(model, pixel_values, dominant, contextual):
    """VisionZip per unit from an eager tower run with output_attentions=True: the full
    attention map of the feature layer (the last) averaged over queries, keys recomputed from
    that layer's input, its output hidden states."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    layer_index = len(tower.encoder.layers) - 1  # vision_feature_layer = -1
    layer = tower.encoder.layers[layer_index]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[layer_index]))
    b, n, _ = keys.shape
    metric = keys.view(b, n, layer.self_attn.num_heads, -1).mean(2)
    scores = out.attentions[layer_index].mean(2)  # (B, H, N): mean over the queries
    selection = visionzip_select(out.hidden_states[-1], scores, metric, dominant, contextual, cls_token=False)
    return model.model.multi_modal_projector(selection.tokens), selection


@pytest.mark.parametrize("dominant, contextual", [(54, 10), (108, 20), (162, 30)])
def test_encode_sdpa_and_eager_equal_reference(ov_tiny, ov_eager, dominant, contextual):
    inputs = ov_tiny[1].image_processor(sample_images()["chelsea"], return_tensors="pt")
    pixels = inputs["pixel_values"][0]
    assert pixels.shape[0] == 3  # base + 1x2 crops
    vz = VisionZip(dominant, contextual)
    with torch.no_grad():
        want, selection = reference_encode(ov_eager[0], pixels, dominant, contextual)
        sdpa = vz.encode_images(ov_tiny[0], pixels)
        eager = vz.encode_images(ov_eager[0], pixels)
        ours = vz.select(ov_tiny[0], pixels)
    assert sdpa.shape == (3, dominant + contextual, ov_tiny[0].config.text_config.hidden_size)
    assert (sdpa - want).abs().max() < 1e-4
    assert (eager - want).abs().max() < 1e-4
    assert torch.equal(ours.dominant_index, selection.dominant_index)  # no CLS forced in: patch 0 only if earned


def test_full_path_equals_vanilla_features(ov_tiny):
    model, processor = ov_tiny
    photos = sample_images()
    inputs = processor.image_processor([[photos["astronaut"]], [photos["rocket"], photos["chelsea"]]], return_tensors="pt")
    videos = processor.video_processor([frames(3)], return_tensors="pt")["pixel_values_videos"]
    with torch.no_grad():
        vanilla = model.model.get_image_features(**inputs).pooler_output
        vanilla_video = model.model.get_video_features(pixel_values_videos=videos).pooler_output
        with NoReduction()(model):
            ours = model.model.get_image_features(**inputs).pooler_output
            ours_video = model.model.get_video_features(pixel_values_videos=videos).pooler_output
    assert [len(v) for v in ours] == [len(v) for v in vanilla] == [3699, 730, 730]
    assert all(torch.equal(a, b) for a, b in zip(ours, vanilla))
    assert ours_video.shape == vanilla_video.shape == (1, 3 * 196 + 1, model.config.text_config.hidden_size)
    assert torch.equal(ours_video, vanilla_video)


def stitched_reference(unit_rows, unit_positions, grid, patch_grid=(27, 27)):
    """The documented layout of a one-image prompt's image, walked position by position (SigLIP:
    no CLS, patch positions start at 0): base unit rows, the crops' kept patches in raster
    order over the stitched crop grid, then the crops' contextual rows."""
    rows = list(unit_rows[0])
    (grid_rows, grid_cols), (h, w) = grid, patch_grid
    where = [{p: k for k, p in enumerate(positions)} for positions in unit_positions]
    for gy in range(grid_rows * h):
        for gx in range(grid_cols * w):
            crop = 1 + (gy // h) * grid_cols + gx // w
            position = (gy % h) * w + gx % w
            if position in where[crop]:
                rows.append(unit_rows[crop][where[crop][position]])
    rows += [unit_rows[c][k] for c in range(1, len(unit_rows)) for k, p in enumerate(unit_positions[c]) if p < 0]
    return torch.stack(rows)


def test_one_liner_images_one_and_several_per_prompt():
    model, processor = build_tiny_llava_onevision(seed=1)
    photos = sample_images()
    before = hooks(model)
    model = visionzip(model, dominant=54, contextual=10)
    try:
        processor = visionzip_processor(processor, model)
        images = [[photos["chelsea"]], [photos["rocket"], photos["coffee"]]]
        inputs = processor(images=images, text=[prompt(1), prompt(2)], return_tensors="pt", padding=True)
        assert inputs["batch_num_images"].tolist() == [1, 2]
        mask = inputs["input_ids"] == model.config.image_token_id
        assert mask.sum(1).tolist() == [3 * 64, 2 * 64]  # 1x2 AnyRes grid + base; one unit per image
        embeds, out = llm_input_embeddings(model, **inputs)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3

        vz = VisionZip(54, 10)
        got = embeds[mask].split(mask.sum(1).tolist())
        with torch.no_grad():
            anyres = inputs["pixel_values"][0][:3]
            rows, selection = vz.encode_images(model, anyres), vz.select(model, anyres)
            several = vz.encode_images(model, inputs["pixel_values"][1:, 0])
        positions = [selection.dominant_index[u].tolist() + [-1] * 10 for u in range(3)]
        torch.testing.assert_close(got[0], stitched_reference(list(rows), positions, (1, 2)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], several.reshape(128, -1), atol=1e-5, rtol=1e-5)
    finally:
        remove_reduction(model)
        visionzip_processor(processor, model)
    assert hooks(model) == before


@pytest.mark.parametrize("budget, per_frame", [(64, 64), ("50+14", 64), (32, 32)])
def test_video_gets_frames_times_budget(ov_tiny, budget, per_frame):
    model, processor = ov_tiny
    clip = frames(5)
    with VisionZip.from_budget(budget)(model) as reduced:
        visionzip_processor(processor, reduced)
        inputs = processor(videos=[clip], text=[prompt(0, 1)], return_tensors="pt")
        mask = inputs["input_ids"] == model.config.video_token_id
        assert int(mask.sum()) == 5 * per_frame
        embeds, _ = llm_input_embeddings(model, **inputs)
        with torch.no_grad():
            want = VisionZip.from_budget(budget).encode_images(model, inputs["pixel_values_videos"][0])
    visionzip_processor(processor, model)
    torch.testing.assert_close(embeds[mask], want.reshape(5 * per_frame, -1), atol=1e-5, rtol=1e-5)
    assert "replace_video_token" not in processor.__dict__


def test_backend_geometry_and_flops(ov_tiny):
    backend = backend_for(ov_tiny[0])
    assert isinstance(backend, LlavaOnevisionBackend)
    assert backend.tower_tokens == 729 and backend.full_tokens == 729 and backend.patch_offset == 0
    assert backend.patch_grid == (27, 27) and backend.video_token_id == ov_tiny[0].config.video_token_id
    assert backend.image_units([[300, 451], [200, 200], [1000, 1000]]) == [3, 2, 10]
    assert backend.image_units([[300, 451], [200, 200], [1000, 1000]], batch_num_images=[1, 2]) == [3, 1, 1]
    assert backend.vision_flops(64) < backend.vision_flops(729)
    with pytest.raises(ValueError, match="exceeds the vision tower's 729 tokens"):
        VisionZip(720, 10).apply(ov_tiny[0])
    assert applied_reducer(ov_tiny[0]) is None


def test_loads_by_model_type(tmp_path):
    model, processor = build_tiny_llava_onevision(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_pretrained(str(tmp_path), torch.float32, torch.device("cpu"))
    assert isinstance(backend_for(loaded), LlavaOnevisionBackend)
    assert type(loaded_processor).__name__ == "LlavaOnevisionProcessor"
    builtin, _ = load_pretrained("builtin:tiny-llava-onevision", torch.float32, torch.device("cpu"))
    assert isinstance(backend_for(builtin), LlavaOnevisionBackend)


# -- through the lmms-eval adapter --------------------------------------------------------


@pytest.mark.parametrize("budget, per_unit", [("64", 64), ("full", None)])
def test_adapter_reports_the_documented_counts(tmp_path, ov_tiny, budget, per_unit):
    model, processor = ov_tiny
    photos = sample_images()
    assert VIDEO.is_file()
    docs = [{"visual": photos["astronaut"]}, {"visual": str(VIDEO)},
            {"visual": [photos["rocket"], photos["coffee"]]}, {"visual": photos["chelsea"]}]
    lm = VisionZipLMM(model=(model, processor), budget=budget, output_dir=str(tmp_path), warmup=0,
                      batch_size=2, max_frames=4)
    lm.task_dict = {"demo": {"test": docs}}
    try:
        results = lm.generate_until(generate_requests([0, 1, 2, 3], key="visual", max_new_tokens=3))
    finally:
        lm.clean()
        lm.engine.close()
    assert all(r.text != SAMPLE_ERROR for r in results)
    rows = {r["doc_id"]: r for r in map(json.loads, (tmp_path / "efficiency.jsonl").read_text().splitlines())}
    if per_unit is None:  # the model's own counts: AnyRes grid + newlines, 729 + 1 per image, pooled frames
        vanilla = processor(images=[[photos["astronaut"]], [photos["chelsea"]]], text=[prompt(1)] * 2,
                            return_tensors="pt", padding=True)
        anyres = (vanilla["input_ids"] == model.config.image_token_id).sum(1).tolist()
        want = {0: anyres[0], 1: 4 * 196 + 1, 2: 2 * 730, 3: anyres[1]}
    else:
        want = {0: 5 * 64, 1: 4 * 64, 2: 2 * 64, 3: 3 * 64}
    assert {d: rows[d]["visual_tokens"] for d in rows} == want
    assert {d: rows[d]["vision_units"] for d in rows} == {0: 5, 1: 4, 2: 2, 3: 3}
    assert {d: rows[d]["videos"] for d in rows} == {0: 0, 1: 1, 2: 0, 3: 0}
    per_unit_flops = backend_for(model).vision_flops(per_unit or 729)
    assert {d: rows[d]["vision_flops"] for d in rows} == {d: u * per_unit_flops for d, u in
                                                         {0: 5, 1: 4, 2: 2, 3: 3}.items()}
    assert applied_reducer(model) is None and "replace_video_token" not in processor.__dict__


def test_adapter_multi_round_reuses_video_tokens(tmp_path, ov_tiny):
    lm = VisionZipLMM(model=ov_tiny, budget=64, output_dir=str(tmp_path), warmup=0, max_frames=3)
    lm.task_dict = {"demo": {"test": [{"visual": str(VIDEO)}]}}

    def next_turn(doc, previous_output, round_idx, previous_round_info):
        return None, f"And now, question {round_idx}?", round_idx >= 2, previous_output, previous_round_info

    request = Instance(
        "generate_until_multi_round",
        ("What is shown?", {"max_new_tokens": 3}, lambda doc: [doc["visual"]], next_turn, 0, "demo", "test"), 0,
        {"task": "demo", "doc_id": 0, "repeats": 1},
    )
    try:
        before = lm.engine.vision_calls
        replies = lm.generate_until_multi_round([request])[0]
        calls = lm.engine.vision_calls - before
    finally:
        lm.clean()
        lm.engine.close()
    assert len(replies) == 2 and calls == 1
    table = [json.loads(line) for line in (tmp_path / "efficiency.jsonl").read_text().splitlines()]
    assert [r["visual_tokens"] for r in table] == [3 * 64, 3 * 64]
    assert [r["image_tokens_reused"] for r in table] == [False, True]
    assert table[0]["vision_flops"] == 3 * backend_for(ov_tiny[0]).vision_flops(64) and table[1]["vision_flops"] == 0


@pytest.mark.parametrize("method", ["random", "pool"])
def test_baselines_pass_the_same_counts(ov_tiny, method):
    from visionzip_eval import MethodSpec

    model, processor = ov_tiny
    inputs = processor.image_processor([[sample_images()["chelsea"]]], return_tensors="pt")
    videos = processor.video_processor([frames(2)], return_tensors="pt")["pixel_values_videos"]
    with MethodSpec.parse(method).build(64)(model), torch.no_grad():
        image = model.model.get_image_features(**inputs).pooler_output
        video = model.model.get_video_features(pixel_values_videos=videos).pooler_output
    assert image[0].shape[0] == 3 * 64 and video.shape[:2] == (1, 2 * 64)
