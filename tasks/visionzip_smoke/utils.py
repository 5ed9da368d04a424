"""Hooks of the visionzip_smoke* tasks. Their data sits in ./data in the same layout as a local
snapshot (visionzip_eval/datasets.py), written by scripts/make_smoke_data.py. Prompts and
scoring are lmms-eval's own."""

from pathlib import Path

from visionzip_eval.datasets import (
    decode_image,
    gqa_process_docs_for,
    resolve_video,
    videos_dir,
)

DATA = Path(__file__).resolve().parent / "data"

gqa_process_docs = gqa_process_docs_for(lambda: DATA)


def videomme_doc_to_visual(doc):
    """[path of the video] from ./data/videomme/data/; FileNotFoundError when it is missing."""
    return [resolve_video(videos_dir(DATA), doc["videoID"])]


def undecoded_images(dataset):
    """process_docs of visionzip_smoke_broken_image: keep the image cells as raw bytes.
    datasets decodes an Image column whenever a row is read, and lmms-eval reads rows while it
    builds the task and its requests, so a corrupt image would end the run there; undecoded, it
    fails only in doc_to_visual, inside the one sample that owns it."""
    import datasets

    return dataset.cast_column("image", datasets.Image(decode=False))


def broken_image_doc_to_visual(doc):
    """[RGB PIL image]; raises PIL.UnidentifiedImageError (an OSError) for the corrupt sample."""
    return [decode_image(doc["image"])]
