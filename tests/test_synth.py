"""The synthetic benchmark (scenes, questions, data on disk) and the trainer's building blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visionzip_eval.synth import benchmark as B
from visionzip_eval.synth import model as M
from visionzip_eval.synth import questions as Q
from visionzip_eval.synth import train as T
from visionzip_eval.backends.llava_hf import tiny_processor
from visionzip_eval.synth.scenes import (
    COLORS,
    GRID,
    IMAGE_SIZE,
    NUM_COMBOS,
    PATCH,
    combo_index,
    patch_labels,
    presence,
    random_scene,
    render,
)


def scenes(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


def test_scenes_are_seeded_and_render_deterministically():
    a, b = scenes(5, seed=3), scenes(5, seed=3)
    assert a == b and a != scenes(5, seed=4)
    image_a, map_a = render(a[0])
    image_b, map_b = render(b[0])
    assert image_a.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert np.array_equal(np.asarray(image_a), np.asarray(image_b)) and np.array_equal(map_a, map_b)


def test_scene_invariants():
    for scene in scenes(200):
        pairs = [(o.color, o.shape) for o in scene.objects]
        assert 1 <= len(pairs) <= 5 and len(set(pairs)) == len(pairs)  # "the red circle" is one object
        for obj in scene.objects:  # inside the image
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 and 0 <= y0 and x1 <= IMAGE_SIZE and y1 <= IMAGE_SIZE
    sizes = [o.size_class for s in scenes(200) for o in s.objects]
    assert sizes.count("small") > 0.25 * len(sizes)  # small objects are common: dropping tokens costs


def test_object_pixels_have_the_object_colour():
    scene = next(s for s in scenes(50) if any(o.texture == "solid" for o in s.objects))
    image, object_map = render(scene)
    pixels = np.asarray(image)
    for i, obj in enumerate(scene.objects):
        if obj.texture == "solid":
            assert (pixels[object_map == i + 1] == COLORS[obj.color]).all()


def test_patch_labels_against_a_direct_count():
    scene = scenes(1, seed=7)[0]
    _, object_map = render(scene)
    labels = patch_labels(scene, object_map).reshape(GRID, GRID)
    for row in range(GRID):
        for col in range(GRID):
            block = object_map[row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH]
            counts = [(block == i + 1).sum() for i in range(len(scene.objects))]
            best = int(np.argmax(counts))
            expected = 1 + combo_index(scene.objects[best].color, scene.objects[best].shape) if counts[best] >= 0.15 * PATCH * PATCH else 0
            assert labels[row, col] == expected
    assert presence(scene).sum() == len(scene.objects) and presence(scene).shape == (NUM_COMBOS,)


def test_pope_questions_are_true_of_the_scene():
    all_scenes = scenes(100)
    popular = B.popular_pairs(all_scenes)
    rng = np.random.default_rng(0)
    for scene in all_scenes:
        asked = Q.pope_questions(scene, rng, popular)
        assert [c for _, _, c in asked] == ["adversarial", "adversarial", "popular", "popular", "random", "random"]
        for question, answer, category in asked:
            words = question.rstrip("?").split()
            color, shape = words[3], words[4]
            assert answer == ("yes" if scene.has(color, shape) else "no")
            if category == "adversarial" and answer == "no" and Q.adversarial_pairs(scene):
                assert scene.find(color=color) or scene.find(shape=shape)
        popular_no = [q for q, a, c in asked if c == "popular" and a == "no"][0].split()
        assert (popular_no[3], popular_no[4].rstrip("?")) == next(p for p in popular if not scene.has(*p))


def test_gqa_and_mmbench_answers_follow_from_the_scene():
    rng = np.random.default_rng(1)
    for scene in scenes(150):
        question, answer, _, kind = Q.gqa_question(scene, rng)
        if kind == "count":
            assert answer == str(len(scene.objects))
        elif kind == "color":
            shape = question.split()[-1].rstrip("?")
            assert [o.color for o in scene.find(shape=shape)] == [answer]
        elif kind == "shape":
            color = question.split()[4]
            assert [o.shape for o in scene.find(color=color)] == [answer]
        else:
            words = question.rstrip("?").split()
            a = scene.find(color=words[2], shape=words[3])[0]
            b = scene.find(color=words[-2], shape=words[-1])[0]
            delta = {"left": b.cx - a.cx, "right": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}[answer]
            assert delta >= Q.MIN_SEPARATION
        question, options, correct, _, _ = Q.mmbench_question(scene, rng)
        assert len(options) == len(set(options)) == 4 and 0 <= correct < 4


def test_hard_training_pairs_have_a_colour_decoy_negative():
    rng = np.random.default_rng(3)
    scene_list, docs = T._train_docs(rng, 60, hard_pairs=2)
    assert any(Q.colour_decoys(scene) for scene in scene_list)
    for scene, with_hard in zip(scene_list, docs):
        decoys = Q.colour_decoys(scene)
        assert all(not scene.has(c, s) and scene.find(color=c) for c, s in decoys)
        assert set(decoys) == {(c, s) for c, s in Q.absent_pairs(scene) if c in {o.color for o in scene.objects}}
        extra = [d for bench, d in with_hard if bench == "pope"][6:]
        assert len(extra) == (4 if decoys else 0)
        for doc in extra:
            color, shape = doc["question"].rstrip("?").split()[3:5]
            assert doc["answer"] == ("yes" if scene.has(color, shape) else "no")
            if doc["answer"] == "no":
                assert (color, shape) in decoys
        assert [d["answer"] for d in extra] == ["yes", "no"] * (len(extra) // 2)


def test_short_image_block_keeps_every_object_patch_in_tower_order():
    rng = np.random.default_rng(4)
    scene_list = scenes(6, seed=5)
    _, labels = T.render_batch(scene_list)
    assert labels.shape == (6, GRID * GRID)
    lengths = set()
    for _ in range(20):
        index = T.short_image_block(rng, labels, 64).numpy()
        k = index.shape[1]
        lengths.add(k)
        assert max(64, (labels > 0).sum(1).max()) <= k <= GRID * GRID
        for row, kept in zip(labels, index):
            assert (np.diff(kept) > 0).all()  # ascending, no repeats
            assert set(np.flatnonzero(row > 0)) <= set(kept.tolist())
    assert len(lengths) > 10  # the length varies from step to step


def test_mme_pairs_have_one_true_and_one_false_statement():
    rng = np.random.default_rng(2)
    for scene in scenes(150):
        category, yes, no = Q.mme_pair(scene, rng)
        assert category in Q.MME_CATEGORIES and yes != no
        assert yes.endswith("Please answer yes or no.") and no.endswith("Please answer yes or no.")
        if category == "count":
            assert f" {Q.NUMBER_WORDS[len(scene.objects)]} " in yes and f" {Q.NUMBER_WORDS[len(scene.objects)]} " not in no


def test_benchmark_written_and_read_back(tmp_path):
    import datasets

    from visionzip_eval.datasets import data_files

    root = B.write_benchmark(tmp_path, seed=5, scenes={"pope": 3, "mme": 4, "gqa": 3, "mmbench": 2})
    pope = datasets.load_dataset("parquet", data_files=data_files("pope", root=root))["test"]
    assert len(pope) == 18 and set(pope["category"]) == {"adversarial", "popular", "random"}
    rows, scene_list = B.build_docs("pope", seed=5, n_scenes=3)
    assert pope["question"] == [r["question"] for r in rows]  # same seed, same questions
    image = pope[0]["image"]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    reference = np.asarray(B.decode(B.encode(render(scene_list[0])[0])), dtype=np.int16)
    assert np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - reference).max() == 0
    mme = datasets.load_dataset("parquet", data_files=data_files("mme", root=root))["test"]
    assert len(mme) == 8 and mme["answer"] == ["Yes", "No"] * 4
    mmbench = datasets.load_dataset("parquet", data_files=data_files("mmbench", "en", root=root))["dev"]
    assert sorted(mmbench["index"]) == [0, 1, 1_000_000, 1_000_001, 2_000_000, 2_000_001, 3_000_000, 3_000_001]
    gqa = datasets.load_dataset("parquet", data_files=data_files("gqa", "testdev_balanced_instructions", root=root))["testdev"]
    images = datasets.load_dataset("parquet", data_files=data_files("gqa", "testdev_balanced_images", root=root))["testdev"]
    assert set(gqa["imageId"]) <= set(images["id"]) and len(gqa) == 6


def test_ensure_benchmark_generates_once(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONZIP_DATA", str(tmp_path))
    monkeypatch.setattr(B, "EVAL_SCENES", {"pope": 2, "mme": 2, "gqa": 2, "mmbench": 1})
    root = B.ensure_benchmark(seed=9)
    assert (root / ".complete").is_file() and root.parent == tmp_path
    stamp = (root / "pope").stat().st_mtime_ns
    assert B.ensure_benchmark(seed=9) == root and (root / "pope").stat().st_mtime_ns == stamp
    assert B.data_files_pope["test"][0].startswith(str(tmp_path))  # the YAML hook reads $VISIONZIP_DATA
    with pytest.raises(AttributeError):
        B.data_files_vqav2


# ------------------------------------------------------------------ the model's pieces


@pytest.fixture(scope="module")
def synth_parts():
    docs = T._train_docs(np.random.default_rng(0), 30)[1]
    corpus = [M.doc_prompt(bench, doc) + " " + doc["answer"] for d in docs for bench, doc in d]
    tokenizer = M.build_tokenizer(corpus)
    processor = tiny_processor(tokenizer)
    model = M.build_model(tokenizer, seed=0).eval()
    return model, processor


def test_tokenizer_covers_every_benchmark_prompt(synth_parts):
    model, processor = synth_parts
    tokenizer = processor.tokenizer
    for bench in B.BENCHES:
        rows, _ = B.build_docs(bench, n_scenes=30)
        for row in rows:
            ids = tokenizer(M.chat_prompt(model, processor, M.doc_prompt(bench, row)) + " " + row["answer"])["input_ids"]
            assert tokenizer.unk_token_id not in ids, tokenizer.decode(ids)
    for answer in ["yes", "No", "red", "triangle", "3", "left", "B"]:
        assert tokenizer.decode(tokenizer(answer, add_special_tokens=False)["input_ids"]) == answer


def test_fast_pixel_values_equal_the_clip_processor(synth_parts):
    _, processor = synth_parts
    images, _ = T.render_batch(scenes(3))
    expected = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(M.pixel_values(images), expected, atol=1e-5)


def test_shared_prefix_loss_equals_full_sequences(synth_parts):
    """The trainer's prefix-sharing step computes exactly the loss of the full sequences."""
    model, processor = synth_parts
    scene_list, docs = T._train_docs(np.random.default_rng(1), 2)
    questions = T.tokenize_questions(model, processor, docs)
    images, _ = T.render_batch(scene_list)
    features = T.tower_features(model, images)
    suffixes = [questions.per_scene[i][j][0] for i in range(2) for j in range(3)]
    lengths = [questions.per_scene[i][j][1] for i in range(2) for j in range(3)]
    with torch.no_grad():
        shared, _ = T.llm_step_loss(model, features, questions.prefix, suffixes, lengths, 3, processor.tokenizer.pad_token_id)
        lm, embed = model.model.language_model, model.model.language_model.get_input_embeddings()
        total, count = 0.0, 0
        for row, (suffix, n) in enumerate(zip(suffixes, lengths)):
            image = model.model.multi_modal_projector(features[row // 3].float())
            x = torch.cat([embed(torch.tensor(questions.prefix)), image, embed(torch.tensor(suffix))])[None]
            logits = model.lm_head(lm(inputs_embeds=x).last_hidden_state[0, -n - 1:-1])
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(suffix[-n:]), reduction="sum").item()
            count += n
    assert shared.item() == pytest.approx(total / count, rel=1e-5)
    # and the prefix is what the real processor puts before the image tokens
    prompt = M.chat_prompt(model, processor, "Is there a red circle in the image?")
    ids = processor(images=images[:1], text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids(M.IMAGE_TOKEN)
    assert ids[:len(questions.prefix)] == questions.prefix and ids.count(image_id) == 576


@pytest.mark.slow
def test_training_runs_end_to_end_and_saves_a_loadable_model(tmp_path):
    from visionzip_eval.synth.weights import load_trained

    config = T.TrainConfig(tower_steps=2, tower_batch=2, llm_steps=2, llm_images=2, llm_questions=2,
                           llm_warmup_fraction=0.5, llm_short_fraction=1.0,  # step 1: a short image block
                           warmup=1, log_every=1, eval_every=2, held_out_scenes=2)
    lines = []
    report = T.train(tmp_path / "m", config, log=lines.append)
    assert (tmp_path / "m" / "training.json").is_file() and not (tmp_path / "m.partial").exists()
    assert len(report["llm"]["history"]) == 2 and any(line.startswith("tower") for line in lines)
    assert set(report["llm"]["held_out"]) == set(B.BENCHES)
    model, processor = load_trained(tmp_path / "m")
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    assert processor.tokenizer.convert_tokens_to_ids("circle") != processor.tokenizer.unk_token_id
    # same seed, same thread count: the same weights, bit for bit (what "reproducible" rests on)
    T.train(tmp_path / "again", config, log=lambda _: None)
    again, _ = load_trained(tmp_path / "again")
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_load_trained_names_the_fix_when_missing(tmp_path):
    from visionzip_eval.synth.weights import load_trained

    with pytest.raises(FileNotFoundError, match="train_tiny_vlm.py"):
        load_trained(tmp_path)


# ------------------------------------------------------------------ the shipped model


@pytest.fixture(scope="module")
def trained():
    from visionzip_eval.synth.weights import load_trained as load_tiny_llava_synth

    return load_tiny_llava_synth()


def test_shipped_model_loads_offline_with_the_real_architecture(trained):
    from visionzip_eval.loading import load_pretrained
    from visionzip_eval.synth.weights import SHIPPED_DIR

    model, processor = trained
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert sum(f.stat().st_size for f in SHIPPED_DIR.iterdir()) < 8 * 2**20  # "a few MB"
    report = json.loads((SHIPPED_DIR / "training.json").read_text())
    assert report["config"]["seed"] == 0 and report["tower"]["held_out"]["patch_object_acc"] > 0.9
    via_adapter, _ = load_pretrained("builtin:tiny-llava-synth", torch.float32, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), via_adapter.state_dict().values()))


def test_tokenizer_spells_unknown_words_and_the_engine_skips_unspellable_stop_strings(trained):
    from visionzip_eval.engine import Engine, Generation, Request

    model, processor = trained
    tokenizer = processor.tokenizer
    ids = tokenizer("zebra abcdef", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == "zebra abcdef"
    engine = Engine(model, processor)
    assert engine._can_spell("circle") and not engine._can_spell("\n\n")  # whitespace is not a token
    request = Request(turns=[("Is there a red circle in the image?", None)], images=[render(scenes(1)[0])[0]])
    texts = {engine.generate([request], Generation(max_new_tokens=4, until=until))[0].text for until in (["\n\n"], [])}
    assert len(texts) == 1 and texts.pop() in {"yes", "no", "Yes", "No"}
