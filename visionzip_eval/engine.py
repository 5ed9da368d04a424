"""Instrumented generation: one model, one reducer at a time, every request measured.

The engine owns the model-side mechanics the lmms-eval adapter needs, without lmms-eval:
building prompts in the checkpoint's format, applying and switching reducers (a budget
change re-applies hooks; weights are never reloaded), generating batches, caching a
conversation's image tokens across turns, and timing each stage of each request.

Stages come from hooks on the model's own modules (scoped to this engine, removed by
``close()``): vision = tower start to projector end, prefill = the decoder's first forward,
time to first token = request start to the first LM-head output, decode = the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_eval.methods import llm_pruning
from visionzip_eval.backends import backend_for
from visionzip_eval.media import parse_image_aspect
from visionzip_eval.apply import remove_reduction, tokens_per_image, visionzip_processor
from visionzip_eval.methods.base import NoReduction, TokenReducer
from visionzip_eval.profiling import DecoderShape, PeakMemory, StageClock, prefill_flops

# Control characters no answer needs and XML cannot hold (lmms-eval's MMBench aggregation
# writes responses to an .xlsx, which refuses them); random-weight models emit them.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


@dataclass
class Generation:
    """Settings of one generate call (lmms-eval's gen_kwargs, normalised)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    until: list[str] = field(default_factory=list)

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: dict | None, default_max_new_tokens: int = 128) -> Generation:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        return cls(
            max_new_tokens=int(kwargs.get("max_new_tokens") or default_max_new_tokens),
            temperature=float(kwargs.get("temperature") or 0.0),
            top_p=kwargs.get("top_p"),
            num_beams=int(kwargs.get("num_beams") or 1),
            until=[u for u in until if u],
        )


@dataclass
class Request:
    """One prompt: its conversation so far, its images, and its videos as lists of frames.

    Models without native video input (``backend.video_token_id is None``) take video frames
    as images; the adapter puts them in ``images`` for those."""

    turns: list[tuple[str, str | None]]
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)


@dataclass
class Output:
    text: str
    metrics: dict


class Engine:
    def __init__(
        self,
        model: nn.Module,
        processor,
        reducer: TokenReducer | None = None,
        device=None,
        image_aspect: str | None = None,
    ):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.backend = backend_for(model)
        # how LLaVA-1.5 squares a non-square image: pad / crop (None: the family shapes its own)
        self.image_aspect = resolve_image_aspect(self.backend, processor, image_aspect)
        self._image_kwargs = (
            self.backend.image_processor_kwargs(processor, self.image_aspect) if self._shapes_images else {}
        )
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        config = self.backend.config
        self.decoder_shape = DecoderShape.from_config(getattr(config, "text_config", None) or config)
        self.memory = PeakMemory(self.device)
        self.vision_calls = 0  # tower runs since construction (multi-turn reuse is checked on it)
        self.last_encode_vision_flops = 0  # vision FLOPs of the last encode()
        self._clock: StageClock | None = None
        self._spellable: dict[str, bool] = {}  # stop string -> can the tokenizer produce it
        self._hooks = self._instrument()
        self.set_reducer(reducer or NoReduction())

    # -- reducer --------------------------------------------------------------------------
    def set_reducer(self, reducer: TokenReducer) -> None:
        """Switch the reduction (hooks re-applied, weights untouched)."""
        reducer.apply(self.model)
        visionzip_processor(self.processor, self.model)

    @property
    def tokens_per_image(self) -> int:
        return tokens_per_image(self.model)

    def close(self) -> None:
        """Remove every hook this engine placed; the model is as it was handed in."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        remove_reduction(self.model)
        visionzip_processor(self.processor, self.model)

    # -- instrumentation ------------------------------------------------------------------
    def _instrument(self) -> list:
        modules = self.backend.modules()

        def mark(name, once=True):
            def hook(*_):
                if self._clock is not None:
                    (self._clock.mark_once if once else self._clock.mark)(name)

            return hook

        def on_vision_start(*_):
            self.vision_calls += 1
            mark("vision_start")()

        def on_decoder_end(*_):
            mark("prefill_end")()
            mark("last_forward_end", once=False)()

        return [
            modules["vision_tower"].register_forward_pre_hook(on_vision_start),
            modules["projector"].register_forward_hook(mark("vision_end", once=False)),
            modules["language_model"].register_forward_pre_hook(mark("prefill_start")),
            modules["language_model"].register_forward_hook(on_decoder_end),
            modules["lm_head"].register_forward_hook(mark("first_token")),
        ]

    # -- generation -----------------------------------------------------------------------
    def prompt(self, request: Request) -> str:
        return self.backend.chat_prompt(self.processor, request.turns, len(request.images), len(request.videos))

    # -- image preprocessing ----------------------------------------------------------------
    @property
    def _shapes_images(self) -> bool:
        return bool(self.backend.image_aspects)

    def _visual(self, images: list[list], videos: list[list]) -> dict:
        """The processor's visual arguments for a batch (per request its images and videos),
        LLaVA-1.5's images shaped as ``image_aspect`` says."""
        if self._shapes_images:
            images = [self.backend.shape_images(self.processor, request, self.image_aspect) for request in images]
        return self.backend.processor_inputs(images, videos)

    def pixel_inputs(self, images: list, videos: list | None = None) -> dict:
        """The processor's vision outputs (``pixel_values``, ...) for one request's images and
        videos, on the CPU: exactly what ``encode`` and ``generate`` feed the tower."""
        visual = self._visual([list(images)], [list(videos or [])])
        processed = {}
        if "images" in visual:
            processed.update(self.processor.image_processor(visual["images"], return_tensors="pt", **self._image_kwargs))
        if "videos" in visual:
            processed.update(self.processor.video_processor(visual["videos"], return_tensors="pt"))
        return processed

    def _to_device(self, inputs) -> dict:
        return {
            k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
            if torch.is_tensor(v) else v
            for k, v in inputs.items()
        }

    def _vision_flops(self, inputs, requests: list[Request]) -> list[tuple[int, int]]:
        """Per request: (tower units: images, crops, frames; vision FLOPs)."""
        image_units, video_units = self.backend.tower_units(inputs)
        per_unit = self.backend.vision_flops(self.tokens_per_image)
        out, i, v = [], 0, 0
        for request in requests:
            units = sum(image_units[i : i + len(request.images)]) + sum(video_units[v : v + len(request.videos)])
            i, v = i + len(request.images), v + len(request.videos)
            out.append((units, units * per_unit))
        return out

    @torch.inference_mode()
    def encode(self, images: list, videos: list | None = None) -> tuple[dict, float]:
        """Image (and video) tokens as the LLM receives them, reusable across turns (VisionZip is
        text-agnostic): the ``mm_encoder_outputs`` dict, and the milliseconds the encode took.
        ``last_encode_vision_flops`` holds its FLOPs."""
        clock = StageClock(self.device)
        clock.mark("start")
        processed = self._to_device(self.pixel_inputs(images, videos))
        features = self.backend.encode_for_generate(processed)
        clock.mark("end")
        clock.finish()
        request = Request(turns=[], images=list(images), videos=list(videos or []))
        self.last_encode_vision_flops = self._vision_flops(processed, [request])[0][1]
        return features, clock.ms("start", "end")

    def _expand_placeholders(self, texts: list[str], encoded: dict) -> list[str]:
        """Expand each image / video placeholder to as many tokens as its encoded rows."""
        for modality in ("image", "video"):
            token = getattr(self.processor, f"{modality}_token", None)
            if encoded.get(modality) is None or token is None:
                continue
            counts = iter([len(rows) for rows in encoded[modality].pooler_output])
            texts = [
                "".join(part if i == 0 else token * next(counts) + part for i, part in enumerate(text.split(token)))
                for text in texts
            ]
        return texts

    @torch.inference_mode()
    def generate(
        self,
        requests: list[Request],
        settings: Generation,
        image_features: dict | BaseModelOutputWithPooling | None = None,
    ) -> list[Output]:
        """Generate for a batch (left-padded). With ``image_features`` (one request: what
        ``encode`` returned), the image tokens computed in an earlier turn are reused and the
        tower does not run."""
        clock = StageClock(self.device)
        self._clock = clock
        self.memory.reset()
        clock.mark("start")
        try:
            texts = [self.prompt(r) for r in requests]
            # a backend may build its own inputs (the llava package's models); it then encodes
            # the images itself, and cached image_features are not used
            own = self.backend.prepare_inputs(self.processor, texts, [r.images for r in requests])
            if own is not None:
                image_features = None
                inputs = own
            elif image_features is not None:
                encoded = image_features if isinstance(image_features, dict) else {"image": image_features}
                # fresh output objects: generate may rewrite them (beam expansion)
                encoded = {k: BaseModelOutputWithPooling(pooler_output=v.pooler_output) for k, v in encoded.items()}
                texts = self._expand_placeholders(texts, encoded)
                inputs = self.tokenizer(texts, return_tensors="pt", padding=True)
            elif visual := self._visual([r.images for r in requests], [r.videos for r in requests]):
                inputs = self.processor(**visual, text=texts, return_tensors="pt", padding=True, **self._image_kwargs)
            else:
                inputs = self.tokenizer(texts, return_tensors="pt", padding=True)
            inputs = self._to_device(inputs)
            if image_features is not None:
                inputs["mm_encoder_outputs"] = encoded
            out = self.backend.generate(inputs, **self._generate_kwargs(settings))
            clock.mark("end")
        finally:
            self._clock = None
        clock.finish()
        peak = self.memory.read()
        return self._outputs(requests, inputs, out, settings, clock, peak, reused=image_features is not None)

    def _generate_kwargs(self, settings: Generation) -> dict:
        sample = settings.temperature > 0
        kwargs = dict(
            max_new_tokens=settings.max_new_tokens,
            do_sample=sample,
            num_beams=settings.num_beams,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        spelt = [stop for stop in settings.until if self._can_spell(stop)]
        if spelt:
            kwargs.update(stop_strings=spelt, tokenizer=self.tokenizer)
        return kwargs

    def _can_spell(self, stop: str) -> bool:
        """Whether the tokenizer can produce ``stop`` (decode(encode(stop)) == stop). transformers'
        stop-string matching refuses strings no token sequence spells (e.g. "\n\n" for a
        tokenizer that drops whitespace); those are applied to the decoded text only."""
        if stop not in self._spellable:
            ids = self.tokenizer(stop, add_special_tokens=False)["input_ids"]
            self._spellable[stop] = self.tokenizer.decode(ids) == stop
        return self._spellable[stop]

    def _outputs(self, requests, inputs, out, settings, clock, peak, reused) -> list[Output]:
        input_ids = inputs["input_ids"]
        prompt_len = input_ids.shape[1]
        vision = self._vision_flops(inputs, requests) if not reused else [(0, 0)] * len(requests)
        eos = self.tokenizer.eos_token_id
        per_layer = llm_pruning.visual_tokens_per_layer(self.model)  # None unless pruned in the LLM
        timings = dict(
            vision_ms=clock.ms("vision_start", "vision_end") if not reused else 0.0,
            prefill_ms=clock.ms("prefill_start", "prefill_end"),
            ttft_ms=clock.ms("start", "first_token"),
            decode_ms=clock.ms("prefill_end", "last_forward_end"),
            total_ms=clock.ms("start", "end"),
        )
        outputs = []
        for row, request in enumerate(requests):
            visual, prompt_tokens = self.backend.count_tokens(
                input_ids[row], inputs["attention_mask"][row], self.tokens_per_image
            )
            new = out[row, prompt_len:].tolist()
            generated = len(new)
            if eos in new:
                generated = new.index(eos) + 1
            text = self.tokenizer.decode(new[:generated], skip_special_tokens=True)
            for stop in settings.until:
                text = text.split(stop)[0]
            text = _XML_ILLEGAL.sub("", text)
            images = len(request.images)
            after, average, layer_tokens = visual, visual, None
            if per_layer is not None:
                kept = per_layer[row].tolist()
                after, average = int(kept[-1]), round(sum(kept) / len(kept), 3)
                layer_tokens = [prompt_tokens - visual + int(k) for k in kept]
            metrics = dict(
                visual_tokens=visual,
                visual_tokens_after_pruning=after,
                # the mean over LLM layers (in-LLM methods' count=average; what SparseVLM v1 reached)
                visual_tokens_layer_average=average,
                prompt_tokens=prompt_tokens,
                generated_tokens=generated,
                images=images,
                batch_size=len(requests),
                image_tokens_reused=reused,
                **timings,
                peak_memory_bytes=peak,
                peak_memory_kind=self.memory.kind,
                prefill_flops=prefill_flops(self.decoder_shape, prompt_tokens, tokens_per_layer=layer_tokens),
                vision_flops=vision[row][1],
                vision_units=vision[row][0],
            )
            outputs.append(Output(text=text.strip(), metrics=metrics))
        return outputs


def resolve_image_aspect(backend, processor, requested: str | None) -> str | None:
    """The ``image_aspect`` an engine runs with: ``requested`` (pad / crop) where the model takes
    one (LLaVA-1.5 through transformers), else what the processor does by itself. Families that
    shape their own images (AnyRes, native resolution, the original LLaVA following its config)
    accept only their own behaviour, and refuse another on one line."""
    requested = parse_image_aspect(requested)
    if backend.image_aspects:
        return requested or backend.native_image_aspect(processor)
    own = backend.native_image_aspect(processor)
    if requested is None or requested == own:
        return own
    how = {
        "pad": "pads to a square as its config's image_aspect_ratio=pad says: drop image_aspect or set image_aspect=pad",
        "crop": "resizes and centre-crops as its config says: drop image_aspect or set image_aspect=crop",
    }.get(own, "shapes its images itself: drop image_aspect")
    raise ValueError(f"image_aspect={requested} is for LLaVA-1.5 models; {backend.name} {how}")
