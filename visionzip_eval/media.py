"""Turning task visuals (PIL images, paths, bytes, videos) into RGB images, with clear errors."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}

# How a non-square image becomes the square tower input of LLaVA-1.5 (``image_aspect``; the
# llava-hf backend does the shaping):
# pad: paste it centred on a square of the processor's mean colour, then resize (the original
#      LLaVA-1.5, ``image_aspect_ratio=pad``, for training and evaluation; the paper's setting);
# crop: resize the short side and centre-crop (transformers' CLIP processing, what the
#      llava-hf checkpoints' processors do).
IMAGE_ASPECTS = ("pad", "crop")


class MediaError(ValueError):
    """A visual could not be loaded: costs its sample, never the run."""


def is_video(visual) -> bool:
    return isinstance(visual, (str, os.PathLike)) and Path(visual).suffix.lower() in VIDEO_SUFFIXES


def load_image(visual) -> Image.Image:
    """A PIL image, a path, raw bytes or a datasets-style ``{"bytes": ...}`` dict -> RGB image."""
    try:
        if isinstance(visual, Image.Image):
            image = visual
        elif isinstance(visual, dict) and visual.get("bytes") is not None:
            image = Image.open(io.BytesIO(visual["bytes"]))
        elif isinstance(visual, (bytes, bytearray)):
            image = Image.open(io.BytesIO(visual))
        elif isinstance(visual, (str, os.PathLike)):
            image = Image.open(visual)
        else:
            raise MediaError(f"unsupported visual of type {type(visual).__name__}")
        image.load()
        return image.convert("RGB")
    except MediaError:
        raise
    except (OSError, ValueError, SyntaxError) as error:
        raise MediaError(f"broken image ({type(error).__name__}: {error})") from error


def parse_image_aspect(value) -> str | None:
    """``image_aspect`` as given (model_args, sweep config): ``pad``, ``crop`` or None (the
    checkpoint's own processing); anything else is refused on one line that names the fix."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "auto")):
        return None
    text = str(value).strip().lower()
    if text not in IMAGE_ASPECTS:
        raise ValueError(
            f"image_aspect must be pad or crop, got {value!r}: pad = square on the processor's mean colour "
            "(original LLaVA-1.5, the paper's setting), crop = resize and centre-crop (transformers' CLIP processing)"
        )
    return text


def sample_video_frames(path: str | os.PathLike, num_frames: int) -> list[Image.Image]:
    """``num_frames`` frames spread uniformly over the video (PyAV), as RGB images."""
    import av

    if not Path(path).is_file():
        raise MediaError(f"missing video file {path}")
    try:
        with av.open(str(path)) as container:
            total = container.streams.video[0].frames
            if total <= 0:  # container does not say: count in a first pass
                total = sum(1 for _ in container.decode(video=0))
                container.seek(0)
            if total <= 0:
                raise MediaError(f"video {path} has no frames")
            wanted = set(np.linspace(0, total - 1, min(num_frames, total)).round().astype(int).tolist())
            # Decode in order, keeping only the sampled frames (long videos never sit in memory).
            frames = [
                frame.to_image().convert("RGB")
                for index, frame in enumerate(container.decode(video=0))
                if index in wanted
            ]
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as error:
        raise MediaError(f"unreadable video {path} ({type(error).__name__}: {error})") from error
    if not frames:
        raise MediaError(f"video {path} has no frames")
    return frames


def _load_each(visuals, max_frames: int):
    """Yield ``(is_video, image or frames)`` per visual, in order."""
    if visuals is None:
        return
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    for visual in visuals:
        if is_video(visual):
            yield True, sample_video_frames(visual, max_frames)
        else:
            yield False, load_image(visual)


def load_visuals(visuals, max_frames: int) -> tuple[list[Image.Image], int]:
    """Flatten a task's visuals into images; videos become ``max_frames`` frames each.
    Returns ``(images, videos)`` where ``videos`` counts the videos among them."""
    images, videos = [], 0
    for video, loaded in _load_each(visuals, max_frames):
        if video:
            images.extend(loaded)
            videos += 1
        else:
            images.append(loaded)
    return images, videos


def load_visual_groups(visuals, max_frames: int) -> tuple[list[Image.Image], list[list[Image.Image]]]:
    """A task's visuals kept apart, for models with native video input: ``(images, videos)``
    where each video is its ``max_frames`` frames sampled uniformly."""
    images, videos = [], []
    for video, loaded in _load_each(visuals, max_frames):
        (videos if video else images).append(loaded)
    return images, videos
