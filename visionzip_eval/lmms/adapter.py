"""The lmms-eval model ``visionzip``: any supported VLM, any reduction method and budget,
every request measured.

    python -m lmms_eval --model visionzip \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,budget=64 \\
        --tasks gqa,mme,pope,mmbench_en_dev_static --output_path OUT --log_samples

model_args: ``pretrained``; ``budget`` (full, 64, 128, 192, any total, or "54+10") or
``dominant`` + ``contextual``; ``method`` (any registered method: ``visionzip-eval methods``)
and that method's own options (``method=vispruner,important_ratio=0.3``; VisionZip's ``merge``:
reference, average, and ``selection_precision``: float32, or reference = the official code's
arithmetic in the model's dtype, its fp16 ties included); ``image_aspect`` (LLaVA-1.5: ``pad`` =
square on the processor's mean colour, as the original LLaVA-1.5 and the paper; ``crop`` = resize
and centre-crop; default: what the checkpoint's processor does, crop for llava-hf); ``device``; ``dtype`` (auto, float16, bfloat16, float32); ``attn_implementation``;
``batch_size``; ``seed``; ``max_frames`` (frames sampled per video); ``max_new_tokens``
(when a task sets none); ``warmup`` (first requests flagged and left out of aggregates);
``output_dir`` (where ``efficiency.jsonl`` goes; default: lmms-eval's ``--output_path``);
``engine`` (transformers, or vllm: the LLM served by vLLM with the method's reduced rows as image
embeddings, ``visionzip_eval.serving``; pre-LLM methods, single-turn image tasks, run from ``.venv-vllm``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from loguru import logger
from tqdm import tqdm

from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from visionzip_eval.budget import Budget
from visionzip_eval.loading import load_pretrained, resolve_device, resolve_dtype
from visionzip_eval.methods.registry import MethodSpec
from visionzip_eval.engine import Engine, Generation, Request
from visionzip_eval.lmms.efficiency import EfficiencyLog
from visionzip_eval.media import MediaError, load_visual_groups, load_visuals, parse_image_aspect

# What a failed sample answers: scored wrong by every benchmark's parser (no yes/no, no
# option letter); the reason goes to efficiency.jsonl and the log.
SAMPLE_ERROR = "[visionzip-eval: sample failed]"


def _cli_output_path(argv: list[str]) -> str | None:
    """lmms-eval's --output_path, read from the command line this process was started with."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path", default=None)
    known, _ = parser.parse_known_args(argv)
    return known.output_path


def resolve_budget(budget, dominant, contextual) -> Budget:
    if dominant is not None or contextual is not None:
        if dominant is None or contextual is None:
            raise ValueError("give both dominant and contextual, or a budget")
        if budget not in (None, "full") and not (isinstance(budget, Budget) and budget.is_full):
            raise ValueError("give either budget or dominant + contextual, not both")
        return Budget(int(dominant), int(contextual))
    return Budget.parse(budget)


ADAPTER_ARGS = (
    "pretrained", "budget", "dominant", "contextual", "method", "image_aspect", "device", "dtype",
    "attn_implementation", "batch_size", "seed", "max_frames", "max_new_tokens", "warmup", "output_dir",
    "engine",
)
ENGINES = ("transformers", "vllm")


def resolve_method(method: str | MethodSpec, options: dict) -> MethodSpec:
    """The method and its options (model_args the adapter does not take itself), validated."""
    try:
        return MethodSpec.parse(method, **options)
    except ValueError as error:
        if options and "has no option" in str(error):
            raise ValueError(f"{error}; the adapter's own model_args are {', '.join(ADAPTER_ARGS)}") from None
        raise


def refuse_unpaired_mme(requests: list[Instance]) -> None:
    """ValueError (one line) when an MME task got an odd number of questions. lmms-eval never tells
    the model its --limit, but the requests show it: MME scores its questions in pairs (two per
    image) and its aggregation asserts on a lone one only after the whole run has been answered."""
    from collections import Counter

    from visionzip_eval.benchmarks import benchmark_key

    counts = Counter(request.task_name for request in requests)
    odd = [f"{task}: {n}" for task, n in counts.items() if n % 2 and benchmark_key(task) == "MME"]
    if odd:
        raise ValueError(f"MME scores its questions in pairs (two per image) and got an odd number ({', '.join(odd)}): "
                         "use an even --limit")


class VisionZipLMM(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str = "llava-hf/llava-1.5-7b-hf",
        budget: str | int | Budget = "full",
        dominant: int | None = None,
        contextual: int | None = None,
        method: str | MethodSpec = "visionzip",
        image_aspect: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        seed: int = 0,
        max_frames: int = 8,
        max_new_tokens: int = 128,
        warmup: int = 2,
        output_dir: str | None = None,
        max_batch_size: int | None = None,  # passed by lmms-eval; batches are fixed here
        model: Any = None,  # an already loaded (model, processor): the sweep runner's path
        engine: str = "transformers",
        **method_options,
    ) -> None:
        super().__init__()
        self.method = resolve_method(method, method_options)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine == "vllm":  # refused before anything loads
            from visionzip_eval.serving.served import check_servable, vllm_unavailable

            check_servable(self.method)
            if reason := vllm_unavailable():
                raise ValueError(reason)
        self.budget = resolve_budget(budget, dominant, contextual)
        image_aspect = parse_image_aspect(image_aspect)  # a bad value fails before the model loads
        self._device = resolve_device(device)
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_frames = int(max_frames)
        self.max_new_tokens = int(max_new_tokens)
        self.pretrained = str(pretrained)
        self.chat_template = None
        torch.manual_seed(int(seed))
        if model is None:
            self.dtype = resolve_dtype(dtype, self._device)
            loaded, processor = load_pretrained(self.pretrained, self.dtype, self._device, attn_implementation)
        else:
            loaded, processor = model
            self.dtype = next(loaded.parameters()).dtype
        reducer = self.method.build(self.budget, seed=int(seed))
        if engine == "vllm":
            from visionzip_eval.serving.served import ServedEngine

            self.engine = ServedEngine.load(loaded, processor, reducer, self.pretrained, image_aspect=image_aspect,
                                            max_num_seqs=max(self.batch_size_per_gpu, 8))
        else:
            self.engine = Engine(loaded, processor, reducer, self._device, image_aspect=image_aspect)
        self.attn_implementation = getattr(loaded.config, "_attn_implementation", None)
        self.efficiency = EfficiencyLog(
            output_dir or _cli_output_path(sys.argv[1:]),
            warmup=int(warmup),
            static=dict(
                model=self.pretrained,
                method="none" if self.budget.is_full else self.method.label,  # as the sweep names runs
                budget=self.budget.label,
                dominant=getattr(reducer, "dominant", None),  # VisionZip's split; other methods have none
                contextual=getattr(reducer, "contextual", None),
                tokens_per_image=self.engine.tokens_per_image,
                device=str(self._device),
                dtype=str(self.dtype).replace("torch.", ""),
                attn_implementation=self.attn_implementation,
                image_aspect=self.engine.image_aspect,
                engine=engine,
            ),
        )
        logger.info(
            f"visionzip: {self.pretrained} method={self.method.label} budget={self.budget.label} "
            f"({self.engine.tokens_per_image} visual tokens per image, image_aspect={self.engine.image_aspect}) "
            f"on {self._device}"
        )

    # -- lmms-eval plumbing ---------------------------------------------------------------
    @property
    def model(self):
        return self.engine.model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def clean(self) -> None:
        """lmms-eval's clean() deletes every nn.Module attribute; the engine holds the model
        so a sweep can reuse it. Only flush what this run wrote."""
        self.efficiency.close()

    def loglikelihood(self, requests):
        raise NotImplementedError("visionzip serves generation tasks (generate_until); loglikelihood is not supported")

    def _doc(self, task: str, split: str, doc_id):
        return self.task_dict[task][split][doc_id]

    def _load(self, visuals) -> tuple[list, list]:
        """(images, videos as frame lists); videos become frames among the images for models
        without native video input."""
        if self.engine.backend.video_token_id is not None:
            return load_visual_groups(visuals, self.max_frames)
        images, _ = load_visuals(visuals, self.max_frames)
        return images, []

    def _prepare(self, context: str, doc_to_visual, doc_id, task, split) -> tuple[Request | None, dict]:
        """Load one sample's visuals; a broken one gives (None, {error})."""
        try:
            visuals = doc_to_visual(self._doc(task, split, doc_id))
            if self.engine.backend.video_token_id is not None:  # native video input
                images, videos = load_visual_groups(visuals, self.max_frames)
                count = len(videos)
            else:  # video frames go in as images
                images, count = load_visuals(visuals, self.max_frames)
                videos = []
        except MediaError as error:
            return None, {"error": str(error)}
        except Exception as error:  # a task's doc_to_visual failing costs this sample only
            return None, {"error": f"doc_to_visual failed: {type(error).__name__}: {error}"}
        return Request(turns=[(context, None)], images=images, videos=videos), {"videos": count}

    # -- generation -----------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        if self.world_size == 1:  # with several ranks each sees a shard: no count to check
            refuse_unpaired_mme(requests)
        collator = utils.Collator([r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True)
        results: list[GenerationResult] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="visionzip responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            results.extend(self._generate_chunk(chunk))
            progress.update(len(chunk))
        progress.close()
        self.efficiency.publish()
        return collator.get_original(results)

    def _generate_chunk(self, chunk) -> list[GenerationResult]:
        contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
        settings = Generation.from_gen_kwargs(all_gen_kwargs[0], self.max_new_tokens)
        prepared = [self._prepare(*args) for args in zip(contexts, doc_to_visuals, doc_ids, tasks, splits)]
        good = [i for i, (request, _) in enumerate(prepared) if request is not None]
        outputs: dict[int, tuple[str, dict]] = {}
        if good:
            try:
                generated = self.engine.generate([prepared[i][0] for i in good], settings)
                for i, output in zip(good, generated):
                    outputs[i] = (output.text, {**output.metrics, **prepared[i][1]})
            except Exception as error:  # e.g. out of memory: this batch fails, the run goes on
                if isinstance(error, KeyboardInterrupt):
                    raise
                message = f"generation failed: {type(error).__name__}: {error}"
                for i in good:
                    outputs[i] = (SAMPLE_ERROR, {"error": message})
        results = []
        for i in range(len(chunk)):
            text, metrics = outputs.get(i, (SAMPLE_ERROR, prepared[i][1]))
            if "error" in metrics:
                logger.warning(f"visionzip: {tasks[i]} doc {doc_ids[i]}: {metrics['error']}")
            self.efficiency.record(task=tasks[i], doc_id=doc_ids[i], split=splits[i], **metrics)
            counts = (
                TokenCounts(input_tokens=metrics["prompt_tokens"], output_tokens=metrics["generated_tokens"])
                if "prompt_tokens" in metrics else None
            )
            results.append(GenerationResult(text=text, token_counts=counts))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Conversations: each request's images are encoded once and their reduced tokens
        reused by every later turn (VisionZip does not look at the text)."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="visionzip multi-round"):
            results.append(self._conversation(*request.args))
        self.efficiency.publish()
        return results

    def _conversation(self, context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split) -> list[str]:
        settings = Generation.from_gen_kwargs(gen_kwargs, self.max_new_tokens)
        first, info = self._prepare(context, doc_to_visual, doc_id, task, split)
        if first is None:
            self.efficiency.record(task=task, doc_id=doc_id, split=split, round=0, **info)
            return [SAMPLE_ERROR]
        doc = self._doc(task, split, doc_id)
        turns, images, videos, replies, previous_info = [(context, None)], first.images, first.videos, [], None
        features, encode_ms = self.engine.encode(images, videos) if images or videos else (None, 0.0)
        for round_index in range(1_000):
            if round_index > 0:
                visuals, context, terminal, _, previous_info = doc_to_text(
                    doc, previous_output=replies, round_idx=round_index, previous_round_info=previous_info
                )
                if terminal:
                    break
                turns = turns[:-1] + [(turns[-1][0], replies[-1]), (context, None)]
                if visuals:  # new images this turn: they are encoded, the old ones kept
                    new_images, new_videos = self._load(visuals)
                    if (new_images or new_videos) and (new_images, new_videos) != (images, videos):
                        images, videos = new_images, new_videos
                        features, encode_ms = self.engine.encode(images, videos)
            request = Request(turns=turns, images=images, videos=videos)
            output = self.engine.generate([request], settings, image_features=features)[0]
            metrics = dict(output.metrics, round=round_index, **info)
            if encode_ms:  # this turn paid for the encode
                metrics.update(
                    vision_ms=encode_ms,
                    image_tokens_reused=False,
                    vision_flops=self.engine.last_encode_vision_flops,
                )
                encode_ms = 0.0
            self.efficiency.record(task=task, doc_id=doc_id, split=split, **metrics)
            replies.append(output.text)
        return replies
