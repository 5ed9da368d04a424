"""``visionzip-eval app``: choose an image and a budget, see which tokens survive and what the
model answers. The logic is :func:`ask` (plain Python, tested); gradio (the ``app`` extra:
``pip install "visionzip-eval[app]"``) only draws the page around it.
"""

from __future__ import annotations

import torch
from PIL import Image

from visionzip_eval.backends import backend_for
from visionzip_eval.budget import Budget
from visionzip_eval.apply import tokens_per_image, visionzip_processor
from visionzip_eval.methods.visionzip import VisionZip

BUDGET_CHOICES = ["full", "192", "128", "64", "32"]


@torch.no_grad()
def ask(model, processor, image: Image.Image, budget: str | int, question: str, max_new_tokens: int = 16):
    """(answer, visual tokens the LLM received, selection picture or None at ``full``)."""
    from visionzip_eval.visualize import visualize

    budget = Budget.parse(budget)
    image = image.convert("RGB")
    if not question.strip():
        raise ValueError("ask a question about the image")
    prompt = backend_for(model).chat_prompt(processor, [(question.strip(), None)], images=1)
    reducer = None if budget.is_full else VisionZip(budget.dominant, budget.contextual)
    picture = None if reducer is None else visualize(model, processor, image, [budget])[0]
    parameter = next(model.parameters())

    def generate():
        wrapped = visionzip_processor(processor, model)
        inputs = wrapped(images=[image], text=prompt, return_tensors="pt").to(parameter.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answer = wrapped.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return answer.strip(), tokens_per_image(model)

    if reducer is None:
        answer, tokens = generate()
    else:
        with reducer(model):
            answer, tokens = generate()
        visionzip_processor(processor, model)  # back to the unreduced expansion
    return answer, tokens, picture


def build_app(model, processor, examples: list[Image.Image] | None = None):
    """The gradio Blocks page (gradio imported here: it is an optional extra)."""
    try:
        import gradio as gr
    except ImportError as error:
        raise RuntimeError('the app needs gradio: pip install "visionzip-eval[app]"') from error

    def on_submit(image, budget, question):
        if image is None:
            raise gr.Error("choose an image first")
        try:
            answer, tokens, picture = ask(model, processor, image, budget, question)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return picture, f"{answer}", f"{tokens} visual tokens per image reach the LLM"

    with gr.Blocks(title="VisionZip") as page:
        gr.Markdown("# VisionZip: which visual tokens survive, and what the model answers")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image")
                budget = gr.Dropdown(BUDGET_CHOICES, value="64", label="visual tokens per image")
                question = gr.Textbox(value="Is there a red circle in the image?", label="question")
                button = gr.Button("Ask")
            with gr.Column():
                picture = gr.Image(type="pil", label="selection (yellow: kept; tint: merged; right: CLS attention)")
                answer = gr.Textbox(label="answer")
                tokens = gr.Markdown()
        if examples:
            gr.Examples([[e] for e in examples], inputs=[image])
        button.click(on_submit, inputs=[image, budget, question], outputs=[picture, answer, tokens])
    return page
