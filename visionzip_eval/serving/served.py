"""``ServedEngine``: the transformers ``Engine``'s ``generate`` interface, the LLM run by vLLM.

Route: precomputed image embeddings. The registry's method reduces the tower output through the
same hooks the transformers engine uses (``Engine.encode``: tower -> method -> projector), and
vLLM's LLM receives those rows per image (``LLM(enable_mm_embeds=True)``,
``multi_modal_data={"image": rows}``); vLLM expands the prompt's one ``<image>`` to as many
placeholders as rows. No selection is written twice, and one vLLM engine serves every method and
budget (the LLM never sees which produced the rows). In-LLM methods are refused: they prune
inside the LLM, which vLLM's scheduler sizes before the tower runs.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from visionzip_eval.engine import Engine, Generation, Output, Request
from visionzip_eval.methods.registry import MethodSpec, method_info

_VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_servable(method: MethodSpec | str) -> MethodSpec:
    """``method`` parsed; a one-line ValueError for an in-LLM method."""
    spec = MethodSpec.parse(method)
    if not spec.is_none and method_info(spec.name).kind == "in-llm":
        raise ValueError(f"method {spec.name!r} prunes inside the LLM, which vLLM's scheduler sizes before the "
                         "tower runs: serve a pre-LLM method (visionzip-eval methods lists them) or use engine=transformers")
    return spec


def _vllm_env() -> None:
    """Before vLLM is imported: its log lines to stderr (stdout carries --json), and the engine
    core in this process (its CPU time and memory count as this run's in the machine probe)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def vllm_unavailable() -> str | None:
    """Why vLLM cannot be imported here (None when it can)."""
    _vllm_env()
    try:
        import vllm  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means: not servable here
        return (f"vLLM is not importable in this environment ({type(error).__name__}: {error}); "
                "run scripts/setup_vllm.sh and use .venv-vllm/bin/python")
    return None


def new_llm(folder: str | Path, dtype: torch.dtype, *, max_num_seqs: int = 8, max_model_len: int = 2048,
            memory_fraction: float = 0.1, load_format: str = "auto", max_images: int = 4,
            max_num_batched_tokens: int | None = None):
    """A vLLM ``LLM`` taking image embeddings, prefix caching off (timings must not reuse a prefix).
    ``max_num_batched_tokens``: the tokens one engine step takes (None: vLLM's default); vLLM warms
    up with a step of that size, which at 7B on a CPU costs minutes per thousand tokens."""
    reason = vllm_unavailable()
    if reason:
        raise ValueError(reason)
    from vllm import LLM

    return LLM(
        model=str(folder), dtype=_VLLM_DTYPES[dtype], enable_mm_embeds=True, enable_prefix_caching=False,
        gpu_memory_utilization=memory_fraction, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        limit_mm_per_prompt={"image": max_images}, load_format=load_format, seed=0, disable_log_stats=False,
        enforce_eager=False,
        **({"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {}),
    )


class ServedEngine:
    """Generation through vLLM with the images encoded (and reduced) by ``encoder``.

    ``encoder``: a transformers ``Engine`` over a model with the same tower and projector as the
    served LLM (for the 7B shape, a one-decoder-layer copy: only its tower and projector run)."""

    def __init__(self, encoder: Engine, llm, llm_dtype: torch.dtype):
        self.encoder = encoder
        self.llm = llm
        self.llm_dtype = llm_dtype
        self.last_stats: list[dict] = []

    @classmethod
    def load(cls, model, processor, reducer, pretrained: str, image_aspect: str | None = None, **llm_options):
        from visionzip_eval.serving.checkpoint import vllm_checkpoint

        encoder = Engine(model, processor, reducer, image_aspect=image_aspect)
        folder = vllm_checkpoint(pretrained, Path(tempfile.mkdtemp(prefix="visionzip-vllm-")))
        dtype = next(model.parameters()).dtype
        return cls(encoder, new_llm(folder, dtype, **llm_options), dtype)

    # the parts of Engine's interface the lmms-eval adapter reads
    @property
    def model(self):
        return self.encoder.model

    @property
    def backend(self):
        return self.encoder.backend

    @property
    def tokens_per_image(self) -> int:
        return self.encoder.tokens_per_image

    @property
    def image_aspect(self):
        return self.encoder.image_aspect

    def set_reducer(self, reducer) -> None:
        self.encoder.set_reducer(reducer)

    def encode(self, *_args, **_kwargs):
        raise NotImplementedError("engine=vllm serves single-turn requests; use engine=transformers for conversations")

    def embeds(self, request: Request) -> tuple[list[torch.Tensor], float]:
        """The rows the LLM receives per image of ``request`` (reduced, projected), and the ms the
        tower + reduction + projector took."""
        if request.videos:
            raise ValueError("engine=vllm serves images; videos need engine=transformers")
        if not request.images:
            return [], 0.0
        features, ms = self.encoder.encode(request.images)
        rows = [r.to(self.llm_dtype) for r in features["image"].pooler_output]
        return rows, ms

    def prompt(self, request: Request, rows: list[torch.Tensor]) -> dict:
        """vLLM's prompt: the checkpoint's chat text with one ``<image>`` per image (vLLM expands
        each to its rows) and the embeddings."""
        text = self.encoder.prompt(request)
        if not rows:
            return {"prompt": text}
        return {"prompt": text, "multi_modal_data": {"image": list(rows)}}  # a 2-D tensor would read as images of one row

    def sampling(self, settings: Generation):
        from vllm import SamplingParams

        if settings.num_beams != 1:
            raise ValueError("engine=vllm decodes greedily or by sampling; num_beams > 1 needs engine=transformers")
        return SamplingParams(
            max_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p or 1.0,
            stop=list(settings.until) or None, seed=0,
        )

    def generate(self, requests: list[Request], settings: Generation, image_features=None) -> list[Output]:
        """Generate for a batch submitted to vLLM at once (``Engine.generate``'s interface)."""
        if image_features is not None:
            raise NotImplementedError("engine=vllm does not reuse image features across turns")
        return self.submit(requests, self.sampling(settings))

    def submit(self, requests: list[Request], params) -> list[Output]:
        """Encode each request's images, submit the batch to vLLM at once with ``params``
        (vLLM ``SamplingParams``); metrics per request, named as ``Engine``'s where they match."""
        encoded = [self.embeds(r) for r in requests]
        prompts = [self.prompt(r, rows) for r, (rows, _) in zip(requests, encoded)]
        start = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        wall_ms = (time.perf_counter() - start) * 1e3
        processor = self.encoder.processor
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        results = []
        for request, (rows, vision_ms), out in zip(requests, encoded, outs):
            completion = out.outputs[0]
            metrics = dict(
                visual_tokens=sum(1 for t in out.prompt_token_ids if t == image_token),
                visual_rows=sum(len(r) for r in rows),
                prompt_tokens=len(out.prompt_token_ids),
                generated_tokens=len(completion.token_ids),
                images=len(request.images),
                batch_size=len(requests),
                vision_ms=vision_ms,
                batch_wall_ms=wall_ms,
                **request_timings(out),
            )
            results.append(Output(text=completion.text.strip(), metrics=metrics))
        return results


def request_timings(out) -> dict:
    """TTFT and end-to-end ms of one vLLM ``RequestOutput`` (from its arrival in the engine), where
    the engine kept stats (``disable_log_stats=False``)."""
    stats = getattr(out, "metrics", None)
    if stats is None or not getattr(stats, "first_token_ts", 0):
        return {}
    ttft = stats.first_token_latency * 1e3
    return dict(ttft_ms=ttft, total_ms=ttft + (stats.last_token_ts - stats.first_token_ts) * 1e3)
