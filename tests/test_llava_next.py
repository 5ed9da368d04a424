"""VisionZip on a tiny LLaVA-NeXT with the real architecture (AnyRes crops of CLIP 336/14, Llama).

The documented count: an image of ``1 + crops`` units (base image + AnyRes crops) receives
``(1 + crops) * (dominant + contextual)`` rows, no image_newline.
"""

import json

import pytest
import torch

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
from visionzip_eval.backends.llava_next import (
    LlavaNextBackend,
    anyres_layout,
    row_positions,
)
from visionzip_eval.lmms.adapter import SAMPLE_ERROR, VisionZipLMM
from visionzip_eval.selection import visionzip_select
from visionzip_eval.backends.llava_next import build_tiny_llava_next
from visionzip_eval.testing import sample_images
from helpers import generate_requests, hooks, llm_input_embeddings

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


@pytest.fixture(scope="module")
def next_tiny():
    return build_tiny_llava_next(seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def next_eager():
    return build_tiny_llava_next(seed=0, attn_implementation="eager")


def images_of_every_grid():
    """Sample images whose AnyRes grids are 2x2 (5 units), 1x3 (4 units), 2x1 (3 units), 1x2 (3)."""
    photos = sample_images()
    return {
        "astronaut": (photos["astronaut"], (2, 2)),
        "wide": (photos["rocket"].resize((900, 300)), (1, 3)),
        "tall": (photos["coffee"].resize((300, 600)), (2, 1)),
        "chelsea": (photos["chelsea"], (1, 2)),
    }


# -- the selection and the AnyRes layout against plain loops --------------------------------


def reference_unit(x, attention, keys, dominant, contextual):
    """One unit, one token at a time, as ../shared/VISIONZIP.md reads (CLS tower): the rows and,
    per row, the tower position it was taken from (-1 for a contextual merge)."""
    n = x.shape[0]
    score = [float(attention[:, j].double().sum()) for j in range(n)]
    kept = [0] + sorted(sorted(range(1, n), key=lambda j: score[j], reverse=True)[: dominant - 1])
    rest = [j for j in range(n) if j not in set(kept)]
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    unit = [keys[j].double() / keys[j].double().norm() for j in rest]
    members = {t: [] for t in range(len(targets))}
    for i in range(len(rest)):
        if i not in targets:
            sims = [float(unit[i] @ unit[targets[t]]) for t in range(len(targets))]
            members[max(range(len(targets)), key=lambda t: sims[t])].append(rest[i])
    rows = [x[j].double() for j in kept]
    for t, target in enumerate(targets):
        merged = x[rest[target]].double().clone()
        if members[t]:
            merged += torch.stack([x[j].double() for j in members[t]]).mean(0)
        rows.append(merged)
    return torch.stack(rows), kept + [-1] * contextual


def reference_layout(unit_rows, unit_positions, grid, patch_grid=(24, 24), offset=1):
    """The documented row order of one image, walked position by position: the base unit's rows;
    the crops' kept patches in raster order over the stitched crop grid; the crops' CLS rows;
    the crops' contextual rows."""
    rows = list(unit_rows[0])
    (grid_rows, grid_cols), (h, w) = grid, patch_grid
    crops = range(1, len(unit_rows))
    where = [{p: k for k, p in enumerate(unit_positions[c])} for c in range(len(unit_rows))]
    for gy in range(grid_rows * h):
        for gx in range(grid_cols * w):
            crop = 1 + (gy // h) * grid_cols + gx // w
            position = offset + (gy % h) * w + gx % w
            if position in where[crop]:
                rows.append(unit_rows[crop][where[crop][position]])
    rows += [unit_rows[c][k] for c in crops for k, p in enumerate(unit_positions[c]) if 0 <= p < offset]
    rows += [unit_rows[c][k] for c in crops for k, p in enumerate(unit_positions[c]) if p < 0]
    return torch.stack(rows)


@pytest.mark.parametrize("grid, dominant, contextual", [((2, 2), 54, 10), ((1, 3), 27, 5), ((2, 1), 108, 20),
                                                         ((1, 2), 1, 1), ((3, 1), 576, 1)])
def test_per_crop_selection_and_layout_match_plain_loops(grid, dominant, contextual):
    units, tokens, dim, heads = 1 + grid[0] * grid[1], 577, 16, 4
    g = torch.Generator().manual_seed(dominant + grid[1])
    hidden = torch.randn(units, tokens, dim, generator=g)
    attention = torch.randn(units, heads, tokens, generator=g).softmax(-1)
    keys = torch.randn(units, tokens, dim // heads, generator=g)

    selection = visionzip_select(hidden, attention, keys, dominant, contextual)
    got = anyres_layout(selection.tokens, row_positions(selection, dominant + contextual), grid, (24, 24), 1)

    reference = [reference_unit(hidden[u], attention[u], keys[u], dominant, contextual) for u in range(units)]
    want = reference_layout([rows for rows, _ in reference], [pos for _, pos in reference], grid)
    assert got.shape == (units * (dominant + contextual), dim)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_layout_of_a_single_unit_and_of_pooled_rows():
    tokens = torch.randn(1, 6, 4)
    assert torch.equal(anyres_layout(tokens, torch.full((1, 6), -1), (0, 0), (24, 24), 1), tokens[0])
    # rows without a position (pooled cells) keep the crop order
    tokens = torch.randn(3, 4, 2)
    got = anyres_layout(tokens, torch.full((3, 4), -1), (1, 2), (24, 24), 1)
    assert torch.equal(got, tokens.reshape(12, 2))
    with pytest.raises(ValueError, match="do not fill a 2x2 grid"):
        anyres_layout(torch.randn(3, 4, 2), torch.full((3, 4), -1), (2, 2), (24, 24), 1)


# -- the model ----------------------------------------------------------------------------


def reference_encode(model, pixel_values, dominant, contextual):
    """VisionZip per unit the way the official code reads its signals: an eager tower run with
    output_attentions=True, the full attention map of layer -2, keys recomputed from its input."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    layer_index = len(tower.encoder.layers) - 2
    layer = tower.encoder.layers[layer_index]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[layer_index]))
    b, n, _ = keys.shape
    metric = keys.view(b, n, layer.self_attn.num_heads, -1).mean(2)
    selection = visionzip_select(out.hidden_states[-2], out.attentions[layer_index][:, :, 0], metric, dominant, contextual)
    return model.model.multi_modal_projector(selection.tokens)


@pytest.mark.parametrize("dominant, contextual", [(54, 10), (108, 20), (27, 5)])
def test_encode_sdpa_and_eager_equal_reference(next_tiny, next_eager, dominant, contextual):
    images = [image for image, _ in images_of_every_grid().values()][:2]
    inputs = next_tiny[1].image_processor(images, return_tensors="pt")
    backend = backend_for(next_tiny[0])
    units = backend.image_units(inputs["image_sizes"])
    assert units == [5, 4]
    pixels = torch.cat([p[:u] for p, u in zip(inputs["pixel_values"], units)])
    vz = VisionZip(dominant, contextual)
    with torch.no_grad():
        want = reference_encode(next_eager[0], pixels, dominant, contextual)
        sdpa = vz.encode_images(next_tiny[0], pixels)
        eager = vz.encode_images(next_eager[0], pixels)
    assert sdpa.shape == (9, dominant + contextual, next_tiny[0].config.text_config.hidden_size)
    assert (sdpa - want).abs().max() < 1e-4
    assert (eager - want).abs().max() < 1e-4


def test_full_path_equals_vanilla_image_features(next_tiny):
    model, processor = next_tiny
    images = [image for image, _ in images_of_every_grid().values()]
    inputs = processor.image_processor(images, return_tensors="pt")
    with torch.no_grad():
        vanilla = model.model.get_image_features(**inputs).pooler_output
        with NoReduction()(model):
            ours = model.model.get_image_features(**inputs).pooler_output
    assert [len(v) for v in ours] == [len(v) for v in vanilla]
    assert all(torch.equal(a, b) for a, b in zip(ours, vanilla))


def test_one_liner_feeds_exactly_units_times_64_rows_per_image():
    model, processor = build_tiny_llava_next(seed=1)
    cases = images_of_every_grid()
    images = [image for image, _ in cases.values()]
    grids = [grid for _, grid in cases.values()]
    before = hooks(model)
    model = visionzip(model, dominant=54, contextual=10)
    try:
        processor = visionzip_processor(processor, model)
        inputs = processor(images=images, text=[PROMPT] * 4, return_tensors="pt", padding=True)
        mask = inputs["input_ids"] == model.config.image_token_id
        assert mask.sum(1).tolist() == [5 * 64, 4 * 64, 3 * 64, 3 * 64]
        embeds, out = llm_input_embeddings(model, **inputs)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3

        # what the LLM got, image by image, against the per-crop reference and the documented layout
        vz = VisionZip(54, 10)
        got = embeds[mask].split(mask.sum(1).tolist())
        for index, (pixels, grid) in enumerate(zip(inputs["pixel_values"], grids)):
            units = 1 + grid[0] * grid[1]
            with torch.no_grad():
                rows = vz.encode_images(model, pixels[:units])
                selection = vz.select(model, pixels[:units])
            positions = [selection.dominant_index[u].tolist() + [-1] * 10 for u in range(units)]
            want = reference_layout(list(rows), positions, grid)
            torch.testing.assert_close(got[index].double(), want.double(), atol=1e-5, rtol=1e-5)
    finally:
        remove_reduction(model)
        visionzip_processor(processor, model)
    assert hooks(model) == before
    inputs = processor(images=images[:1], text=[PROMPT], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2928  # vanilla count again


@pytest.mark.parametrize("budget, rows", [(32, 160), (64, 320), (128, 640)])
def test_paper_budgets_per_five_crop_image(next_tiny, budget, rows):
    model, processor = next_tiny
    image = sample_images()["astronaut"]
    with VisionZip.from_budget(budget)(model):
        visionzip_processor(processor, model)
        inputs = processor(images=image, text=PROMPT, return_tensors="pt")
        with torch.no_grad():
            features = model.model.get_image_features(**{k: inputs[k] for k in ("pixel_values", "image_sizes")})
    visionzip_processor(processor, model)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == rows
    assert features.pooler_output[0].shape[0] == rows


def test_backend_geometry_and_flops(next_tiny):
    backend = backend_for(next_tiny[0])
    assert isinstance(backend, LlavaNextBackend)
    assert backend.tower_tokens == 577 and backend.full_tokens == 576 and backend.patch_grid == (24, 24)
    assert backend.crop_grid([512, 512]) == (2, 2) and backend.crop_grid([300, 900]) == (1, 3)
    assert backend.image_units([[512, 512], [300, 900], [600, 300]]) == [5, 4, 3]
    assert backend.vision_flops(64) < backend.vision_flops(576)
    with pytest.raises(ValueError, match="exceeds the vision tower's 577 tokens"):
        VisionZip(570, 8).apply(next_tiny[0])
    assert applied_reducer(next_tiny[0]) is None


def test_loads_by_model_type(tmp_path):
    model, processor = build_tiny_llava_next(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_pretrained(str(tmp_path), torch.float32, torch.device("cpu"))
    assert type(loaded).__name__ == "LlavaNextForConditionalGeneration"
    assert isinstance(backend_for(loaded), LlavaNextBackend)
    assert type(loaded_processor).__name__ == "LlavaNextProcessor"
    builtin, _ = load_pretrained("builtin:tiny-llava-next", torch.float32, torch.device("cpu"))
    assert isinstance(backend_for(builtin), LlavaNextBackend)


# -- through the lmms-eval adapter --------------------------------------------------------


@pytest.mark.parametrize("budget, per_crop", [("64", 64), ("32", 32), ("full", None)])
def test_adapter_reports_units_times_budget(tmp_path, next_tiny, budget, per_crop):
    model, processor = next_tiny
    cases = images_of_every_grid()
    docs = [{"image": cases["astronaut"][0]}, {"image": cases["wide"][0]},
            {"image": [cases["tall"][0], cases["chelsea"][0]]}]
    lm = VisionZipLMM(model=(model, processor), budget=budget, output_dir=str(tmp_path), warmup=0, batch_size=2)
    lm.task_dict = {"demo": {"test": docs}}
    try:
        results = lm.generate_until(generate_requests([0, 1, 2], key="image", max_new_tokens=3))
    finally:
        lm.clean()
        lm.engine.close()
    assert all(r.text != SAMPLE_ERROR for r in results)
    rows = {r["doc_id"]: r for r in map(json.loads, (tmp_path / "efficiency.jsonl").read_text().splitlines())}
    if per_crop is None:  # the model's own counts: unpadded grid + newlines + base
        vanilla = processor(images=[cases[k][0] for k in ("astronaut", "wide", "tall", "chelsea")],
                            text=[PROMPT] * 4, return_tensors="pt", padding=True)
        counts = (vanilla["input_ids"] == model.config.image_token_id).sum(1).tolist()
        want = {0: counts[0], 1: counts[1], 2: counts[2] + counts[3]}
    else:
        want = {0: 5 * per_crop, 1: 4 * per_crop, 2: (3 + 3) * per_crop}
    assert {d: rows[d]["visual_tokens"] for d in rows} == want
    assert {d: rows[d]["vision_units"] for d in rows} == {0: 5, 1: 4, 2: 6}
    backend = backend_for(model)
    per_unit = backend.vision_flops(per_crop or 576)
    assert {d: rows[d]["vision_flops"] for d in rows} == {0: 5 * per_unit, 1: 4 * per_unit, 2: 6 * per_unit}
    assert all(rows[d]["prompt_tokens"] > rows[d]["visual_tokens"] for d in rows)
    assert applied_reducer(model) is None and "replace_image_token" not in processor.__dict__


def test_adapter_multi_round_reuses_anyres_tokens(tmp_path, next_tiny):
    lm = VisionZipLMM(model=next_tiny, budget=64, output_dir=str(tmp_path), warmup=0)
    image = images_of_every_grid()["wide"][0]
    from visionzip_eval.engine import Generation, Request

    try:
        turns = [("What is shown?", "a rocket"), ("Where?", None)]
        fresh = lm.engine.generate([Request(turns=turns, images=[image])], Generation(max_new_tokens=4))[0]
        features, _ = lm.engine.encode([image])
        cached = lm.engine.generate([Request(turns=turns, images=[image])], Generation(max_new_tokens=4),
                                    image_features=features)[0]
    finally:
        lm.engine.close()
    assert fresh.text == cached.text
    assert fresh.metrics["visual_tokens"] == cached.metrics["visual_tokens"] == 4 * 64
    assert lm.engine.last_encode_vision_flops == fresh.metrics["vision_flops"] > 0


@pytest.mark.parametrize("method", ["random", "pool"])
def test_baselines_pass_the_same_count_per_crop(next_tiny, method):
    from visionzip_eval import MethodSpec

    model, processor = next_tiny
    inputs = processor.image_processor([images_of_every_grid()["chelsea"][0]], return_tensors="pt")
    with MethodSpec.parse(method).build(64)(model), torch.no_grad():
        features = model.model.get_image_features(**inputs).pooler_output
    assert features[0].shape == (3 * 64, model.config.text_config.hidden_size)


def test_divprune_packed_scope_is_refused_on_anyres_families(next_tiny):
    """The official LLaVA-1.6 DivPrune selects over an image's whole packed sequence; not
    implemented here (a per-image count), so it is refused in one line, not run per crop."""
    from visionzip_eval import MethodSpec
    from visionzip_eval.backends.llava_hf import LlavaHFBackend
    from visionzip_eval.backends.llava_onevision import LlavaOnevisionBackend
    from visionzip_eval.backends.qwen2_5_vl import Qwen2_5_VLBackend

    model, _ = next_tiny
    with pytest.raises(ValueError, match=r"divprune: scope=packed .* not implemented for llava-next .*use scope=per_unit"):
        MethodSpec.parse("divprune", scope="packed").build(64).apply(model)
    assert applied_reducer(model) is None
    assert LlavaOnevisionBackend.packs_units and not LlavaHFBackend.packs_units and not Qwen2_5_VLBackend.packs_units
