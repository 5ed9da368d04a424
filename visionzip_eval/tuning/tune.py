"""``visionzip-eval tune``: fine-tune a llava-hf LLaVA under a token reduction (the paper's
VisionZip‡: the projector alone, on a tenth of LLaVA-1.5's instruction data).

The reduction is the evaluation's: the method from the registry, applied to the model instance
by the same hooks (``TokenReducer.apply``), so the training forward is tower -> selection ->
projector -> LLM exactly as at evaluation, and the gradient reaches the projector through the
selection and merge. The loop is transformers' ``Trainer`` (mixed precision, gradient
checkpointing, multi-GPU through ``torchrun`` / ``accelerate launch``, DeepSpeed, checkpoints
and resume, the progress bar); this module chooses what trains, feeds it
(:mod:`visionzip_eval.tuning.data`), measures each optimizer step and writes
``visionzip_tuning.json``, last, into the output folder: a folder without it is not a finished
tuning.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TUNING_JSON = "visionzip_tuning.json"
# what --train makes trainable: LlavaHFBackend.modules() names
TRAIN_PARTS = {
    "projector": ("projector",),
    "projector+llm": ("projector", "language_model", "lm_head"),
    "all": ("projector", "language_model", "lm_head", "vision_tower"),
}
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TuneOptions:
    """The ``tune`` command's options (defaults: LLaVA-1.5's fine-tuning recipe where it has one)."""

    model: str
    data: str
    image_folder: str
    output: str
    method: str = "visionzip"
    budget: str = "64"
    train: str = "projector"
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    lr: float = 2e-5
    batch_size: int = 16  # per device
    grad_accum: int = 1
    data_fraction: float = 1.0
    seed: int = 0
    resume: bool = False
    save_steps: int = 500
    logging_steps: int = 10
    warmup: float = 0.03  # ratio of the steps (< 1) or a step count
    weight_decay: float = 0.0
    max_length: int = 2048
    dtype: str = "auto"
    image_aspect: str | None = None
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    num_workers: int = 0


def checkpoints(output: Path) -> list[Path]:
    """Trainer's ``checkpoint-<step>`` folders in ``output``, oldest first."""
    if not output.is_dir():
        return []
    found = [p for p in output.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _check_options(options: TuneOptions):
    """Everything that can be checked without the model: (method spec, budget, output path)."""
    from visionzip_eval.budget import Budget
    from visionzip_eval.methods import MethodSpec, method_info

    if options.train not in TRAIN_PARTS:
        raise ValueError(f"unknown --train {options.train!r}: choose {', '.join(TRAIN_PARTS)} "
                         "(the paper's VisionZip‡ trains the projector)")
    if options.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {options.dtype!r}: choose {', '.join(DTYPES)}")
    spec = MethodSpec.parse(options.method)
    budget = Budget.parse(options.budget)
    if not spec.is_none and method_info(spec.name).kind != "pre-llm":
        raise ValueError(f"method {spec.name!r} prunes inside the LLM: tune supports the pre-LLM methods "
                         "(visionzip-eval methods --kind pre-llm)")
    spec.build(budget)  # counts valid for the method
    for name, value, low in (("--lr", options.lr, 0.0), ("--epochs", options.epochs, 0.0)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > low):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    for name, value in (("--batch-size", options.batch_size), ("--grad-accum", options.grad_accum),
                        ("--save-steps", options.save_steps), ("--logging-steps", options.logging_steps),
                        ("--max-length", options.max_length)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not (options.max_steps == -1 or options.max_steps >= 1):
        raise ValueError(f"--max-steps must be >= 1 (or -1: train --epochs), got {options.max_steps!r}")
    output = Path(options.output)
    if (output / TUNING_JSON).exists():
        raise ValueError(f"--output {output} already holds a finished tuning ({TUNING_JSON}): choose another "
                         "folder or delete it")
    found = checkpoints(output)
    if options.resume and not found:
        raise ValueError(f"--resume: {output} holds no checkpoint-* folder to continue from: drop --resume to start")
    if not options.resume and output.exists() and any(output.iterdir()):
        what = f"checkpoints of an unfinished run ({found[-1].name})" if found else "files"
        raise ValueError(f"--output {output} already holds {what}: pass --resume to continue it, or choose an "
                         "empty folder")
    return spec, budget, output


def _check_family(pretrained: str) -> None:
    """Only llava-hf LLaVA-1.5 (``LlavaForConditionalGeneration`` with a CLIP tower) is supported:
    its chat template, placeholder expansion and projector are what this module relies on."""
    from visionzip_eval.backends.llava_hf import LlavaHFBackend
    from visionzip_eval.loading import BUILTIN_PREFIX, backend_for_checkpoint, builtin_models

    if pretrained.startswith(BUILTIN_PREFIX):
        builtins = builtin_models()
        if pretrained not in builtins:
            raise ValueError(f"unknown builtin model {pretrained!r}: choose one of {', '.join(sorted(builtins))}")
        backend = builtins[pretrained][0]
    else:
        backend = backend_for_checkpoint(pretrained)
    if backend is not LlavaHFBackend:
        raise ValueError(f"--model {pretrained}: tune supports llava-hf LLaVA-1.5 checkpoints "
                         f"(LlavaForConditionalGeneration), not {backend.name}")


def _resolve_dtype(name: str):
    from visionzip_eval.loading import resolve_device, resolve_dtype

    return resolve_dtype(name, resolve_device("auto"), prefer_bfloat16=True)


def freeze(model, backend, train: str) -> list[str]:
    """Make only the ``train`` parts trainable (float32 master weights where the model is in
    half precision); returns their names."""
    import torch

    parts = TRAIN_PARTS[train]
    modules = backend.modules()
    model.requires_grad_(False)
    for name in parts:
        module = modules[name]
        module.requires_grad_(True)
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in module.parameters()):
            module.float()  # mixed precision: the Trainer's autocast computes in half, the updates land in float32
    return list(parts)


def _trainer_class():
    import torch
    from transformers import Trainer, TrainerCallback

    from visionzip_eval.profiling import PeakMemory

    class StepMeter(TrainerCallback):
        """Wall time of each optimizer step (forward + backward + update, device synchronised)
        and the peak memory over the run."""

        def __init__(self, device):
            self.memory = PeakMemory(device)
            self.cuda = self.memory.cuda
            self.times: list[float] = []
            self._start = None

        def _now(self) -> float:
            if self.cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.memory.reset()

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            if self._start is not None:
                self.times.append(self._now() - self._start)
            if state.global_step >= state.max_steps:  # the loss logged last is the final step's,
                control.should_log = True  # whatever --logging-steps says (else final_loss: null)

        def summary(self) -> dict:
            # the first step of a run warms up (allocator, lazy inits): left out when there are others
            times = self.times[1:] if len(self.times) > 1 else self.times
            peak = self.memory.read()
            return {
                "step_seconds_median": round(statistics.median(times), 4) if times else None,
                "step_seconds_min": round(min(times), 4) if times else None,
                "step_seconds_max": round(max(times), 4) if times else None,
                "steps_timed": len(times),
                "peak_memory_bytes": peak,
                "peak_memory_kind": self.memory.kind,
            }

    class TuningTrainer(Trainer):
        """Trainer whose log lines also carry the step time and the peak memory so far."""

        meter: StepMeter

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if "loss" in logs and self.meter.times:
                logs["step_s"] = round(self.meter.times[-1], 3)
                peak = self.meter.memory.read()
                if peak is not None:
                    logs["peak_mem_gib"] = round(peak / 2**30, 3)
            super().log(logs, start_time)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            # Trainer's resume loads a checkpoint's raw state dict, but save_pretrained writes LLaVA
            # under its original key names (language_model.model.*): every key missed, the weights
            # stayed the base model's with a warning only. from_pretrained maps the names back; it
            # loads in float32 so that float32 master weights come back exactly (a transient copy).
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            model = model or self.model
            saved = type(model).from_pretrained(resume_from_checkpoint, dtype=torch.float32)
            model.load_state_dict(saved.state_dict(), strict=True)

    return TuningTrainer, StepMeter


def tune(options: TuneOptions, callbacks: tuple = (), log=print) -> dict:
    """Fine-tune ``options.model`` under its reduction; returns what ``visionzip_tuning.json``
    holds. Every input is checked before the output folder is created."""

    import torch

    from visionzip_eval import records
    from visionzip_eval.apply import remove_reduction, tokens_per_image
    from visionzip_eval.backends import backend_for
    from visionzip_eval.loading import load_pretrained
    from visionzip_eval.media import parse_image_aspect
    from visionzip_eval.tuning.data import Collator, ConversationDataset, read_samples

    spec, budget, output = _check_options(options)
    image_aspect = parse_image_aspect(options.image_aspect)
    _check_family(options.model)
    samples, data = read_samples(options.data, options.image_folder, options.data_fraction, options.seed)
    log(f"data: {data.used} samples of {data.total} in {data.path}"
        + (f" ({data.text_only} text-only left out)" if data.text_only else ""))

    dtype = _resolve_dtype(options.dtype)
    model, processor = load_pretrained(options.model, dtype, torch.device("cpu"))
    backend = backend_for(model)
    reducer = spec.build(budget, seed=options.seed)
    reducer.apply(model)  # the evaluation's hooks; checks the budget against the tower
    per_image = tokens_per_image(model)
    dataset = ConversationDataset(samples, processor, per_image, backend.image_token_id, options.max_length)
    trained = freeze(model, backend, options.train)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {options.model}, {spec.label} at {budget.label} ({per_image} visual tokens per image), "
        f"training {'+'.join(trained)}: {trainable / 1e6:.3f} M of {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters")

    args = _training_arguments(options, output, dtype)
    TuningTrainer, StepMeter = _trainer_class()
    meter = StepMeter(args.device)
    trainer = TuningTrainer(model=model, args=args, train_dataset=dataset,
                            data_collator=Collator(processor, backend, image_aspect),
                            callbacks=[meter, *callbacks])
    trainer.meter = meter
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoints(output)[-1]) if options.resume else None)
    seconds = time.perf_counter() - start

    remove_reduction(model)
    for name in trained:  # the folder holds one dtype, the one the model was loaded in
        backend.modules()[name].to(dtype)
    trainer.save_model(str(output))  # on the main process (the Trainer sees to it)
    record = _tuning_record(options, spec.label, budget.label, per_image, trained, trainable, data,
                            trainer, result.training_loss, meter.summary(), seconds, str(args.device), dtype)
    if trainer.is_world_process_zero():  # one writer under torchrun / accelerate launch
        processor.save_pretrained(str(output))
        records.write_atomic(output / TUNING_JSON, json.dumps(record, indent=1) + "\n")  # last: the run is complete
    return record


def _training_arguments(options: TuneOptions, output: Path, dtype):
    """transformers' TrainingArguments for ``options``: a cosine schedule, one checkpoint kept,
    mixed precision when the model is loaded in half precision, the CPU when there is no GPU."""
    import torch
    from transformers import TrainingArguments

    half = dtype in (torch.float16, torch.bfloat16)
    return TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.lr,
        weight_decay=options.weight_decay,
        warmup_steps=options.warmup,
        lr_scheduler_type="cosine",
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        logging_steps=options.logging_steps,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=1,
        seed=options.seed,
        data_seed=options.seed,
        bf16=half and dtype == torch.bfloat16,
        fp16=half and dtype == torch.float16,
        activation_checkpointing=options.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if options.gradient_checkpointing else None,
        deepspeed=options.deepspeed,
        dataloader_num_workers=options.num_workers,
        remove_unused_columns=False,  # the collator reads the image paths
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )


def _tuning_record(options: TuneOptions, method: str, budget: str, per_image: int, trained: list[str],
                   trainable: int, data, trainer, mean_loss: float, timing: dict, seconds: float, device: str,
                   dtype) -> dict:
    """What ``visionzip_tuning.json`` holds: the run's settings, data, losses, timing and versions."""
    import platform

    import torch
    import transformers

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "base_model": options.model,
        "method": method,
        "budget": budget,
        "tokens_per_image": per_image,
        "trained": trained,
        "trainable_parameters": trainable,
        "data": {**data.as_dict(), "fraction": options.data_fraction, "image_folder": str(options.image_folder)},
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "seed": options.seed,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": round(float(mean_loss), 6),
        "loss_history": [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e],
        **timing,
        "seconds": round(seconds, 1),
        "resumed": options.resume,
        "options": asdict(options),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    return record


def read_tuning(folder) -> dict | None:
    """``visionzip_tuning.json`` of a model folder, None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(folder) / TUNING_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
