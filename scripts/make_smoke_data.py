#!/usr/bin/env python
"""Write the smoke-test data of the `visionzip_smoke*` lmms-eval tasks (tasks/visionzip_smoke/).

Five tiny benchmarks in the hub datasets' own schemas and in the data-root layout of
visionzip_eval/datasets.py (<root>/<bench>/<config>/<split>-00000-of-00001.parquet):

  gqa       24 short-answer questions on 8 images (questions + images configs, joined on imageId)
  mmbench   7 A-D questions with their circular variants (index + k*1e6): 24 rows
  mme       12 images x 2 yes/no questions (MME scores complete pairs only)
  pope      24 yes/no object questions (adversarial / popular / random)
  videomme  8 generated 4-second videos x 3 multiple-choice questions

and, for the failure-path test `visionzip_smoke_broken`, broken/image_test.parquet (POPE schema,
one row's image bytes are not an image) and broken/video_test.parquet (VideoMME schema, one row
names a video that does not exist).

Images are real photographs that ship with scikit-image and matplotlib (no network), downscaled
to 256 px and stored as JPEG bytes; the MME cognition images are rendered text. The output is
deterministic: running the script twice gives byte-identical files (with the same Pillow,
PyAV/x264 and pyarrow versions). `--check` regenerates into a temporary folder and compares:
bytes, except for videos, whose decoded frames are compared (another x264 build writes other
bytes for the same frames).
"""

from __future__ import annotations

import argparse
import filecmp
import io
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from visionzip_eval.datasets import write_split

DEFAULT_OUT = REPO / "tasks" / "visionzip_smoke" / "data"
MAX_SIDE = 256
JPEG_QUALITY = 85
VIDEO_SIZE = (192, 144)
VIDEO_FPS = 8
VIDEO_SECONDS = 4


# ------------------------------------------------------------------ images


def source_image(name: str):
    """A photograph that ships inside an installed package, as an RGB PIL image."""
    from PIL import Image

    if name == "grace_hopper":
        from matplotlib import cbook

        return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.dtype == bool:
        array = np.where(array, 255, 0).astype(np.uint8)  # skimage's horse: True is the white background
    image = Image.fromarray(array)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        image = background
    return image.convert("RGB")


def rendered_text(lines: list[str], size=(320, 200)):
    """MME's cognition images are screenshots of text or code: render some."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=26)
    for i, line in enumerate(lines):
        draw.text((16, 16 + 36 * i), line, fill="black", font=font)
    return image


def jpeg(image) -> dict:
    """Downscaled JPEG bytes in the datasets image-cell form ``{"bytes", "path"}``."""
    from PIL import Image

    image = image.copy()
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return {"bytes": buffer.getvalue(), "path": None}


_CACHE: dict = {}


def photo(name: str) -> dict:
    if name not in _CACHE:
        _CACHE[name] = jpeg(source_image(name))
    return _CACHE[name]


# ------------------------------------------------------------------ GQA

GQA = [  # (image, question, answer, full answer)
    ("astronaut", "What is the woman holding?", "helmet", "The woman is holding a helmet."),
    ("astronaut", "Which side of the photo is the flag on?", "left", "The flag is on the left of the photo."),
    ("astronaut", "Is the woman smiling?", "yes", "Yes, the woman is smiling."),
    ("coffee", "What drink is in the cup?", "coffee", "The drink is coffee."),
    ("coffee", "What color is the saucer?", "red", "The saucer is red."),
    ("coffee", "What is on the saucer next to the cup?", "spoon", "The spoon is on the saucer."),
    ("chelsea", "What animal is this?", "cat", "This is a cat."),
    ("chelsea", "Is the cat looking at the camera?", "yes", "Yes, the cat is looking at the camera."),
    ("chelsea", "Is there a dog in the picture?", "no", "No, there is a cat."),
    ("rocket", "What is standing on the launch pad?", "rocket", "The rocket is standing on the launch pad."),
    ("rocket", "Is the sky dark?", "yes", "Yes, the sky is dark."),
    ("rocket", "What color is the rocket?", "white", "The rocket is white."),
    ("camera", "What is the man looking through?", "camera", "The man is looking through a camera."),
    ("camera", "What is the camera standing on?", "tripod", "The camera is standing on a tripod."),
    ("camera", "Is the photo in color?", "no", "No, the photo is black and white."),
    ("coins", "What objects are shown?", "coins", "The objects are coins."),
    ("coins", "Are the coins on a dark background?", "yes", "Yes, the coins are on a dark background."),
    ("coins", "Are there more than ten coins?", "yes", "Yes, there are more than ten coins."),
    ("grace_hopper", "What is the woman wearing on her head?", "hat", "The woman is wearing a hat."),
    ("grace_hopper", "Is the woman wearing glasses?", "yes", "Yes, the woman is wearing glasses."),
    ("grace_hopper", "Which side of the photo is the flag on?", "left", "The flag is on the left of the photo."),
    ("horse", "What animal is shown?", "horse", "The animal is a horse."),
    ("horse", "What color is the horse?", "black", "The horse is black."),
    ("horse", "Which direction is the horse facing?", "right", "The horse is facing right."),
]


def make_gqa(root: Path) -> None:
    import datasets

    image_ids = list(dict.fromkeys(name for name, *_ in GQA))
    images = datasets.Dataset.from_dict(
        {"id": [f"skimage_{n}" for n in image_ids], "image": [photo(n) for n in image_ids]},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()}),
    )
    questions = datasets.Dataset.from_dict(
        {
            "id": [f"vz{2000000 + i}" for i in range(len(GQA))],
            "imageId": [f"skimage_{n}" for n, *_ in GQA],
            "question": [q for _, q, _, _ in GQA],
            "answer": [a for _, _, a, _ in GQA],
            "fullAnswer": [f for *_, f in GQA],
            "isBalanced": [True] * len(GQA),
        },
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "imageId": datasets.Value("string"),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "fullAnswer": datasets.Value("string"),
                "isBalanced": datasets.Value("bool"),
            }
        ),
    )
    write_split(questions, root, "gqa", "testdev", config="testdev_balanced_instructions")
    write_split(images, root, "gqa", "testdev", config="testdev_balanced_images")


# ------------------------------------------------------------------ MMBench

MMBENCH = [  # (image, hint, question, options, correct index, category, L2-category)
    ("astronaut", None, "What is the profession of the person in the image?", ["astronaut", "chef", "firefighter", "doctor"], 0, "identity_reasoning", "attribute_reasoning"),
    ("coffee", None, "Which beverage is most likely in the cup?", ["coffee", "orange juice", "milk", "water"], 0, "attribute_recognition", "finegrained_perception (instance-level)"),
    ("chelsea", None, "What animal is shown in the image?", ["dog", "cat", "rabbit", "fox"], 1, "image_topic", "coarse_perception"),
    ("camera", None, "What is the style of this image?", ["black and white photograph", "oil painting", "cartoon", "watercolor sketch"], 0, "image_style", "coarse_perception"),
    ("rocket", "The photo was taken at a launch site.", "What time of day was the photo most likely taken?", ["morning", "noon", "night"], 2, "image_scene", "coarse_perception"),
    ("page", None, "What is the title of the text in the image?", ["Region-based segmentation", "Edge detection", "Image denoising"], 0, "ocr", "finegrained_perception (instance-level)"),
    ("grace_hopper", None, "Is the person in the image wearing glasses?", ["yes", "no"], 0, "attribute_recognition", "finegrained_perception (instance-level)"),
]


def make_mmbench(root: Path) -> None:
    """MMBench dev holds every question once per rotation of its options (circular evaluation):
    index i + k * 1e6 is rotation k of question i, and a question counts only if all are right."""
    import datasets

    rows = []
    for k in range(4):
        for i, (name, hint, question, options, correct, category, l2) in enumerate(MMBENCH):
            n = len(options)
            if k >= n:
                continue
            rotated = [options[(j + k) % n] for j in range(n)]
            letters = "ABCD"
            row = {
                "index": i + k * 1_000_000,
                "question": question,
                "hint": hint,
                "answer": letters[(correct - k) % n],
                **{letters[j]: (rotated[j] if j < n else None) for j in range(4)},
                "category": category,
                "image": photo(name),
                "source": "visionzip_smoke",
                "L2-category": l2,
                "comment": None,
                "split": "dev",
            }
            rows.append(row)
    string = datasets.Value("string")
    features = datasets.Features(
        {
            "index": datasets.Value("int64"),
            "question": string,
            "hint": string,
            "answer": string,
            "A": string,
            "B": string,
            "C": string,
            "D": string,
            "category": string,
            "image": datasets.Image(),
            "source": string,
            "L2-category": string,
            "comment": string,
            "split": string,
        }
    )
    dataset = datasets.Dataset.from_dict({key: [r[key] for r in rows] for key in features}, features=features)
    write_split(dataset, root, "mmbench", "dev", config="en")


# ------------------------------------------------------------------ MME

MME = [  # (category, image key, (yes question, no question))
    ("existence", "chelsea", ("Is there a cat in this image?", "Is there a dog in this image?")),
    ("existence", "astronaut", ("Is there a helmet in this image?", "Is there a bicycle in this image?")),
    ("count", "horse", ("Is there only one horse in this image?", "Are there two horses in this image?")),
    ("count", "coffee", ("Is there one cup in this image?", "Are there three cups in this image?")),
    ("position", "grace_hopper", ("Is the flag on the left side of the woman?", "Is the flag on the right side of the woman?")),
    ("color", "coffee", ("Is the saucer in this image red?", "Is the saucer in this image blue?")),
    ("celebrity", "grace_hopper", ("Is the person in this image Grace Hopper?", "Is the person in this image Marie Curie?")),
    ("scene", "camera", ("Is this photo taken in a place of grass field?", "Is this photo taken in a place of library?")),
    ("OCR", "page", ("Is the title of this page \"Region-based segmentation\"?", "Is the title of this page \"Edge detection\"?")),
    ("commonsense_reasoning", "coffee", ("Is the drink in this image usually served hot?", "Is the drink in this image usually served frozen?")),
    ("numerical_calculation", "text:12 + 7 = ?", ("Is the answer to the arithmetic question in the image 19?", "Is the answer to the arithmetic question in the image 21?")),
    ("code_reasoning", "text:x = 3|y = x * 4|print(y)", ("The image shows a python code. Is the output of the code '12'?", "The image shows a python code. Is the output of the code '7'?")),
]


def mme_image(key: str) -> dict:
    if key.startswith("text:"):  # "text:line 1|line 2": a rendered screenshot
        return jpeg(rendered_text(key[len("text:") :].split("|")))
    return photo(key)


def make_mme(root: Path) -> None:
    import datasets

    rows = []
    for number, (category, key, (yes_question, no_question)) in enumerate(MME):
        image = mme_image(key)
        question_id = f"{category}/{number:04d}.jpg"  # both questions of an image share it
        for question, answer in ((yes_question, "Yes"), (no_question, "No")):
            rows.append(
                {
                    "question_id": question_id,
                    "image": image,
                    "question": f"{question} Please answer yes or no.",
                    "answer": answer,
                    "category": category,
                }
            )
    string = datasets.Value("string")
    features = datasets.Features({"question_id": string, "image": datasets.Image(), "question": string, "answer": string, "category": string})
    dataset = datasets.Dataset.from_dict({key: [r[key] for r in rows] for key in features}, features=features)
    write_split(dataset, root, "mme", "test")


# ------------------------------------------------------------------ POPE

POPE = [  # (image, [(object, answer)] x 3)
    ("astronaut", [("person", "yes"), ("flag", "yes"), ("dog", "no")]),
    ("coffee", [("cup", "yes"), ("spoon", "yes"), ("laptop", "no")]),
    ("chelsea", [("cat", "yes"), ("dog", "no"), ("bowl", "no")]),
    ("rocket", [("rocket", "yes"), ("car", "no"), ("truck", "no")]),
    ("camera", [("camera", "yes"), ("person", "yes"), ("umbrella", "no")]),
    ("grace_hopper", [("tie", "yes"), ("hat", "yes"), ("dog", "no")]),
    ("horse", [("horse", "yes"), ("cow", "no"), ("person", "no")]),
    ("coins", [("coin", "yes"), ("banana", "no"), ("keyboard", "no")]),
]
POPE_CATEGORIES = ("adversarial", "popular", "random")


def pope_rows(entries, image_fn=photo) -> list[dict]:
    rows = []
    for i, (name, questions) in enumerate(entries):
        for j, (obj, answer) in enumerate(questions):
            number = len(rows) + 1
            article = "an" if obj[0] in "aeiou" else "a"
            rows.append(
                {
                    "id": str(number),
                    "question_id": str(number),
                    "question": f"Is there {article} {obj} in the image?",
                    "answer": answer,
                    "image_source": f"skimage_{name}",
                    "image": image_fn(name),
                    "category": POPE_CATEGORIES[(i + j) % 3],
                }
            )
    return rows


def pope_features():
    import datasets

    string = datasets.Value("string")
    return datasets.Features(
        {"id": string, "question_id": string, "question": string, "answer": string, "image_source": string, "image": datasets.Image(), "category": string}
    )


def make_pope(root: Path) -> None:
    import datasets

    rows = pope_rows(POPE)
    features = pope_features()
    dataset = datasets.Dataset.from_dict({key: [r[key] for r in rows] for key in features}, features=features)
    write_split(dataset, root, "pope", "test")


# ------------------------------------------------------------------ VideoMME


def ken_burns(image, boxes_from, boxes_to, frames):
    """Frames of a crop box moving linearly from one (left, top, right, bottom) to another."""
    from PIL import Image

    out = []
    for t in np.linspace(0.0, 1.0, frames):
        box = tuple(float(a + (b - a) * t) for a, b in zip(boxes_from, boxes_to))
        out.append(np.asarray(image.resize(VIDEO_SIZE, Image.Resampling.BILINEAR, box=box)))
    return out


def canvas(color=(255, 255, 255)):
    frame = np.empty((VIDEO_SIZE[1], VIDEO_SIZE[0], 3), np.uint8)
    frame[:] = color
    return frame


def video_frames(kind: str) -> list[np.ndarray]:
    n = VIDEO_FPS * VIDEO_SECONDS
    w, h = VIDEO_SIZE
    if kind == "pan_rocket":
        image = source_image("rocket")
        W, H = image.size
        return ken_burns(image, (0, H * 0.45, W * 0.8, H), (W * 0.2, 0, W, H * 0.55), n)
    if kind == "zoom_cat":
        image = source_image("chelsea")
        W, H = image.size
        return ken_burns(image, (0, 0, W, H), (W * 0.3, H * 0.15, W * 0.8, H * 0.65), n)
    if kind == "red_ball":
        frames = []
        yy, xx = np.mgrid[0:h, 0:w]
        for t in np.linspace(0.0, 1.0, n):
            frame = canvas()
            cx, cy, r = 20 + (w - 40) * t, h / 2, 16
            frame[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (220, 30, 30)
            frames.append(frame)
        return frames
    if kind == "squares":
        frames = []
        for i in range(n):
            frame = canvas()
            shown = min(4, 1 + i // VIDEO_FPS)  # one more square each second: 4 at the end
            for s in range(shown):
                x0 = 14 + s * 44
                frame[52:88, x0 : x0 + 36] = (30, 60, 200)
            frames.append(frame)
        return frames
    if kind == "slideshow":
        from PIL import Image

        pictures = [source_image(name) for name in ("astronaut", "coffee", "grace_hopper")]
        frames = []
        for i in range(n):
            picture = pictures[min(2, i * 3 // n)]
            frames.append(np.asarray(picture.resize(VIDEO_SIZE, Image.Resampling.BILINEAR)))
        return frames
    if kind == "scroll_text":
        image = source_image("page")
        W, H = image.size
        return ken_burns(image, (0, 0, W * 0.6, H * 0.6), (W * 0.4, H * 0.4, W, H), n)
    if kind == "color_cycle":
        colors = [(220, 30, 30), (30, 180, 60), (30, 60, 220)]
        return [canvas(colors[min(2, i * 3 // n)]) for i in range(n)]
    if kind == "horse_run":
        from PIL import Image

        horse = source_image("horse")
        horse.thumbnail((90, 90), Image.Resampling.LANCZOS)
        sprite = np.asarray(horse)
        mask = sprite.mean(axis=2) < 128
        frames = []
        for t in np.linspace(0.0, 1.0, n):
            frame = canvas((235, 225, 200))
            x0, y0 = int((w - sprite.shape[1]) * t), (h - sprite.shape[0]) // 2
            region = frame[y0 : y0 + sprite.shape[0], x0 : x0 + sprite.shape[1]]
            region[mask] = (0, 0, 0)
            frames.append(frame)
        return frames
    raise ValueError(kind)


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    """H.264 in MP4 (like VideoMME's videos), one encoder thread so the bytes are reproducible."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with av.open(str(partial), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "30", "preset": "medium", "threads": "1"}
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    partial.replace(path)


VIDEOS = [  # (videoID, kind, domain, sub_category, [(task_type, question, options, answer)])
    ("vz_pan_rocket", "pan_rocket", "Knowledge", "Technology", [
        ("Object Recognition", "What object is shown on the launch pad?", ["A rocket", "A ship", "A bridge", "A windmill"], "A"),
        ("Spatial Perception", "In which direction does the camera move?", ["Left", "Right", "Up", "Down"], "C"),
        ("Attribute Perception", "What is the lighting condition of the scene?", ["Bright daylight", "Night with artificial lights", "Foggy morning", "Sunset"], "B"),
    ]),
    ("vz_zoom_cat", "zoom_cat", "Life Record", "Pet & Animal", [
        ("Object Recognition", "What animal appears in the video?", ["Dog", "Cat", "Horse", "Bird"], "B"),
        ("Temporal Perception", "How does the view change over the video?", ["It zooms in", "It zooms out", "It rotates", "It stays still"], "A"),
        ("Attribute Perception", "What pattern does the animal's fur have?", ["Spotted", "Solid black", "Striped tabby", "Pure white"], "C"),
    ]),
    ("vz_red_ball", "red_ball", "Sports Competition", "Other Sports", [
        ("Attribute Perception", "What color is the ball?", ["Blue", "Green", "Red", "Yellow"], "C"),
        ("Action Recognition", "In which direction does the ball move?", ["From left to right", "From right to left", "From top to bottom", "It does not move"], "A"),
        ("Counting Problem", "How many balls appear in the video?", ["One", "Two", "Three", "Four"], "A"),
    ]),
    ("vz_squares", "squares", "Artistic Performance", "Magic Show", [
        ("Counting Problem", "How many squares are visible at the end of the video?", ["Two", "Three", "Four", "Five"], "C"),
        ("Temporal Reasoning", "How do the squares appear?", ["All at once", "One after another", "They fade out", "They merge into one"], "B"),
        ("Attribute Perception", "What color are the squares?", ["Blue", "Red", "Green", "Black"], "A"),
    ]),
    ("vz_slideshow", "slideshow", "Film & Television", "Documentary", [
        ("Temporal Perception", "Which picture is shown first?", ["A cup of coffee", "An astronaut", "A naval officer", "A cat"], "B"),
        ("Object Recognition", "Which beverage appears in the video?", ["Coffee", "Tea", "Wine", "Juice"], "A"),
        ("Counting Problem", "How many different pictures are shown in the video?", ["One", "Two", "Three", "Four"], "C"),
    ]),
    ("vz_scroll_text", "scroll_text", "Knowledge", "Technology", [
        ("OCR Problems", "What is the title of the text in the video?", ["Edge detection", "Region-based segmentation", "Image denoising", "Feature matching"], "B"),
        ("Information Synopsis", "What is the text mainly about?", ["Segmenting an image into regions", "Cooking recipes", "Football results", "Weather forecasts"], "A"),
        ("Spatial Perception", "Where on the page is the title?", ["At the top", "At the bottom", "In the middle", "On the right edge"], "A"),
    ]),
    ("vz_color_cycle", "color_cycle", "Artistic Performance", "Variety Show", [
        ("Temporal Perception", "What is the last color shown?", ["Red", "Green", "Blue", "Yellow"], "C"),
        ("Counting Problem", "How many times does the color change?", ["Once", "Twice", "Three times", "Never"], "B"),
        ("Temporal Reasoning", "Which color comes right after red?", ["Blue", "Green", "Yellow", "White"], "B"),
    ]),
    ("vz_horse_run", "horse_run", "Life Record", "Pet & Animal", [
        ("Object Recognition", "What animal's silhouette crosses the screen?", ["Horse", "Dog", "Elephant", "Giraffe"], "A"),
        ("Action Recognition", "In which direction does the silhouette move?", ["From left to right", "From right to left", "Upwards", "Downwards"], "A"),
        ("Attribute Perception", "What color is the silhouette?", ["White", "Black", "Brown", "Red"], "B"),
    ]),
]
MISSING_VIDEO_ID = "vz_missing_video"


def videomme_rows(videos) -> list[dict]:
    rows = []
    for number, (video_id, _, domain, sub_category, questions) in enumerate(videos, start=1):
        for q, (task_type, question, options, answer) in enumerate(questions, start=1):
            rows.append(
                {
                    "video_id": f"{number:03d}",
                    "duration": "short",
                    "domain": domain,
                    "sub_category": sub_category,
                    "url": f"generated://{video_id}",
                    "videoID": video_id,
                    "question_id": f"{number:03d}-{q}",
                    "task_type": task_type,
                    "question": question,
                    "options": [f"{letter}. {text}" for letter, text in zip("ABCD", options)],
                    "answer": answer,
                }
            )
    return rows


def videomme_features():
    import datasets

    string = datasets.Value("string")
    columns = ["video_id", "duration", "domain", "sub_category", "url", "videoID", "question_id", "task_type", "question"]
    features = {c: string for c in columns}
    features["options"] = datasets.List(string)
    features["answer"] = string
    return datasets.Features(features)


def make_videomme(root: Path) -> None:
    import datasets

    from visionzip_eval.datasets import videos_dir

    for video_id, kind, *_ in VIDEOS:
        write_video(videos_dir(root) / f"{video_id}.mp4", video_frames(kind))
    rows = videomme_rows(VIDEOS)
    features = videomme_features()
    dataset = datasets.Dataset.from_dict({key: [r[key] for r in rows] for key in features}, features=features)
    write_split(dataset, root, "videomme", "test")


# ------------------------------------------------------------------ broken


def make_broken(root: Path) -> None:
    """Good samples plus exactly one bad one each: one costs one sample, not the run."""
    import datasets

    corrupt = {"bytes": b"this is not an image: the smoke set's deliberately corrupt sample\n", "path": None}
    entries = [
        ("astronaut", [("person", "yes")]),
        ("corrupt", [("cat", "yes")]),
        ("coffee", [("laptop", "no")]),
        ("chelsea", [("cat", "yes")]),
        ("rocket", [("car", "no")]),
        ("camera", [("camera", "yes")]),
    ]
    rows = pope_rows(entries, image_fn=lambda name: corrupt if name == "corrupt" else photo(name))
    features = pope_features()
    directory = root / "broken"
    directory.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({key: [r[key] for r in rows] for key in features}, features=features).to_parquet(str(directory / "image_test.parquet"))

    by_id = {v[0]: v for v in VIDEOS}
    missing = (MISSING_VIDEO_ID, None, "Knowledge", "Technology", [("Object Recognition", "What object is shown in the video?", ["A rocket", "A ship", "A bridge", "A windmill"], "A")])
    videos = [
        (*by_id["vz_pan_rocket"][:4], by_id["vz_pan_rocket"][4][:1]),
        (*by_id["vz_red_ball"][:4], by_id["vz_red_ball"][4][:1]),
        missing,
        (*by_id["vz_slideshow"][:4], by_id["vz_slideshow"][4][1:2]),
    ]
    rows = videomme_rows(videos)
    features = videomme_features()
    datasets.Dataset.from_dict({key: [r[key] for r in rows] for key in features}, features=features).to_parquet(str(directory / "video_test.parquet"))


# ------------------------------------------------------------------ main

MAKERS = {"gqa": make_gqa, "mmbench": make_mmbench, "mme": make_mme, "pope": make_pope, "videomme": make_videomme, "broken": make_broken}


def generate(out: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    out.mkdir(parents=True, exist_ok=True)
    for make in MAKERS.values():
        make(out)


def compare(a: Path, b: Path) -> list[str]:
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    problems = [f"only in {a}: {p}" for p in sorted(files_a - files_b)] + [f"only in {b}: {p}" for p in sorted(files_b - files_a)]
    for p in sorted(files_a & files_b):
        if filecmp.cmp(a / p, b / p, shallow=False):
            continue
        if p.suffix == ".mp4":  # another x264/PyAV build encodes the same frames into other bytes
            difference = video_difference(a / p, b / p)
            if difference is None or difference > MAX_VIDEO_DIFFERENCE:
                problems.append(f"differs: {p} (decoded frames: {difference})")
            continue
        problems.append(f"differs: {p}")
    return problems


MAX_VIDEO_DIFFERENCE = 4.0  # mean absolute pixel difference (0-255) still taken for the same video


def video_difference(path_a: Path, path_b: Path) -> float | None:
    """Mean absolute difference of the decoded RGB frames, or None when frame counts or sizes differ."""
    import av

    def frames(path):
        with av.open(str(path)) as container:
            return [frame.to_ndarray(format="rgb24").astype(np.int16) for frame in container.decode(video=0)]

    fa, fb = frames(path_a), frames(path_b)
    if len(fa) != len(fb) or any(x.shape != y.shape for x, y in zip(fa, fb)):
        return None
    return float(np.mean([np.abs(x - y).mean() for x, y in zip(fa, fb)]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output data root (default: {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare byte for byte with --out; exit 1 on any difference")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            problems = compare(args.out, Path(tmp))
        for problem in problems:
            print(problem)
        print("smoke data is up to date" if not problems else f"{len(problems)} difference(s)")
        return 1 if problems else 0
    for name in MAKERS:  # no stale files: each folder is exactly what this script writes
        if (args.out / name).is_dir():
            shutil.rmtree(args.out / name)
    generate(args.out)
    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files, {total / 1024:.0f} KiB, under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
