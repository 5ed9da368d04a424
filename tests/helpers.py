"""Helpers shared by the model-level tests (pytest puts tests/ on sys.path)."""

import torch
from lmms_eval.api.instance import Instance


def hooks(model):
    """Every hook on every module, plus our instance overrides (``get_*`` on the inner model):
    the state VisionZip may touch. transformers installs its own output-capturing hooks
    lazily, so tests compare snapshots taken before and after."""
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    }, sorted(k for k in model.model.__dict__ if k.startswith("get_"))


def llm_input_embeddings(model, **inputs):
    """Generate, and return the embeddings the language model received at prefill."""
    seen = []

    def grab(module, args, kwargs):
        if not seen:
            seen.append(kwargs["inputs_embeds"].detach().clone())

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    return seen[0], out


def doc_visuals(key):
    """A task's doc_to_visual for docs that hold one visual, or a list, under ``key``."""

    def visuals(doc):
        return doc[key] if isinstance(doc[key], list) else [doc[key]]

    return visuals


def generate_requests(ids, key="image", task="demo", max_new_tokens=4):
    """lmms-eval ``generate_until`` Instances asking "What is shown?" of docs ``ids`` of ``task``
    (split "test"), their visuals under ``key``."""
    gen = {"max_new_tokens": max_new_tokens, "until": ["\n\n"]}
    return [
        Instance("generate_until", ("What is shown?", dict(gen), doc_visuals(key), i, task, "test"), i,
                 {"task": task, "doc_id": i, "repeats": 1})
        for i in ids
    ]
