"""``visionzip-eval tune`` (VisionZip‡), its data, ``bench train``, the synthetic export and the
report's ‡ rows: on the tiny random LLaVA (``builtin:tiny-llava``), a handful of samples, 2-4
optimizer steps per run."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from visionzip_eval.tuning import TUNING_JSON, TuneOptions, read_tuning, tune
from visionzip_eval.tuning.data import IGNORE_INDEX, Collator, ConversationDataset, encode_conversation, read_samples

MODEL = "builtin:tiny-llava"
QUESTIONS = [
    ("<image>\nIs there a red circle in the image?", "Yes"),
    ("What color is the square?", "blue"),
    ("And the triangle?", "green, and small"),
]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """Four samples (one of three turns) over three real images, in LLaVA's format."""
    from visionzip_eval.testing import sample_images

    root = tmp_path_factory.mktemp("llava_data")
    (root / "img").mkdir()
    names = []
    for index, image in enumerate(list(sample_images().values())[:3]):
        name = f"img/{index}.jpg"
        image.convert("RGB").save(root / name)
        names.append(name)
    samples = [
        {"id": "multi", "image": names[0], "conversations": [
            {"from": "human" if i % 2 == 0 else "gpt", "value": text}
            for turn in QUESTIONS for i, text in enumerate(turn)]},
        {"id": "a", "image": names[1], "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                                         {"from": "gpt", "value": "A photo."}]},
        {"id": "b", "image": names[2], "conversations": [{"from": "human", "value": "Describe it.\n<image>"},
                                                         {"from": "gpt", "value": "Something grey."}]},
        {"id": "c", "image": names[0], "conversations": [{"from": "human", "value": "<image>\nHow many?"},
                                                         {"from": "gpt", "value": "Two."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (root / "data.json").write_text(json.dumps(samples))
    return root


def options(dataset_dir: Path, output: Path, **changes) -> TuneOptions:
    base = dict(model=MODEL, data=str(dataset_dir / "data.json"), image_folder=str(dataset_dir),
                output=str(output), budget="64", max_steps=2, batch_size=2, lr=1e-2, logging_steps=1,
                save_steps=100, warmup=0)
    return TuneOptions(**{**base, **changes})


class Keep(TrainerCallback):
    """A callback that keeps the trained model and what the first training step saw."""

    def __init__(self):
        self.model = None
        self.first_step = None
        self.projector_rows = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        model.model.multi_modal_projector.register_forward_hook(
            lambda module, inputs, output: self.projector_rows.append(tuple(output.shape)))

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.first_step is None:
            steps = [s["step"] for s in optimizer.state.values() if "step" in s]
            self.first_step = (state.global_step, float(steps[0]) if steps else 0.0)


# -- the data: labels are exactly the replies, and the prompt is the evaluation's -------------------


def test_labels_are_the_assistant_replies_and_the_prompt_is_the_evaluations(tiny):
    model, processor = tiny
    from visionzip_eval.engine import Engine, Request
    from visionzip_eval.methods.visionzip import VisionZip

    tokenizer = processor.tokenizer
    image_id = model.config.image_token_id
    turns = tuple((q, a) for q, a in QUESTIONS)
    ids, labels = encode_conversation(processor, turns, 64, image_id)
    assert len(ids) == len(labels) and ids.count(image_id) == 64
    # the labelled runs are, in order, each reply then </s>; nothing else is labelled
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
                current = []
            continue
        assert label == token
        current.append(token)
    runs.append(current) if current else None
    assert [tokenizer.decode(run[:-1]).strip() for run in runs] == [a for _, a in QUESTIONS]
    assert all(run[-1] == tokenizer.eos_token_id for run in runs)
    # everything before the first reply is what the evaluation feeds the model for that question
    engine = Engine(model, processor, VisionZip(54, 10))
    try:
        prompt = engine.prompt(Request(turns=[(QUESTIONS[0][0].removeprefix("<image>\n"), None)], images=[None]))
        from visionzip_eval.testing import sample_images

        evaluated = processor(text=prompt, images=[sample_images()["astronaut"]], return_tensors="pt")["input_ids"][0]
    finally:
        engine.close()
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert ids[:first] == evaluated.tolist()


def test_read_samples_checks_subsets_and_skips_text_only(dataset_dir):
    samples, summary = read_samples(dataset_dir / "data.json", dataset_dir)
    assert [s.id for s in samples] == ["multi", "a", "b", "c"] and summary.text_only == 1
    assert summary.sha256 == hashlib.sha256((dataset_dir / "data.json").read_bytes()).hexdigest()
    half, again = (read_samples(dataset_dir / "data.json", dataset_dir, 0.5, seed=3)[0] for _ in range(2))
    assert len(half) == 2 and [s.id for s in half] == [s.id for s in again]  # seeded


# -- tuning: what trains, what the forward sees, the folder ------------------------------------------


def test_tune_trains_the_projector_under_the_reduction_and_the_folder_reloads(dataset_dir, tmp_path):
    from visionzip_eval.apply import remove_reduction
    from visionzip_eval.backends import backend_for
    from visionzip_eval.loading import load_pretrained
    from visionzip_eval.methods.visionzip import VisionZip
    from visionzip_eval.backends.llava_hf import build_tiny_llava

    keep = Keep()
    out = tmp_path / "tuned"
    record = tune(options(dataset_dir, out), callbacks=(keep,), log=lambda _: None)
    # the training forward ran VisionZip: 64 rows per image through the projector, not 576
    assert keep.projector_rows and all(rows[1] == 64 for rows in keep.projector_rows)
    # only the projector changed
    trained = keep.model.state_dict()
    base = build_tiny_llava(seed=0)[0].state_dict()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)
    assert {k for k in base if k.startswith("model.multi_modal_projector.")} == changed
    # the folder: record written, loadable two ways, same logits as the trained model
    assert read_tuning(out) == record
    assert record["base_model"] == MODEL and (record["method"], record["budget"]) == ("visionzip", "64")
    assert record["trained"] == ["projector"] and record["steps"] == 2 and record["tokens_per_image"] == 64
    assert record["data"]["samples"] == 4 and record["data"]["sha256"] == hashlib.sha256(
        (dataset_dir / "data.json").read_bytes()).hexdigest()
    assert math.isfinite(record["final_loss"]) and record["step_seconds_median"] > 0
    assert record["peak_memory_kind"] == "process_peak_rss" and record["peak_memory_bytes"] > 0
    reloaded, processor = load_pretrained(str(out), torch.float32, torch.device("cpu"))
    from transformers import LlavaForConditionalGeneration

    direct = LlavaForConditionalGeneration.from_pretrained(out)
    samples, _ = read_samples(dataset_dir / "data.json", dataset_dir)
    batch = Collator(processor, backend_for(reloaded))(
        [ConversationDataset(samples[:2], processor, 64, reloaded.config.image_token_id)[i] for i in range(2)])
    logits = []
    for candidate in (keep.model, reloaded, direct.eval()):
        candidate.eval()
        with VisionZip(54, 10)(candidate), torch.no_grad():
            logits.append(candidate(**{k: v for k, v in batch.items() if k != "labels"}).logits)
    remove_reduction(keep.model)
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_gradients_reach_the_projector_through_the_selection_and_nothing_frozen(tiny, dataset_dir):
    """One forward/backward as the Trainer runs it: the projector gets gradients through
    VisionZip's gather and merge; the frozen tower and LLM get none."""
    from visionzip_eval.backends import backend_for
    from visionzip_eval.methods.visionzip import VisionZip
    from visionzip_eval.backends.llava_hf import build_tiny_llava
    from visionzip_eval.tuning.tune import freeze

    model, processor = build_tiny_llava(seed=0)
    backend = backend_for(model)
    freeze(model, backend, "projector")
    samples, _ = read_samples(dataset_dir / "data.json", dataset_dir)
    VisionZip(54, 10).apply(model)
    data = ConversationDataset(samples, processor, 64, model.config.image_token_id)
    batch = Collator(processor, backend)([data[i] for i in range(len(data))])
    model.train()
    model(**batch).loss.backward()
    projector = list(backend.modules()["projector"].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector)
    assert all(p.grad is None for name, p in model.named_parameters() if "multi_modal_projector" not in name)


def test_resume_continues_from_the_last_checkpoint_with_the_optimizer_state(dataset_dir, tmp_path):
    class Killed(RuntimeError):
        pass

    class KillAfterSecondSave(Keep):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise Killed

    out = tmp_path / "run"
    with pytest.raises(Killed):
        tune(options(dataset_dir, out, max_steps=4, save_steps=1), callbacks=(KillAfterSecondSave(),),
             log=lambda _: None)
    assert not (out / TUNING_JSON).exists() and (out / "checkpoint-2").is_dir()  # not complete-looking
    resumed = Keep()
    record = tune(options(dataset_dir, out, max_steps=4, save_steps=1, resume=True), callbacks=(resumed,),
                  log=lambda _: None)
    assert resumed.first_step == (2, 2.0)  # global step and AdamW's step count restored
    assert record["steps"] == 4 and record["resumed"]
    straight = Keep()
    tune(options(dataset_dir, tmp_path / "straight", max_steps=4, save_steps=100), callbacks=(straight,),
         log=lambda _: None)
    a, b = resumed.model.state_dict(), straight.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if "multi_modal_projector" in k)


# -- bad inputs: one line, before training, no complete-looking folder -------------------------------


def _write(root: Path, samples) -> Path:
    path = root / "bad.json"
    path.write_text(samples if isinstance(samples, str) else json.dumps(samples))
    return path


GOOD = {"id": "x", "image": "img/0.jpg", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                           {"from": "gpt", "value": "A."}]}


@pytest.mark.parametrize("case, data, extra, expected", [
    ("missing image", [dict(GOOD, image="img/nope.jpg")], [], "missing image file"),
    ("no <image>", [dict(GOOD, conversations=[{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}])],
     [], "conversation with no <image>"),
    ("unknown --train", [GOOD], ["--train", "decoder"], "unknown --train 'decoder'"),
    ("empty data", [], [], "empty data"),
    ("malformed JSON", '[{"id": 1,', [], "malformed JSON"),
    ("bad budget", [GOOD], ["--budget", "0"], "budget"),
    ("in-LLM method", [GOOD], ["--method", "fastv"], "prunes inside the LLM"),
    ("unknown method", [GOOD], ["--method", "zipper"], "unknown method 'zipper'"),
    ("unsupported family", [GOOD], ["--model", "builtin:tiny-llava-next"], "tune supports llava-hf LLaVA-1.5"),
    ("roles", [dict(GOOD, conversations=[{"from": "gpt", "value": "<image>\nA."}])], [], "messages alternate"),
])
def test_bad_inputs_fail_in_one_line_before_training(dataset_dir, tmp_path, capsys, case, data, extra, expected):
    from visionzip_eval.cli import main

    path = _write(tmp_path, data)
    out = tmp_path / "out"
    argv = ["tune", "--model", MODEL, "--data", str(path), "--image-folder", str(dataset_dir), "--output", str(out),
            "--max-steps", "1", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


def test_output_folder_of_another_run_is_refused(dataset_dir, tmp_path):
    out = tmp_path / "busy"
    (out / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ValueError, match="pass --resume"):
        tune(options(dataset_dir, out))
    with pytest.raises(ValueError, match="no checkpoint"):
        tune(options(dataset_dir, tmp_path / "fresh", resume=True))


# -- the synthetic export: training scenes only -------------------------------------------------------


def test_synthetic_export_never_draws_a_benchmark_scene(tmp_path):
    from visionzip_eval.synth.benchmark import EVAL_SEED
    from visionzip_eval.synth.train import _train_docs
    from visionzip_eval.tuning.synth_data import HARD_PAIRS, benchmark_scenes, export_llava, training_rng

    path = export_llava(tmp_path, scenes=3, seed=EVAL_SEED)  # even the benchmark's seed number
    scenes, _ = _train_docs(training_rng(EVAL_SEED), 3, HARD_PAIRS)
    assert not set(scenes) & benchmark_scenes()
    samples, summary = read_samples(path, tmp_path)
    assert summary.used == len(json.loads(path.read_text())) and len({s.image for s in samples}) == 3
    prompts = {s.turns[0][0] for s in samples}
    assert any(p.endswith("Answer the question using a single word or phrase.") for p in prompts)  # lmms-eval's
    assert any("in this image?" in p for p in prompts) and any("in the image?" in p for p in prompts)  # MME, POPE


# -- bench train ----------------------------------------------------------------------------------------


def test_bench_train_rows_and_the_flops_formula():
    from visionzip_eval.tuning.cost import bench_train

    rows, info = bench_train(budgets=("full", 64), parts=("projector",), repeats=1, tiny=True, progress=lambda _: None)
    full, reduced = rows
    assert (full["visual_tokens"], reduced["visual_tokens"]) == (576, 64)
    assert full["sequence"] - reduced["sequence"] == 512
    assert reduced["flops_predicted_speedup"] > 1 and reduced["memory_ratio"] > 1
    assert full["saved_mib"] > reduced["saved_mib"] > 0 and reduced["step_ms"] > 0
    assert info["device"] == "cpu" and "saved_tensors_hooks" in info["memory"]


def test_step_flops_formula():
    from visionzip_eval.backends import backend_for
    from visionzip_eval.profiling import DecoderShape, prefill_flops
    from visionzip_eval.backends.llava_hf import build_tiny_llava
    from visionzip_eval.tuning.cost import step_flops

    model, _ = build_tiny_llava(seed=0)
    backend = backend_for(model)
    shape = DecoderShape.from_config(model.config.text_config)
    n, k = 100, 64
    vision = backend.vision_flops(k)
    llm = prefill_flops(shape, n, logits_tokens=n)
    assert step_flops(backend, shape, n, k, "all") == 3 * (vision + llm)
    attention = 4 * shape.layers * n * n * shape.heads * shape.head_dim
    projector = 2 * k * (64 * 64 + 64 * 64)
    assert step_flops(backend, shape, n, k, "projector") == (vision - projector) + 3 * projector + 2 * (
        llm - attention) + 3 * attention


# -- the report: runs of a tuned checkpoint are VisionZip‡ rows beside the untuned ones ------------------


def test_report_labels_runs_of_a_tuned_checkpoint_with_the_double_dagger(tmp_path, monkeypatch):
    from visionzip_eval.report.collect import load_results
    from synthetic import MODEL as BASE, PRETRAINED, SCORES, make_results, write_run
    from visionzip_eval.report.tables import score_tables

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / TUNING_JSON).write_text(json.dumps({"base_model": PRETRAINED, "method": "visionzip",
                                                              "budget": "64", "trained": ["projector"]}))
    root = make_results(tmp_path / "sweep", problems=False)
    better = {task: {k: v * 1.02 for k, v in metrics.items()} for task, metrics in SCORES[("visionzip", "64")].items()}
    for task, metrics in better.items():
        write_run(root / "runs", "tuned", "tuned", "visionzip", "64", task, metrics, tokens=64)
    (block,) = score_tables(load_results(root))
    assert block.title.startswith(BASE)
    frame = block.frame.set_index("label")
    assert {"Vanilla", "VisionZip", "VisionZip‡"} <= set(frame.index)
    dagger, plain = frame.loc["VisionZip‡"], frame[(frame.index == "VisionZip") & (frame["budget"] == "64")].iloc[0]
    assert dagger["group"] == plain["group"] and dagger["GQA"] == pytest.approx(plain["GQA"] * 1.02)
    assert dagger["Avg"] > plain["Avg"]  # against the untuned model's full budget
    assert any("‡" in note and "visionzip-eval tune" in note for note in block.notes)


def test_the_sweep_records_the_checkpoint_tuning_in_run_json_and_the_report_reads_it_there(tmp_path, monkeypatch):
    """The provenance travels in run.json, read when the run ran: the report needs neither the
    checkpoint folder nor the directory the sweep ran in."""
    from visionzip_eval.records import read_run_json
    from visionzip_eval.report.collect import collect
    from synthetic import PRETRAINED
    from visionzip_eval.sweep.config import SweepConfig
    from visionzip_eval.sweep.plan import plan
    from visionzip_eval.sweep.runner import ModelCache, execute_run, run_dir

    monkeypatch.chdir(tmp_path)
    record = {"base_model": PRETRAINED, "method": "visionzip", "budget": "64", "trained": ["projector"]}
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / TUNING_JSON).write_text(json.dumps(record))
    config = SweepConfig.model_validate(dict(
        name="t", models=[{"name": "tuned", "pretrained": "tuned"}], budgets=[64], tasks=["pope"]))
    (run,) = plan(config)
    out = tmp_path / "out"
    outcome = execute_run(run, config, out, ModelCache("cpu"),
                          evaluate=lambda *args: {"metrics": {"pope_f1_score,none": 0.8}})
    assert outcome.status == "ok" and read_run_json(run_dir(out, run))["tuning"] == record
    (tmp_path / "tuned" / TUNING_JSON).unlink()
    monkeypatch.chdir(tmp_path / "out")
    row = collect(out).iloc[0]
    assert (row["tuned_from"], row["tuned_method"], row["tuned_budget"]) == (PRETRAINED, "visionzip", "64")


def test_final_loss_is_the_last_steps_even_between_logging_steps(dataset_dir, tmp_path):
    """`tune --max-steps 1` with the default --logging-steps 10 printed "final loss None"."""
    record = tune(options(dataset_dir, tmp_path / "one", max_steps=1, logging_steps=10), log=lambda _: None)
    assert record["steps"] == 1 and math.isfinite(record["final_loss"])
    assert record["loss_history"][-1] == {"step": 1, "loss": record["final_loss"]}
    assert read_tuning(tmp_path / "one")["final_loss"] == record["final_loss"]
