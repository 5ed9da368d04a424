"""Hooks of the visionzip_local_* tasks: data under the data root ($VISIONZIP_DATA, see
visionzip_eval/datasets.py for the layout). Prompts and scoring are lmms-eval's own."""

from visionzip_eval.datasets import (
    data_root,
    gqa_process_docs_for,
    resolve_video,
    videos_dir,
)

# lmms-eval's gqa_process_docs loads the images config from the hub; this one reads
# <root>/gqa/testdev_balanced_images/ and adds the same `image` column.
gqa_process_docs = gqa_process_docs_for(data_root)


def videomme_doc_to_visual(doc):
    """[path of the video] from <root>/videomme/data/; FileNotFoundError when it is missing."""
    return [resolve_video(videos_dir(), doc["videoID"])]
