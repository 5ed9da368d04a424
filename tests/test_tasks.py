"""The lmms-eval tasks under tasks/: smoke sets, local-snapshot variants, their data and scripts.

CPU-only and offline: tasks are built through lmms-eval's TaskManager with `--include_path
tasks` semantics, fed the gold answers (perfect score) and wrong ones (lower score) through
lmms-eval's own process_results and aggregation functions.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from visionzip_eval import datasets as vz_data

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tasks"
SMOKE_DATA = TASKS / "visionzip_smoke" / "data"
SMOKE = ["visionzip_smoke_gqa", "visionzip_smoke_mmbench", "visionzip_smoke_mme", "visionzip_smoke_pope", "visionzip_smoke_videomme"]
LOCAL = ["visionzip_local_gqa", "visionzip_local_mmbench_en_dev", "visionzip_local_mme", "visionzip_local_pope", "visionzip_local_videomme"]
BENCH_OF = dict(zip(SMOKE + LOCAL, ["gqa", "mmbench", "mme", "pope", "videomme"] * 2))


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="session", autouse=True)
def isolated_datasets_cache(tmp_path_factory):
    """lmms-eval caches every parquet load under its datasets cache: keep ours out of ~/.cache."""
    old = os.environ.get("LMMS_EVAL_DATASETS_CACHE")
    os.environ["LMMS_EVAL_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    yield
    if old is None:
        os.environ.pop("LMMS_EVAL_DATASETS_CACHE", None)
    else:
        os.environ["LMMS_EVAL_DATASETS_CACHE"] = old


@pytest.fixture(scope="session")
def task_manager():
    # include_defaults=False: indexing lmms-eval's ~thousand built-in YAMLs costs ~15 s;
    # test_names_not_shadowed_by_builtins does it once with the defaults.
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)


def flatten(task_dict) -> dict:
    out = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.update(flatten(value))
        else:
            out[key] = value
    return out


def load_tasks(task_manager, names) -> dict:
    from lmms_eval.tasks import get_task_dict

    return flatten(get_task_dict(list(names), task_manager))


@pytest.fixture(scope="session")
def smoke(task_manager):
    return load_tasks(task_manager, ["visionzip_smoke", "visionzip_smoke_broken"])


def docs(task):
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


def score(task, responses, output_path) -> dict:
    """What lmms-eval's evaluator does after generation: process_results per doc, then the
    task's aggregation per metric (with `args` for the aggregations that take it)."""
    per_metric: dict[str, list] = {}
    for doc, response in zip(docs(task), responses):
        for metric, value in task.process_results(doc, [response]).items():
            per_metric.setdefault(metric, []).append(value)
    out = {}
    for metric, items in per_metric.items():
        aggregate = task.aggregation()[metric]
        if "args" in inspect.signature(aggregate).parameters:
            out[metric] = aggregate(items, args=SimpleNamespace(output_path=str(output_path)))
        else:
            out[metric] = aggregate(items)
    return out


def gold(task_name, doc) -> str:
    return doc["answer"]


def metric_names(task) -> set[str]:
    return {m["metric"] for m in task.config.metric_list}


def check_visuals(task, doc):
    from PIL import Image

    visuals = task.doc_to_visual(doc)
    assert isinstance(visuals, list) and len(visuals) == 1
    if BENCH_OF.get(task.config.task) == "videomme" or task.config.task.endswith("_video"):
        assert isinstance(visuals[0], str) and visuals[0].endswith(".mp4") and Path(visuals[0]).is_file()
    else:
        assert isinstance(visuals[0], Image.Image) and visuals[0].mode == "RGB"


# ---------------------------------------------------------------- smoke tasks

EXPECTED_METRICS = {
    "gqa": {"exact_match"},
    "mmbench": {"gpt_eval_score", "submission"},
    "mme": {"mme_perception_score", "mme_cognition_score"},
    "pope": {"pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"},
    "videomme": {"videomme_perception_score"},
}


def test_smoke_group_and_tasks_build(smoke):
    assert set(SMOKE) | {"visionzip_smoke_broken_image", "visionzip_smoke_broken_video"} == set(smoke)
    for name in SMOKE:
        task = smoke[name]
        assert 20 <= len(docs(task)) <= 30
        assert metric_names(task) == EXPECTED_METRICS[BENCH_OF[name]]


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_docs_prompts_and_visuals(smoke, name):
    task = smoke[name]
    for doc in docs(task):
        text = task.doc_to_text(doc)
        assert isinstance(text, str) and text.strip()
        check_visuals(task, doc)


def test_smoke_prompts_are_lmms_evals(smoke):
    pope = docs(smoke["visionzip_smoke_pope"])[0]
    assert smoke["visionzip_smoke_pope"].doc_to_text(pope) == "Is there a person in the image?\nAnswer the question using a single word or phrase."
    mmbench = smoke["visionzip_smoke_mmbench"]
    assert mmbench.doc_to_text(docs(mmbench)[0]) == (
        "What is the profession of the person in the image? There are several options:\n"
        "A. astronaut\nB. chef\nC. firefighter\nD. doctor\n\nAnswer with the option's letter from the given choices directly."
    )
    video = smoke["visionzip_smoke_videomme"]
    text = video.doc_to_text(docs(video)[0])
    assert "A. A rocket\nB. A ship" in text and text.endswith("Answer with the option's letter from the given choices directly.")


def test_mme_smoke_comes_in_complete_pairs(smoke):
    from collections import Counter

    rows = docs(smoke["visionzip_smoke_mme"])
    pairs = Counter(r["question_id"] for r in rows)
    assert set(pairs.values()) == {2}
    for qid in pairs:
        assert sorted(r["answer"] for r in rows if r["question_id"] == qid) == ["No", "Yes"]
        assert len({r["category"] for r in rows if r["question_id"] == qid}) == 1


PERFECT = {
    "visionzip_smoke_gqa": {"exact_match": 1.0},
    "visionzip_smoke_mmbench": {"gpt_eval_score": 100.0},
    "visionzip_smoke_mme": {"mme_perception_score": 200.0 * 7, "mme_cognition_score": 200.0 * 3},
    "visionzip_smoke_pope": {"pope_accuracy": 1.0, "pope_precision": 1.0, "pope_recall": 1.0, "pope_f1_score": 1.0, "pope_yes_ratio": 0.5},
    "visionzip_smoke_videomme": {"videomme_perception_score": 100.0},
}


@pytest.mark.parametrize("name", SMOKE)
def test_gold_answers_score_perfectly(smoke, name, tmp_path):
    task = smoke[name]
    scores = score(task, [gold(name, d) for d in docs(task)], tmp_path)
    for metric, expected in PERFECT[name].items():
        assert scores[metric] == pytest.approx(expected), (metric, scores)


def wrong_answers(name, rows) -> list[str]:
    if name == "visionzip_smoke_gqa":
        return [r["answer"] if i % 2 else "banana" for i, r in enumerate(rows)]  # half wrong
    if name in ("visionzip_smoke_mme", "visionzip_smoke_pope"):
        flip = {"yes": "no", "no": "yes"}
        return [r["answer"] if i % 3 == 1 else flip[r["answer"].lower()] for i, r in enumerate(rows)]  # both yes->no and no->yes
    if name == "visionzip_smoke_mmbench":  # one rotation of question 0 wrong: question 0 fails
        return ["B" if r["index"] == 1_000_000 else r["answer"] for r in rows]
    if name == "visionzip_smoke_videomme":
        return [r["answer"] if i % 2 else "The answer is D." for i, r in enumerate(rows)]
    raise KeyError(name)


@pytest.mark.parametrize("name", SMOKE)
def test_wrong_answers_score_lower(smoke, name, tmp_path):
    task = smoke[name]
    rows = docs(task)
    scores = score(task, wrong_answers(name, rows), tmp_path)
    for metric, perfect in PERFECT[name].items():
        if metric != "pope_yes_ratio":  # a property of the ground truth, not of the answers
            assert scores[metric] < perfect, (metric, scores)
    if name == "visionzip_smoke_mmbench":
        assert scores["gpt_eval_score"] == pytest.approx(100.0 * 6 / 7)  # circular: all rotations or nothing
    if name == "visionzip_smoke_gqa":
        assert scores["exact_match"] == pytest.approx(0.5)


def test_gqa_exact_match_ignores_case_and_punctuation(smoke, tmp_path):
    task = smoke["visionzip_smoke_gqa"]
    scores = score(task, [d["answer"].upper() + "." for d in docs(task)], tmp_path)
    assert scores["exact_match"] == pytest.approx(1.0)


def test_mmbench_writes_static_results_not_the_judge(smoke, tmp_path, monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("MMBench static evaluation must not call the OpenAI judge")

    monkeypatch.setattr(requests, "post", no_network)
    task = smoke["visionzip_smoke_mmbench"]
    # free-form answers the static extractor can still read, and one it cannot
    responses = [f"The answer is {d['answer']}." for d in docs(task)]
    responses[0] = "I am not sure."
    scores = score(task, responses, tmp_path)
    assert scores["gpt_eval_score"] == pytest.approx(100.0 * 6 / 7)
    assert (tmp_path / "submissions" / "mmbench_en_dev_static_results.json").is_file()


# ---------------------------------------------------------------- broken samples


def test_broken_tasks_fail_one_sample_each_at_doc_to_visual(smoke, tmp_path):
    import PIL

    image_task, video_task = smoke["visionzip_smoke_broken_image"], smoke["visionzip_smoke_broken_video"]
    assert len(docs(image_task)) == 6 and len(docs(video_task)) == 4  # rows read without decoding
    failures = {}
    for task in (image_task, video_task):
        for i, doc in enumerate(docs(task)):
            task.doc_to_text(doc)
            try:
                check_visuals(task, doc)
            except Exception as error:  # what the adapter catches per sample
                failures[(task.config.task, i)] = error
    assert set(failures) == {("visionzip_smoke_broken_image", 1), ("visionzip_smoke_broken_video", 2)}
    assert isinstance(failures[("visionzip_smoke_broken_image", 1)], PIL.UnidentifiedImageError)
    assert isinstance(failures[("visionzip_smoke_broken_video", 2)], FileNotFoundError)
    # a failed sample answered with "" still scores (as wrong), the others count normally
    rows = docs(image_task)
    scores = score(image_task, ["" if i == 1 else r["answer"] for i, r in enumerate(rows)], tmp_path)
    assert scores["pope_accuracy"] == pytest.approx(5 / 6)
    rows = docs(video_task)
    scores = score(video_task, ["" if i == 2 else r["answer"] for i, r in enumerate(rows)], tmp_path)
    assert scores["videomme_perception_score"] == pytest.approx(75.0)


# ---------------------------------------------------------------- smoke data


def test_smoke_yaml_data_files_are_the_layout(smoke):
    """The smoke data is a data root in the local-snapshot layout (visionzip_eval.datasets)."""
    for name in SMOKE:
        bench = BENCH_OF[name]
        configured = smoke[name].config.dataset_kwargs["data_files"]
        expected = vz_data.data_files(bench, root=SMOKE_DATA)
        assert {s: [str(Path(p).resolve())] for s, p in configured.items()} == {s: [str(Path(p).resolve()) for p in f] for s, f in expected.items()}


def test_smoke_data_small_and_complete():
    files = [p for p in SMOKE_DATA.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5 * 2**20
    assert not [p for p in files if p.name.endswith(".partial")]
    import pyarrow.parquet as pq

    (questions,) = vz_data.split_files(SMOKE_DATA, "videomme", "test")
    for video_id in set(pq.read_table(questions, columns=["videoID"]).column("videoID").to_pylist()):
        vz_data.resolve_video(vz_data.videos_dir(SMOKE_DATA), video_id)  # raises if one is missing


@pytest.mark.slow
def test_smoke_data_is_reproducible(capsys):
    """scripts/make_smoke_data.py --check: regenerating gives byte-identical files."""
    code, out = run_main("make_smoke_data", ["--check"], capsys)
    assert code == 0, out


# ---------------------------------------------------------------- local-snapshot tasks


def tiny_hub_datasets():
    """A few rows per benchmark in the hub schemas (taken from the smoke data)."""
    import datasets
    import pyarrow.parquet as pq

    def rows(bench, split, n, config=None):
        (path,) = vz_data.split_files(SMOKE_DATA, bench, split, config)
        return datasets.Dataset(pq.read_table(path)).select(range(n))  # in memory: features from the file

    return {
        ("gqa", "testdev_balanced_instructions", "testdev"): rows("gqa", "testdev", 3, "testdev_balanced_instructions"),
        ("gqa", "testdev_balanced_images", "testdev"): rows("gqa", "testdev", 1, "testdev_balanced_images"),
        ("mmbench", "en", "dev"): rows("mmbench", "dev", 2, "en"),
        ("mme", None, "test"): rows("mme", "test", 2),
        ("pope", None, "test"): rows("pope", "test", 3),
        ("videomme", None, "test"): rows("videomme", "test", 3),
    }


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def snapshot_root(tmp_path_factory):
    """A data root written by scripts/snapshot_datasets.py itself, with the hub replaced by
    tiny in-memory datasets: what the script writes is what the local tasks read."""
    import datasets

    tiny = tiny_hub_datasets()
    script = load_script("snapshot_datasets")
    root = tmp_path_factory.mktemp("visionzip_data")
    by_repo = {b.repo_id: key for key, b in vz_data.BENCHMARKS.items()}
    calls = []

    def fake_load_dataset(repo_id, config, split, revision=None, token=None):
        calls.append((repo_id, config, split))
        return tiny[(by_repo[repo_id], config, split)]

    original, original_rev = datasets.load_dataset, script.resolved_revision
    datasets.load_dataset, script.resolved_revision = fake_load_dataset, lambda *a: "0" * 40
    try:
        assert script.main(["--root", str(root)]) == 0
    finally:
        datasets.load_dataset, script.resolved_revision = original, original_rev
    assert len(calls) == 6
    # VideoMME's videos: as the hub archives unpack them (data/<videoID>.mp4), via the script's unzip
    archive = root / "videos_chunked_01.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for video_id in {r["videoID"] for r in tiny[("videomme", None, "test")]}:
            zf.write(vz_data.resolve_video(vz_data.videos_dir(SMOKE_DATA), video_id), f"data/{video_id}.mp4")
    assert script._extract(archive, root / "videomme") == 1
    archive.unlink()
    return root


def test_snapshot_layout(snapshot_root):
    files = sorted(str(p.relative_to(snapshot_root)) for p in snapshot_root.rglob("*") if p.is_file())
    assert files == [
        "gqa/SNAPSHOT.json",
        "gqa/testdev_balanced_images/testdev-00000-of-00001.parquet",
        "gqa/testdev_balanced_instructions/testdev-00000-of-00001.parquet",
        "mmbench/SNAPSHOT.json",
        "mmbench/en/dev-00000-of-00001.parquet",
        "mme/SNAPSHOT.json",
        "mme/default/test-00000-of-00001.parquet",
        "pope/SNAPSHOT.json",
        "pope/default/test-00000-of-00001.parquet",
        "videomme/SNAPSHOT.json",
        "videomme/data/vz_pan_rocket.mp4",
        "videomme/default/test-00000-of-00001.parquet",
    ]


@pytest.fixture
def local_tasks(task_manager, snapshot_root, monkeypatch):
    monkeypatch.setenv(vz_data.DATA_ENV, str(snapshot_root))
    return load_tasks(task_manager, LOCAL)


def test_local_tasks_read_the_data_root(local_tasks, snapshot_root, tmp_path):
    assert set(local_tasks) == set(LOCAL)
    sizes = {"gqa": 3, "mmbench": 2, "mme": 2, "pope": 3, "videomme": 3}
    for name, task in local_tasks.items():
        bench = BENCH_OF[name]
        rows = docs(task)
        assert len(rows) == sizes[bench]
        assert metric_names(task) == EXPECTED_METRICS[bench]
        for files in task.config.dataset_kwargs["data_files"].values():
            assert all(Path(f).is_relative_to(snapshot_root) for f in files)
        for doc in rows:
            assert task.doc_to_text(doc)
            check_visuals(task, doc)
        scores = score(task, [d["answer"] for d in rows], tmp_path)
        perfect = {"gqa": ("exact_match", 1.0), "mmbench": ("gpt_eval_score", 100.0), "mme": ("mme_perception_score", 200.0), "pope": ("pope_accuracy", 1.0), "videomme": ("videomme_perception_score", 100.0)}[bench]
        assert scores[perfect[0]] == pytest.approx(perfect[1]), (name, scores)


def test_local_tasks_on_the_smoke_data_root(task_manager, monkeypatch, tmp_path):
    """The smoke data is itself a valid data root: VISIONZIP_DATA=tasks/visionzip_smoke/data."""
    monkeypatch.setenv(vz_data.DATA_ENV, str(SMOKE_DATA))
    tasks = load_tasks(task_manager, ["visionzip_local_mme", "visionzip_local_videomme"])
    scores = score(tasks["visionzip_local_mme"], [d["answer"] for d in docs(tasks["visionzip_local_mme"])], tmp_path)
    assert scores["mme_perception_score"] == pytest.approx(1400.0)
    check_visuals(tasks["visionzip_local_videomme"], docs(tasks["visionzip_local_videomme"])[0])


def test_local_task_missing_data_says_where_and_how(task_manager, monkeypatch, tmp_path):
    monkeypatch.setenv(vz_data.DATA_ENV, str(tmp_path / "empty"))
    # lmms-eval's `!function` loader re-raises anything as ImportError("Failed to import
    # function ..."); our FileNotFoundError is its cause, printed just above it.
    with pytest.raises(ImportError) as error:
        load_tasks(task_manager, ["visionzip_local_pope"])
    assert isinstance(error.value.__cause__, FileNotFoundError)
    message = str(error.value.__cause__)
    assert str(tmp_path / "empty" / "pope" / "default") in message
    assert "VISIONZIP_DATA" in message and "snapshot_datasets.py" in message


def test_local_videomme_missing_video_raises_per_sample(local_tasks, snapshot_root):
    task = local_tasks["visionzip_local_videomme"]
    doc = dict(docs(task)[0], videoID="not_downloaded")
    with pytest.raises(FileNotFoundError, match="not_downloaded"):
        task.doc_to_visual(doc)


# ---------------------------------------------------------------- the layout helpers


def test_data_root_env(monkeypatch, tmp_path):
    monkeypatch.delenv(vz_data.DATA_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert vz_data.data_root() == Path("~/.cache/visionzip_eval/data").expanduser()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vz_data.data_root() == tmp_path / "xdg" / "visionzip_eval" / "data"
    monkeypatch.setenv("SOMEWHERE", str(tmp_path))
    monkeypatch.setenv(vz_data.DATA_ENV, "$SOMEWHERE/data")
    assert vz_data.data_root() == tmp_path / "data"
    assert vz_data.data_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_split_files_are_exact(tmp_path):
    directory = vz_data.subset_dir(tmp_path, "gqa")
    directory.mkdir(parents=True)
    for name in ["testdev-00000-of-00002.parquet", "testdev-00001-of-00002.parquet", "test-00000-of-00001.parquet", "testdev-00000-of-00001.parquet.partial"]:
        (directory / name).touch()
    assert [p.name for p in vz_data.split_files(tmp_path, "gqa", "testdev")] == ["testdev-00000-of-00002.parquet", "testdev-00001-of-00002.parquet"]
    assert [p.name for p in vz_data.split_files(tmp_path, "gqa", "test")] == ["test-00000-of-00001.parquet"]


def test_write_split_shards_and_replaces(tmp_path):
    import datasets

    table = datasets.Dataset.from_dict({"question_id": [str(i) for i in range(10)], "question": ["q"] * 10, "answer": ["yes"] * 10, "image": [None] * 10, "category": ["random"] * 10})
    first = vz_data.write_split(table, tmp_path, "pope", "test", max_shard_bytes=100)
    assert len(first) > 1
    second = vz_data.write_split(table, tmp_path, "pope", "test")
    assert [p.name for p in second] == ["test-00000-of-00001.parquet"]
    assert vz_data.split_files(tmp_path, "pope", "test") == second
    with pytest.raises(ValueError, match="lacks columns"):
        vz_data.write_split(table.remove_columns("answer"), tmp_path, "pope", "test")


def test_extract_refuses_paths_outside_target(tmp_path):
    script = load_script("snapshot_datasets")
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(RuntimeError, match="outside"):
        script._extract(archive, tmp_path / "target")


def run_main(script_name, argv, capsys) -> tuple[int, str]:
    """A script's main() in this process (a fresh interpreter would pay ~8 s importing torch)."""
    try:
        code = load_script(script_name).main(argv)
    except SystemExit as exit_:  # argparse --help
        code = exit_.code
    return code, capsys.readouterr().out


def test_snapshot_script_help_and_dry_run(tmp_path, capsys):
    code, help_text = run_main("snapshot_datasets", ["--help"], capsys)
    assert code == 0 and "--videos" in help_text and "100 GB" in help_text and "VISIONZIP_DATA" in help_text
    code, out = run_main("snapshot_datasets", ["--dry-run", "--root", str(tmp_path)], capsys)
    assert code == 0
    for key, bench in vz_data.BENCHMARKS.items():
        for subset in bench.subsets:
            assert str(vz_data.subset_dir(tmp_path, key, subset.config)) in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_make_smoke_data_help(capsys):
    code, out = run_main("make_smoke_data", ["--help"], capsys)
    assert code == 0 and "--check" in out and "--out" in out


# ---------------------------------------------------------------- agreement with lmms-eval


@pytest.mark.parametrize("bench", sorted(vz_data.BENCHMARKS))
def test_layout_matches_builtin_task(bench):
    """Repo ids, configs, splits and the task settings are those of lmms-eval's built-in task."""
    import lmms_eval
    from lmms_eval.utils import load_yaml_config

    builtin_dir = Path(lmms_eval.__file__).parent / "tasks"
    spec = vz_data.BENCHMARKS[bench]
    yaml_name = {"gqa": "gqa/gqa.yaml", "mmbench": "mmbench/mmbench_en_dev_static.yaml", "mme": "mme/mme.yaml", "pope": "pope/pope.yaml", "videomme": "videomme/videomme.yaml"}[bench]
    builtin = load_yaml_config(str(builtin_dir / yaml_name), mode="full")
    assert builtin["task"] == spec.builtin_task
    assert builtin["dataset_path"] == spec.repo_id
    assert builtin.get("dataset_name") == spec.questions.config
    assert builtin["test_split"] in spec.questions.splits
    if bench == "gqa":  # its images come from a second config of the same repo
        source = (builtin_dir / "gqa" / "utils.py").read_text()
        images = spec.subsets[1]
        assert f'load_dataset("{spec.repo_id}", "{images.config}", split="{images.splits[0]}"' in source

    ours = load_yaml_config(str(TASKS / "visionzip_local" / f"{spec.local_task}.yaml"), mode="simple")
    for key in ("output_type", "test_split", "generation_kwargs", "lmms_eval_specific_kwargs", "doc_to_target", "model_specific_generation_kwargs", "cluster_key"):
        assert ours.get(key) == builtin.get(key), key
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in builtin["metric_list"]]
    ours_full = load_yaml_config(str(TASKS / "templates" / f"_{spec.local_task.removeprefix('visionzip_local_')}_template_yaml"), mode="full")
    for key in ("doc_to_text", "process_results", "doc_to_visual"):
        if key in ours_full and key in builtin:
            assert ours_full[key].__code__.co_filename == builtin[key].__code__.co_filename, key
            assert ours_full[key].__name__ == builtin[key].__name__, key
    for mine, theirs in zip(ours_full["metric_list"], builtin["metric_list"]):
        if callable(theirs.get("aggregation")):
            assert mine["aggregation"].__name__ == theirs["aggregation"].__name__


@pytest.mark.slow
def test_end_to_end_through_lmms_evals_evaluator(task_manager, tmp_path, monkeypatch):
    """lmms-eval's simple_evaluate with an oracle model that loads every visual (as a model
    adapter does) and answers the gold answer; a sample whose visual fails is answered ""."""
    from lmms_eval.api.model import lmms
    from lmms_eval.evaluator import simple_evaluate

    class Oracle(lmms):
        def __init__(self):
            super().__init__()
            self.failed = []

        def generate_until(self, requests):
            answers = []
            for request in requests:
                _, _, doc_to_visual, doc_id, task, split = request.args
                doc = self.task_dict[task][split][doc_id]
                try:
                    doc_to_visual(doc)
                except Exception as error:
                    self.failed.append((task, doc_id, type(error).__name__))
                    answers.append("")
                    continue
                answers.append(doc["answer"])
            return answers

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

    monkeypatch.chdir(tmp_path)  # MMBench writes submissions/ under the working directory
    model = Oracle()
    out = simple_evaluate(model=model, tasks=["visionzip_smoke", "visionzip_smoke_broken"], task_manager=task_manager, log_samples=False, bootstrap_iters=0)
    results = out["results"]
    for name, expected in PERFECT.items():
        for metric, value in expected.items():
            assert results[name][f"{metric},none"] == pytest.approx(value), (name, metric)
    assert sorted(model.failed) == [("visionzip_smoke_broken_image", 1, "UnidentifiedImageError"), ("visionzip_smoke_broken_video", 2, "FileNotFoundError")]
    assert results["visionzip_smoke_broken_image"]["pope_accuracy,none"] == pytest.approx(5 / 6)
    assert results["visionzip_smoke_broken_video"]["videomme_perception_score,none"] == pytest.approx(75.0)


@pytest.mark.slow
def test_names_not_shadowed_by_builtins():
    """Built-in task names win over --include_path ones: ours must resolve to our YAMLs."""
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS))
    for name in SMOKE + LOCAL + ["visionzip_smoke_broken_image", "visionzip_smoke_broken_video"]:
        assert Path(manager.task_index[name]["yaml_path"]).is_relative_to(TASKS), name
    for group in ("visionzip_smoke", "visionzip_smoke_broken"):
        assert manager.task_index[group]["type"] == "group"
        assert Path(manager.task_index[group]["yaml_path"]).is_relative_to(TASKS)


# ------------------------------------------------------------------ synthetic benchmark


def test_synth_tasks_load_generate_their_data_and_score_gold_perfectly(task_manager, tmp_path, monkeypatch):
    """visionzip_synth_*: data generated on first use under $VISIONZIP_DATA, the documented
    sizes, real images, and lmms-eval's scoring gives gold answers the perfect score."""
    from visionzip_eval.synth import benchmark

    monkeypatch.setenv("VISIONZIP_DATA", str(tmp_path / "data"))
    tasks = load_tasks(task_manager, ["visionzip_synth"])
    assert (benchmark.default_root() / ".complete").is_file()
    sizes = {"visionzip_synth_gqa": 240, "visionzip_synth_mmbench": 240, "visionzip_synth_mme": 240, "visionzip_synth_pope": 600}
    assert {name: len(docs(task)) for name, task in tasks.items()} == sizes
    perfect = {"gqa": ("exact_match", 1.0), "mmbench": ("gpt_eval_score", 100.0), "mme": ("mme_perception_score", 800.0),
               "pope": ("pope_f1_score", 1.0)}
    for name, task in tasks.items():
        check_visuals(task, docs(task)[0])
        metric, best = perfect[name.split("_")[-1]]
        scores = score(task, [gold(name, d) for d in docs(task)], tmp_path)
        assert scores[metric] == pytest.approx(best), (name, scores)
        wrong = score(task, ["no" if gold(name, d) != "no" else "yes" for d in docs(task)], tmp_path)
        assert wrong[metric] < best
