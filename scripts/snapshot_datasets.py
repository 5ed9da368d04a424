#!/usr/bin/env python
"""Snapshot the hub datasets of the five benchmarks into the local layout that the
`visionzip_local_*` lmms-eval tasks read (tasks/visionzip_local/, tasks/README.md).

Needs network access to the Hugging Face hub; run it once on a machine that has it, then copy
the data root to offline machines and point VISIONZIP_DATA at it.

What it fetches (the same hub datasets, configs and splits as lmms-eval's built-in tasks):

  gqa       lmms-eval's `gqa`: testdev_balanced_instructions + testdev_balanced_images (~0.1 GB)
  mmbench   lmms-eval's `mmbench_en_dev_static`: config en, split dev (~0.1 GB)
  mme       lmms-eval's `mme`: split test (~0.9 GB)
  pope      lmms-eval's `pope`: split test (~0.3 GB)
  videomme  lmms-eval's `videomme`: split test, questions only (<1 MB) unless --videos
            --videos also downloads the video archives and unpacks them: about 100 GB of zip
            files on the hub (downloaded one at a time and deleted after unpacking unless
            --keep-archives), about as much again once unpacked. Without the videos the
            visionzip_local_videomme task loads but every sample fails in doc_to_visual.

Layout written under the data root (default: $VISIONZIP_DATA, else ~/.cache/visionzip_eval/data):

  <root>/<bench>/<config or "default">/<split>-NNNNN-of-NNNNN.parquet   hub columns, unchanged
  <root>/videomme/data/<videoID>.mp4, <root>/videomme/subtitle/<videoID>.srt  (--videos)
  <root>/<bench>/SNAPSHOT.json   repo id, resolved revision, rows and files, when

Each split is written to temporary files and renamed at the end, so an interrupted run leaves
either the old split or the new one. Re-running overwrites the parquet splits; unpacked videos
that already exist are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from visionzip_eval.datasets import (
    BENCHMARKS,
    DATA_ENV,
    data_root,
    shard_name,
    split_files,
    subset_dir,
    videos_dir,
    write_split,
)


def plan(root: Path, benches: list[str], videos: bool) -> list[str]:
    """Human-readable list of what a run would do; --dry-run prints it (no network)."""
    lines = []
    for key in benches:
        bench = BENCHMARKS[key]
        for subset in bench.subsets:
            for split in subset.splits:
                target = subset_dir(root, key, subset.config) / shard_name(split)
                lines.append(f"{key}: load_dataset({bench.repo_id!r}, {subset.config!r}, split={split!r}) -> {target}")
        if bench.videos:
            if videos:
                lines.append(f"{key}: {bench.repo_id} *.zip (~100 GB) -> unpacked into {videos_dir(root).parent} (data/, subtitle/)")
            else:
                lines.append(f"{key}: videos skipped (add --videos, ~100 GB); the task expects {videos_dir(root)}/<videoID>.mp4")
    return lines


def resolved_revision(repo_id: str, revision: str | None, token) -> str | None:
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo_id, revision=revision, token=token).sha
    except Exception as error:  # the snapshot itself still works; the manifest says unknown
        print(f"  (could not resolve the revision of {repo_id}: {error})")
        return None


def snapshot_bench(root: Path, key: str, revision: str | None, token, max_shard_mb: int) -> dict:
    import datasets

    bench = BENCHMARKS[key]
    sha = resolved_revision(bench.repo_id, revision, token)
    manifest = {"repo_id": bench.repo_id, "requested_revision": revision, "revision": sha, "lmms_eval_task": bench.builtin_task, "splits": []}
    for subset in bench.subsets:
        for split in subset.splits:
            print(f"{key}: downloading {bench.repo_id} config={subset.config} split={split}")
            dataset = datasets.load_dataset(bench.repo_id, subset.config, split=split, revision=sha or revision, token=token)
            files = write_split(dataset, root, key, split, config=subset.config, max_shard_bytes=max_shard_mb * 2**20)
            print(f"  {len(dataset)} rows -> {', '.join(str(f) for f in files)}")
            manifest["splits"].append(
                {"config": subset.config, "split": split, "rows": len(dataset), "columns": dataset.column_names, "files": [str(f.relative_to(root)) for f in files]}
            )
    return manifest


def _extract(archive: Path, target: Path) -> int:
    """Unpack like lmms-eval does (member paths kept, existing files skipped); returns files written."""
    written = 0
    target_resolved = target.resolve()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            destination = (target / info.filename).resolve()
            if target_resolved not in destination.parents and destination != target_resolved:
                raise RuntimeError(f"{archive}: member {info.filename!r} would unpack outside {target}")
            if info.is_dir() or destination.exists():
                continue
            zf.extract(info, target)
            written += 1
    return written


def snapshot_videos(root: Path, revision: str | None, token, keep_archives: bool) -> dict:
    from huggingface_hub import HfApi, hf_hub_download

    bench = BENCHMARKS["videomme"]
    target = videos_dir(root).parent  # <root>/videomme: archives hold data/... and subtitle/...
    archive_dir = target / "_archives"
    names = sorted(f for f in HfApi().list_repo_files(bench.repo_id, repo_type="dataset", revision=revision, token=token) if f.endswith(".zip"))
    print(f"videomme: {len(names)} archives in {bench.repo_id}: {', '.join(names)}")
    for name in names:
        print(f"  downloading {name}")
        local = Path(hf_hub_download(bench.repo_id, name, repo_type="dataset", revision=revision, token=token, local_dir=archive_dir))
        written = _extract(local, target)
        print(f"  unpacked {written} new files into {target}")
        if not keep_archives:
            local.unlink()
    import pyarrow.parquet as pq

    video_ids = set()  # the questions were written just before, by snapshot_bench
    for path in split_files(root, "videomme", "test"):
        video_ids.update(pq.read_table(path, columns=["videoID"]).column("videoID").to_pylist())
    present = {p.stem for p in videos_dir(root).glob("*") if p.is_file()}
    missing = sorted(video_ids - present)
    if missing:
        print(f"  WARNING: {len(missing)} of {len(video_ids)} videos named by the questions are missing, e.g. {missing[:5]}")
    return {"archives": names, "videos": len(present), "missing_videos": missing}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help=f"data root to write (default: ${DATA_ENV}, else ~/.cache/visionzip_eval/data)")
    parser.add_argument("--bench", nargs="+", choices=sorted(BENCHMARKS), default=sorted(BENCHMARKS), help="benchmarks to fetch (default: all five)")
    parser.add_argument("--videos", action="store_true", help="also download and unpack VideoMME's videos (~100 GB of archives)")
    parser.add_argument("--keep-archives", action="store_true", help="keep the downloaded video zip files (in <root>/videomme/_archives)")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) for every dataset; default: main")
    parser.add_argument("--token", default=None, help="hub token; default: the one saved by `hf auth login` / $HF_TOKEN, if any")
    parser.add_argument("--max-shard-mb", type=int, default=500, help="split larger parquet outputs into shards of about this size (default 500)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched and where, touch nothing (no network)")
    args = parser.parse_args(argv)

    root = data_root(args.root)
    if args.dry_run:
        print(f"data root: {root}")
        for line in plan(root, args.bench, args.videos):
            print(line)
        return 0

    root.mkdir(parents=True, exist_ok=True)
    for key in args.bench:
        manifest = snapshot_bench(root, key, args.revision, args.token, args.max_shard_mb)
        if key == "videomme":
            if args.videos:
                manifest["videos"] = snapshot_videos(root, manifest["revision"] or args.revision, args.token, args.keep_archives)
            else:
                print(f"videomme: videos NOT downloaded (about 100 GB); re-run with --bench videomme --videos, or put them in {videos_dir(root)}")
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (root / key).mkdir(parents=True, exist_ok=True)
        (root / key / "SNAPSHOT.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"done. Use it with: export {DATA_ENV}={root}  and  --include_path {os.path.relpath(REPO / 'tasks')} --tasks visionzip_local_<bench>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
