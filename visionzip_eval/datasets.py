"""Where the offline benchmark data lives, in one place.

The ``visionzip_local_*`` lmms-eval tasks (``tasks/visionzip_local/``), the smoke tasks
(``tasks/visionzip_smoke/``), ``scripts/snapshot_datasets.py`` (writes a snapshot of the hub
datasets) and ``scripts/make_smoke_data.py`` (writes the smoke data) all take their paths
from here, so what the script writes is what the tasks read.

Layout under a data root (``$VISIONZIP_DATA``; default ``~/.cache/visionzip_eval/data``)::

    <root>/<bench>/<config>/<split>-00000-of-00001.parquet

``<bench>`` is a key of :data:`BENCHMARKS`, ``<config>`` the hub dataset's config name
(``default`` when the built-in lmms-eval task names none) and the parquet files hold the hub
split with its columns unchanged (images embedded as ``{"bytes", "path"}``, as the hub stores
them). VideoMME's videos sit beside its questions exactly as lmms-eval unpacks them into
``$HF_HOME/videomme``: ``<root>/videomme/data/<videoID>.mp4`` (and ``subtitle/<videoID>.srt``).

The YAML hook: lmms-eval's ``!function a.b.c`` tag is ``getattr(importlib.import_module("a.b"),
"c")``, evaluated when the task YAML is loaded (``lmms_eval/utils.py: import_function``), and
``getattr`` accepts any attribute, not only functions. The module ``__getattr__`` below answers
``local_data_files_<bench>`` with the ``data_files`` mapping of the current data root, so a
YAML line ``data_files: !function visionzip_eval.datasets.local_data_files_pope`` reads
``$VISIONZIP_DATA`` at task-load time and hands ``datasets.load_dataset("parquet", ...)``
absolute paths (which then also appear in the run's dumped task config).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "VISIONZIP_DATA"
DEFAULT_CONFIG_DIR = "default"
VIDEO_EXTENSIONS = (".mp4", ".MP4", ".mkv")  # the order lmms-eval's videomme_doc_to_visual tries


@dataclass(frozen=True)
class Subset:
    """One hub config and the splits of it that a task reads."""

    config: str | None  # hub ``dataset_name``; None: the dataset's only/default config
    splits: tuple[str, ...]
    columns: tuple[str, ...]  # columns the tasks need (the hub has these, maybe more)

    @property
    def dirname(self) -> str:
        return self.config or DEFAULT_CONFIG_DIR


@dataclass(frozen=True)
class Benchmark:
    key: str  # directory under the data root; also the suffix of the task names
    repo_id: str  # hub dataset the built-in lmms-eval task reads (its ``dataset_path``)
    builtin_task: str  # the lmms-eval task our local variant mirrors
    local_task: str
    subsets: tuple[Subset, ...]  # subsets[0] holds the questions the task iterates over
    videos: bool = False
    notes: str = ""

    @property
    def questions(self) -> Subset:
        return self.subsets[0]


# Repo ids, configs and splits are those of the built-in task YAMLs of lmms-eval 0.7.3;
# tests/test_tasks.py checks them against the installed lmms-eval.
BENCHMARKS: dict[str, Benchmark] = {
    b.key: b
    for b in (
        Benchmark(
            key="gqa",
            repo_id="lmms-lab-encoder/GQA",
            builtin_task="gqa",
            local_task="visionzip_local_gqa",
            subsets=(
                Subset("testdev_balanced_instructions", ("testdev",), ("id", "imageId", "question", "answer")),
                Subset("testdev_balanced_images", ("testdev",), ("id", "image")),
            ),
            notes="questions and images are two configs, joined on imageId == id",
        ),
        Benchmark(
            key="mmbench",
            repo_id="lmms-lab-encoder/MMBench",
            builtin_task="mmbench_en_dev_static",
            local_task="visionzip_local_mmbench_en_dev",
            subsets=(
                Subset(
                    "en",
                    ("dev",),
                    ("index", "question", "hint", "answer", "A", "B", "C", "D", "category", "image", "source", "L2-category", "split"),
                ),
            ),
        ),
        Benchmark(
            key="mme",
            repo_id="lmms-lab-encoder/MME",
            builtin_task="mme",
            local_task="visionzip_local_mme",
            subsets=(Subset(None, ("test",), ("question_id", "image", "question", "answer", "category")),),
        ),
        Benchmark(
            key="pope",
            repo_id="lmms-lab-encoder/POPE",
            builtin_task="pope",
            local_task="visionzip_local_pope",
            subsets=(Subset(None, ("test",), ("question_id", "question", "answer", "image", "category")),),
        ),
        Benchmark(
            key="videomme",
            repo_id="lmms-eval/Video-MME",
            builtin_task="videomme",
            local_task="visionzip_local_videomme",
            subsets=(
                Subset(
                    None,
                    ("test",),
                    ("question_id", "videoID", "duration", "domain", "sub_category", "task_type", "question", "options", "answer"),
                ),
            ),
            videos=True,
            notes="videos (~100 GB of zip archives on the hub) unpack to videomme/data/",
        ),
    )
}


# --------------------------------------------------------------------------- paths


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$VISIONZIP_DATA``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)
    ``/visionzip_eval/data``. ``~`` and ``$VARS`` inside the value are expanded."""
    if root is None:
        root = os.environ.get(DATA_ENV, "").strip()
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
        root = os.path.join(cache, "visionzip_eval", "data")
    return Path(os.path.expanduser(os.path.expandvars(str(root)))).absolute()


def subset_dir(root: str | os.PathLike | None, bench: str, config: str | None = None) -> Path:
    subset = _subset(bench, config)
    return data_root(root) / bench / subset.dirname


def shard_name(split: str, index: int = 0, count: int = 1) -> str:
    """The hub's own shard naming: ``test-00000-of-00003.parquet``."""
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def _shard_pattern(split: str) -> re.Pattern:
    return re.compile(rf"{re.escape(split)}-\d{{5}}-of-\d{{5}}\.parquet")


def split_files(root: str | os.PathLike | None, bench: str, split: str, config: str | None = None) -> list[Path]:
    """The parquet shards of one split, sorted; [] when there are none."""
    directory = subset_dir(root, bench, config)
    if not directory.is_dir():
        return []
    pattern = _shard_pattern(split)  # exact: "test-*" must not pick up "testdev-*"
    return sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name))


def data_files(bench: str, config: str | None = None, root: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """``{split: [absolute parquet paths]}`` for ``datasets.load_dataset("parquet", data_files=...)``.
    Raises FileNotFoundError, naming the expected place and the fix, when a split is missing."""
    subset = _subset(bench, config)
    files = {}
    for split in subset.splits:
        found = split_files(root, bench, split, subset.config)
        if not found:
            where = subset_dir(root, bench, subset.config) / f"{split}-NNNNN-of-NNNNN.parquet"
            raise FileNotFoundError(
                f"{BENCHMARKS[bench].local_task}: no local data at {where} (data root {data_root(root)}). "
                f"Set ${DATA_ENV} to the data root, or on a machine with network run "
                f"`python scripts/snapshot_datasets.py --bench {bench}` (see tasks/README.md)."
            )
        files[split] = [str(p) for p in found]
    return files


def videos_dir(root: str | os.PathLike | None = None) -> Path:
    """Where VideoMME's videos live: ``<root>/videomme/data`` (lmms-eval's ``<cache>/data``)."""
    return data_root(root) / "videomme" / "data"


def resolve_video(directory: str | os.PathLike, video_id: str) -> str:
    """The file of ``video_id`` in ``directory`` (.mp4, .MP4 or .mkv, like lmms-eval).
    Raises FileNotFoundError (lmms-eval's own version calls sys.exit, ending the run)."""
    directory = Path(directory)
    for extension in VIDEO_EXTENSIONS:
        candidate = directory / f"{video_id}{extension}"
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"video {video_id!r} not found in {directory} (tried {', '.join(VIDEO_EXTENSIONS)})")


def _subset(bench: str, config: str | None = None) -> Subset:
    if bench not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {bench!r}; known: {', '.join(BENCHMARKS)}")
    benchmark = BENCHMARKS[bench]
    if config is None:
        return benchmark.questions
    for subset in benchmark.subsets:
        if subset.config == config:
            return subset
    raise KeyError(f"{bench} has no config {config!r}; known: {[s.config for s in benchmark.subsets]}")


# ----------------------------------------------------------------- the YAML hook


def __getattr__(name: str):
    """``local_data_files_<bench>``: the data_files mapping of the current data root.
    Read by ``!function visionzip_eval.datasets.local_data_files_<bench>`` in task YAMLs."""
    prefix = "local_data_files_"
    if name.startswith(prefix) and name[len(prefix) :] in BENCHMARKS:
        return data_files(name[len(prefix) :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------ writing the layout


def write_split(dataset, root: str | os.PathLike | None, bench: str, split: str, config: str | None = None, max_shard_bytes: int = 500 * 2**20) -> list[Path]:
    """Write a ``datasets.Dataset`` (one split, hub columns) as parquet shards into the layout.
    Shards are written to a temporary name and renamed, and old shards of the split removed,
    so an interrupted run never leaves a half-written split that the tasks would read."""
    subset = _subset(bench, config)
    missing = [c for c in subset.columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{bench}/{subset.dirname}/{split}: the dataset lacks columns {missing} that the tasks need")
    directory = subset_dir(root, bench, subset.config)
    directory.mkdir(parents=True, exist_ok=True)
    nbytes = getattr(getattr(dataset, "data", None), "nbytes", 0) or 0
    count = max(1, math.ceil(nbytes / max_shard_bytes)) if len(dataset) else 1
    count = min(count, max(1, len(dataset)))
    written = []
    for index in range(count):
        target = directory / shard_name(split, index, count)
        partial = target.with_name(target.name + ".partial")
        shard = dataset.shard(num_shards=count, index=index, contiguous=True) if count > 1 else dataset
        shard.to_parquet(str(partial))
        written.append((partial, target))
    for old in split_files(root, bench, split, subset.config):
        old.unlink()
    for partial, target in written:
        partial.replace(target)
    return [target for _, target in written]


# --------------------------------------------------------------- GQA image join


def join_gqa_images(questions, image_files: list[str | os.PathLike]):
    """lmms-eval's ``gqa_process_docs`` for local files: add an ``image`` column to the
    question rows from the ``testdev_balanced_images`` parquet files (``id`` -> image).

    The image bytes are copied as stored (no decode/re-encode), and the map gets a
    fingerprint from the inputs, so the joined table is built once and then reused from
    the datasets cache. A question whose image is missing gets ``image=None``."""
    import datasets
    import pyarrow.parquet as pq

    id2image: dict[str, dict] = {}
    digest = hashlib.sha256(f"join_gqa_images/v1:{getattr(questions, '_fingerprint', '')}".encode())
    for path in sorted(str(p) for p in image_files):
        stat = os.stat(path)
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        table = pq.read_table(path, columns=["id", "image"])
        for image_id, image in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
            id2image[str(image_id)] = image

    features = questions.features.copy()
    features["image"] = datasets.Image()

    def add_image(batch):
        return {"image": [id2image.get(str(i)) for i in batch["imageId"]]}

    return questions.map(
        add_image,
        batched=True,
        features=features,
        new_fingerprint=digest.hexdigest()[:32],
        desc="Joining GQA images",
    )


def gqa_process_docs_for(root_fn: Callable[[], Path]):
    """A ``process_docs`` for GQA questions under the data root ``root_fn()``."""

    def process_docs(questions):
        root = root_fn()
        files = data_files("gqa", config="testdev_balanced_images", root=root)["testdev"]
        return join_gqa_images(questions, files)

    return process_docs


# ------------------------------------------------------------- visuals helpers


def decode_image(value):
    """A datasets image cell (PIL image, or ``{"bytes", "path"}`` when not decoded) -> RGB PIL.
    Raises (PIL.UnidentifiedImageError, an OSError) when the bytes are not an image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            image = Image.open(value["path"])
        else:
            raise ValueError("image cell has neither bytes nor path")
        image.load()
        return image.convert("RGB")
    raise TypeError(f"unsupported image cell of type {type(value).__name__}")
