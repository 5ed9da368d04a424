"""``visionzip-eval app``: the seed's two demos on one page (gradio, the ``app`` extra:
``pip install "visionzip-eval[app]"``).

- **Choose the tokens**: the image's patch grid; click patches (or two corners of a rectangle)
  to toggle them, start from any registered method's selection at any budget, tick CLS, merge
  the unchosen patches into VisionZip's contextual tokens; ask, and see the answer, how many
  visual tokens the LLM received and the prefill time, optionally beside the answer with every
  token. The conversation goes on over turns; its visual tokens are computed once.
- **Redundancy view**: per tower layer, how the CLS attention concentrates on a few patches,
  and how alike the rest are (``visionzip_eval.demos.redundancy``).

The logic is plain Python (``visionzip_eval.demos.chat``, ``visionzip_eval.demos.redundancy``, and
:func:`redundancy_view` here); ``build_app`` only draws the page and keeps per-visitor state.
"""

import functools
import io
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from visionzip_eval.demos.chat import (
    SCALE,
    ChosenTokens,
    Conversation,
    base_unit,
    grid_picture,
    method_start,
    patch_at,
    patches_between,
    unit_pixels,
)
from visionzip_eval.engine import Engine
from visionzip_eval.methods.base import NoReduction
from visionzip_eval.methods.registry import list_methods

BUDGET_CHOICES = ["192", "128", "64", "32", "16"]
# the synthetic benchmark's question format (lmms-eval's POPE prompt), which the tiny model was trained on
DEFAULT_QUESTION = "Is there a red circle in the image?\nAnswer the question using a single word or phrase."
CLICK_MODES = ["toggle a patch", "rectangle: click two corners"]
REUSE_NOTE = (
    "The visual tokens are computed once per image and selection (the tower runs at the first turn) "
    "and reused for every later turn: the method does not look at the text."
)


def open_image(path: str | None) -> Image.Image:
    """The uploaded file as an RGB image, or a one-line error."""
    if not path:
        raise ValueError("choose an image first")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read {Path(path).name} as an image: {error}") from None


def redundancy_view(engine: Engine, image: Image.Image, top_k: int = 54) -> tuple[Image.Image, str]:
    """The redundancy figure of ``image``'s base unit and a one-paragraph summary."""
    import matplotlib.pyplot as plt

    from visionzip_eval.demos.redundancy import redundancy_figure, tower_redundancy

    rows, cols = engine.backend.patch_grid
    stats = tower_redundancy(engine.model, base_unit(engine, image), top_k=min(top_k, rows * cols - 1))
    figure = redundancy_figure(stats, image)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    feature = stats.feature_layer
    summary = (
        f"At the feature layer (layer {feature + 1} of {len(stats.top_share)}) the top {stats.top_k} of "
        f"{stats.grid[0] * stats.grid[1]} patches hold {100 * stats.top_share[feature]:.0f}% of the CLS attention "
        f"(layer 1: {100 * stats.top_share[0]:.0f}%); normalised entropy {stats.entropy[feature]:.2f} "
        f"(1 = uniform). The other patches' keys are {stats.to_neighbour.mean():.2f} cosine-similar to their "
        f"nearest other non-dominant patch on average: what contextual merging exploits."
    )
    return Image.open(buffer).convert("RGB"), summary


def parse_indices(text: str, total: int) -> list[int]:
    """Patch indices typed as ``3, 17 40-45`` (ranges inclusive)."""
    chosen: set[int] = set()
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"cannot read patch {part!r}: write indices like 3, 17, 40-45")
        low, high = int(match[1]), int(match[2] or match[1])
        if high >= total or low > high:
            raise ValueError(f"patch range {part} is outside 0..{total - 1}")
        chosen.update(range(low, high + 1))
    return sorted(chosen)


class Handlers:
    """What the page's events do, as plain methods on plain values (the page's state in, its
    outputs out), so they run without a browser. ``selection_outputs`` is what every change of
    the chosen patches shows: (grid picture, chosen list, summary, indices text)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.grid = engine.backend.patch_grid
        self.total = self.grid[0] * self.grid[1]
        probe = Image.new("RGB", (64, 48))
        base_unit(engine, probe)  # refuses families without one fixed grid per tower input
        self.anyres = "image_sizes" in engine.pixel_inputs([probe])

    def selection_outputs(self, pixels, chosen, cls, contextual):
        per_unit = len(chosen) + bool(cls) + int(contextual or 0)
        extras = (" + CLS" if cls else "") + (f" + {int(contextual)} contextual" if contextual else "")
        units = " per tower input (the base image and each crop get the same patches)" if self.anyres else ""
        text = f"**{len(chosen)} of {self.total} patches chosen**{extras} → {per_unit} visual tokens{units}"
        picture = None if pixels is None else grid_picture(pixels, self.grid, chosen)
        return picture, sorted(chosen), text, ", ".join(map(str, sorted(chosen)))

    def on_image(self, path, budget):
        """A new image: its pixels, VisionZip's selection at ``budget``, fresh conversations."""
        if not path:
            return None, *self.selection_outputs(None, [], False, 0), False, 0, {}, [], [], "", "", ""
        image = open_image(path)
        start = method_start(self.engine, image, "visionzip", budget)
        pixels = unit_pixels(self.engine, image)
        return (pixels, *self.selection_outputs(pixels, start.patches, start.cls, start.contextual),
                start.cls, start.contextual, {}, [], [], "", "", "")

    def on_start(self, path, method, budget, pixels):
        """Start from ``method``'s selection at ``budget``."""
        start = method_start(self.engine, open_image(path), method, budget)
        return (*self.selection_outputs(pixels, start.patches, start.cls, start.contextual),
                start.cls, start.contextual)

    def on_click(self, pixels, chosen, mode, corner, cls, contextual, xy: tuple[int, int]):
        """A click at picture pixel ``xy``: toggle that patch, or (rectangle mode) remember the
        first corner and toggle the rectangle at the second; the last output is the corner."""
        if pixels is None:
            raise ValueError("choose an image first")
        height, width = pixels.shape[0] * SCALE, pixels.shape[1] * SCALE  # grid_picture's size
        patch = patch_at(xy[0], xy[1], self.grid, (width, height))
        chosen = set(chosen)
        if mode == CLICK_MODES[1]:
            if corner is None:
                picture, kept, text, listed = self.selection_outputs(pixels, chosen, cls, contextual)
                return picture, kept, f"{text} · corner at patch {patch}: click the opposite corner", listed, patch
            patches = patches_between(corner, patch, self.grid)
            if corner in chosen:
                chosen.difference_update(patches)
            else:
                chosen.update(patches)
        else:
            chosen ^= {patch}
        return (*self.selection_outputs(pixels, chosen, cls, contextual), None)

    def on_set(self, which, pixels, chosen, cls, contextual):
        """The all / none / invert buttons."""
        everything = set(range(self.total))
        new = {"all": everything, "none": set(), "invert": everything - set(chosen)}[which]
        return (*self.selection_outputs(pixels, new, cls, contextual), None)

    def on_typed(self, text, pixels, cls, contextual):
        return self.selection_outputs(pixels, parse_indices(text, self.total), cls, contextual)

    def on_send(self, path, question, chosen, cls, contextual, side_by_side, chats):
        """Ask ``question`` with the chosen tokens (and, side by side, with every token); each
        conversation goes on while its image and selection stay, and restarts when they change.
        Returns (answer, answer with all tokens, what the LLM received, the two chat logs, chats)."""
        image = open_image(path)
        if not question or not question.strip():
            raise ValueError("ask a question about the image")
        reducers = {"chosen": ChosenTokens(patches=tuple(chosen), cls=bool(cls), contextual=int(contextual or 0))}
        if side_by_side:
            reducers["full"] = NoReduction()
        chats = dict(chats or {})
        lines = []
        for name, reducer in reducers.items():
            conversation = chats.get(name)
            restarted = conversation is not None and not conversation.matches(image, reducer)
            if conversation is None or restarted:
                conversation = chats[name] = Conversation(image, reducer)
            turn = conversation.ask(self.engine, question)
            lines.append(received_line(name, turn, restarted, len(conversation.history)))
        if not side_by_side:
            chats.pop("full", None)
        return (
            chats["chosen"].history[-1][1],
            chats["full"].history[-1][1] if side_by_side else "",
            "\n\n".join(lines),
            messages(chats["chosen"]),
            messages(chats.get("full")),
            chats,
        )

    def on_redundancy(self, path):
        return redundancy_view(self.engine, open_image(path))


def received_line(name: str, turn, restarted: bool, turns: int) -> str:
    """One line of what a turn's LLM received and whether the tower ran."""
    what = "chosen tokens" if name == "chosen" else "all tokens"
    if turn.encoded:
        how = f"tower ran to compute them ({turn.encode_ms:.0f} ms)"
        how += " (image or selection changed: new conversation)" if restarted else ""
    else:
        how = "reused from turn 1 (tower not run)"
    return (f"**{what}**: {turn.visual_tokens} visual tokens reached the LLM · "
            f"prefill {turn.prefill_ms:.1f} ms · turn {turns}: {how}")


# What the page's header says of the default model (it answers "no" about a person in a photo).
TINY_SYNTH_NOTE = (
    " (the default: a tiny LLaVA trained only on the synthetic scenes of coloured shapes below; it knows "
    "nothing of real photos. Ask about the examples, or serve a real model: visionzip-eval app --model "
    "llava-hf/llava-1.5-7b-hf)"
)


def build_app(model, processor, examples: list[Image.Image] | None = None, model_name: str | None = None):
    """The gradio Blocks page (gradio imported here: it is an optional extra); what its events do
    is ``Handlers``. ``model_name``: what the header calls the model (the ``--model`` given)."""
    try:
        import gradio as gr
    except ImportError as error:
        raise RuntimeError('the app needs gradio: pip install "visionzip-eval[app]"') from error

    engine = Engine(model, processor)
    handlers = Handlers(engine)
    backend, grid, anyres = engine.backend, handlers.grid, handlers.anyres
    methods = [info.name for info in list_methods("pre-llm")]

    def guarded(function):
        """Run a handler, turning a ValueError into the page's one-line error."""

        @functools.wraps(function)
        def run(*args):
            try:
                return function(*args)
            except ValueError as error:
                raise gr.Error(str(error)) from None

        return run

    def answer_kept(function, outputs: int):
        """A handler whose outputs hold the conversation: on a ValueError (no patches chosen, no
        question) they keep the previous answer instead of error badges, and the one-line reason
        shows once, as a warning."""

        @functools.wraps(function)
        def run(*args):
            try:
                return function(*args)
            except ValueError as error:
                gr.Warning(str(error))
                return tuple(gr.skip() for _ in range(outputs))

        return run

    def on_click(pixels, chosen, mode, corner, cls, contextual, event: gr.SelectData):
        return handlers.on_click(pixels, chosen, mode, corner, cls, contextual, tuple(event.index))

    # -- the page -------------------------------------------------------------------------
    with gr.Blocks(title="VisionZip Demo-Chat") as page:
        gr.Markdown(
            "# VisionZip: choose the visual tokens the LLM sees\n"
            f"Model: {model_name + ', ' if model_name else ''}{backend.name}"
            + (TINY_SYNTH_NOTE if model_name == "builtin:tiny-llava-synth" else "")
            + f"; {grid[0]}x{grid[1]} patches per tower input"
            + (" (AnyRes: the image is cut into a base image and crops, one tower input each; the grid "
               "is the base image, and the chosen patches are kept in every input)" if anyres else "")
            + "."
        )
        pixels = gr.State(None)
        chosen = gr.State([])
        corner = gr.State(None)
        chats = gr.State({})
        with gr.Row():
            # png: example images reach the model losslessly (gradio's default is webp)
            image = gr.Image(type="filepath", format="png", label="image", height=260, elem_id="image")
            if examples:
                gr.Examples([[example] for example in examples], inputs=[image], label="examples")
        with gr.Tabs():
            with gr.Tab("Choose the tokens and chat"):
                with gr.Row():
                    with gr.Column():
                        picture = gr.Image(
                            type="numpy", label="patch grid: click to toggle (yellow: chosen)", interactive=False,
                            format="png", elem_id="grid", buttons=[],
                        )
                        mode = gr.Radio(CLICK_MODES, value=CLICK_MODES[0], label="click to", elem_id="mode")
                        with gr.Row():
                            visionzip_button = gr.Button("VisionZip selection", elem_id="visionzip")
                            all_button = gr.Button("all", elem_id="all")
                            none_button = gr.Button("none", elem_id="none")
                            invert_button = gr.Button("invert", elem_id="invert")
                        with gr.Row():
                            method = gr.Dropdown(methods, value="visionzip", label="start from a method")
                            budget = gr.Dropdown(BUDGET_CHOICES, value="64", label="at budget", allow_custom_value=True)
                            start_button = gr.Button("start from it", elem_id="start")
                        with gr.Row():
                            cls = gr.Checkbox(
                                value=False, label="send the CLS token too", elem_id="cls",
                                interactive=backend.cls_token,
                            )
                            contextual = gr.Number(
                                value=0, precision=0, minimum=0, elem_id="contextual",
                                label="merge the unchosen patches into this many contextual tokens "
                                "(VisionZip; 0: drop them)",
                            )
                        selected = gr.Markdown(elem_id="selection")
                        indices = gr.Textbox(label="chosen patch indices (raster order; edit and press Enter)",
                                             elem_id="indices")
                    with gr.Column():
                        question = gr.Textbox(value=DEFAULT_QUESTION, label="question", lines=2, elem_id="question")
                        side_by_side = gr.Checkbox(value=False, label="side by side: also answer with all tokens",
                                                   elem_id="side_by_side")
                        with gr.Row():
                            send = gr.Button("Send", variant="primary", elem_id="send")
                            restart = gr.Button("New conversation", elem_id="restart")
                        with gr.Row():
                            answer = gr.Textbox(label="answer (chosen tokens)", interactive=False, elem_id="answer")
                            answer_full = gr.Textbox(label="answer (all tokens)", interactive=False, visible=False,
                                                     elem_id="answer_full")
                        received = gr.Markdown(elem_id="received")
                        gr.Markdown(REUSE_NOTE)
                        chat_chosen = gr.Chatbot(label="with the chosen tokens", height=260)
                        chat_full = gr.Chatbot(label="with all tokens", height=260, visible=False)
            with gr.Tab("Redundancy view"):
                gr.Markdown(
                    "Per tower layer: the CLS token's attention over the patches, the share held by the top 54 "
                    "patches and its entropy; at the feature layer, how similar the other patches are to each "
                    "other and to the dominant ones (VisionZip's motivation)."
                )
                redundancy_button = gr.Button("Show the redundancy view of the image", elem_id="redundancy")
                redundancy_picture = gr.Image(type="pil", label="redundancy", interactive=False, format="png")
                redundancy_text = gr.Markdown(elem_id="redundancy_summary")

        model_event = {"concurrency_limit": 1, "concurrency_id": "model"}  # one model: one run at a time
        grid_outputs = [picture, chosen, selected, indices]
        image.change(
            guarded(handlers.on_image), [image, budget],
            [pixels, *grid_outputs, cls, contextual, chats, chat_chosen, chat_full, answer, answer_full, received],
            **model_event,
        )
        visionzip_button.click(
            guarded(lambda path, b, p: handlers.on_start(path, "visionzip", b, p)), [image, budget, pixels],
            [*grid_outputs, cls, contextual], **model_event,
        )
        start_button.click(guarded(handlers.on_start), [image, method, budget, pixels],
                           [*grid_outputs, cls, contextual], **model_event)
        picture.select(guarded(on_click), [pixels, chosen, mode, corner, cls, contextual], [*grid_outputs, corner])
        for button, which in ((all_button, "all"), (none_button, "none"), (invert_button, "invert")):
            button.click(functools.partial(handlers.on_set, which), [pixels, chosen, cls, contextual],
                         [*grid_outputs, corner])
        indices.submit(guarded(handlers.on_typed), [indices, pixels, cls, contextual], grid_outputs)
        cls.input(handlers.selection_outputs, [pixels, chosen, cls, contextual], grid_outputs)
        contextual.input(handlers.selection_outputs, [pixels, chosen, cls, contextual], grid_outputs)
        send.click(
            answer_kept(handlers.on_send, 6), [image, question, chosen, cls, contextual, side_by_side, chats],
            [answer, answer_full, received, chat_chosen, chat_full, chats], **model_event,
        )
        question.submit(
            answer_kept(handlers.on_send, 6), [image, question, chosen, cls, contextual, side_by_side, chats],
            [answer, answer_full, received, chat_chosen, chat_full, chats], **model_event,
        )
        side_by_side.change(lambda on: (gr.update(visible=on),) * 2, [side_by_side], [chat_full, answer_full])
        restart.click(
            lambda: ({}, [], [], "", "", ""), None, [chats, chat_chosen, chat_full, answer, answer_full, received]
        )
        redundancy_button.click(guarded(handlers.on_redundancy), [image], [redundancy_picture, redundancy_text],
                                **model_event)
    return page


def messages(conversation: Conversation | None) -> list[dict]:
    """A conversation as the chatbot's messages."""
    out = []
    for question, reply in conversation.history if conversation is not None else []:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return out
