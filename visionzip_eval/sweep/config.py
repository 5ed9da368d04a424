"""Sweep configuration: a YAML file validated by pydantic (unknown keys are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from visionzip_eval.budget import Budget
from visionzip_eval.media import parse_image_aspect
from visionzip_eval.methods.registry import MethodSpec


class ConfigError(ValueError):
    """A sweep config that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class ModelSpec(_Strict):
    name: str = Field(description="short label used in run folder names")
    pretrained: str = Field(description="hub id, local folder, or builtin:tiny-llava")
    dtype: str = "auto"
    attn_implementation: str | None = None
    image_aspect: Literal["pad", "crop"] | None = Field(
        None,
        description="LLaVA-1.5: pad = square on the processor's mean colour (the original LLaVA-1.5 and the "
        "paper), crop = resize and centre-crop (the llava-hf processors); unset: the checkpoint's own",
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="vllm: the LLM served by vLLM (pre-LLM methods; run from .venv-vllm)")
    args: dict[str, Any] = Field(default_factory=dict, description="other adapter model_args")

    @field_validator("image_aspect", mode="before")
    @classmethod
    def _image_aspect(cls, value):
        return parse_image_aspect(value)

    @model_validator(mode="after")
    def _image_aspect_to_args(self) -> ModelSpec:
        """``image_aspect`` travels to the adapter with the other model_args (``args``), where
        every executor reads them; the two places must not disagree."""
        given = parse_image_aspect(self.args.get("image_aspect"))
        if given is not None and self.image_aspect is not None and given != self.image_aspect:
            raise ValueError(
                f"image_aspect is {self.image_aspect} but args.image_aspect is {given}: give it once, as image_aspect"
            )
        if self.engine != "transformers":  # travels with the model_args too
            if self.args.get("engine", self.engine) != self.engine:
                raise ValueError(f"engine is {self.engine} but args.engine is {self.args['engine']}: give it once, as engine")
            self.args = {**self.args, "engine": self.engine}
        aspect = self.image_aspect or given
        if aspect is not None:
            self.image_aspect = aspect
            self.args = {**self.args, "image_aspect": aspect}
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\ ") or value.startswith("."):
            raise ValueError("must be non-empty, without '/', '\\\\', spaces or a leading '.'")
        return value


class LmmsEvalOptions(_Strict):
    batch_size: int = 1
    gen_kwargs: str | None = None
    log_samples: bool = True
    bootstrap_iters: int = 100000
    max_new_tokens: int = 128
    warmup: int = 2


class SlurmOptions(_Strict):
    partition: str | None = None
    gpus_per_job: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 64
    time_min: int = 240
    array_parallelism: int = 8
    jobs: int = 4
    account: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="more submitit slurm_* parameters")


class ExecutorSpec(_Strict):
    kind: Literal["local", "slurm"] = "local"
    devices: list[str] = Field(default_factory=lambda: ["auto"], description="one worker per device")
    accelerate: bool = Field(False, description="run each run under `accelerate launch` (data parallel)")
    accelerate_processes: int = 1
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)


class SweepConfig(_Strict):
    name: str
    models: list[ModelSpec]
    methods: list[MethodSpec] = Field(
        default_factory=lambda: [MethodSpec("visionzip")],
        description="method names, or mappings {name: vispruner, important_ratio: 0.3} with options",
    )
    budgets: list[Budget] = Field(default_factory=lambda: [Budget.parse(b) for b in ("full", 192, 128, 64)])
    tasks: list[str]
    include_path: str | None = Field(None, description="folder of extra lmms-eval task YAMLs")
    limit: int | None = None
    seeds: list[int] = Field(default_factory=lambda: [0])
    output_dir: str = "results"
    lmms_eval: LmmsEvalOptions = Field(default_factory=LmmsEvalOptions)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)

    # Parsed once here into typed values; everything downstream passes them as they are.
    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, value) -> list[MethodSpec]:
        return [MethodSpec.parse(method) for method in _as_list(value)]

    @field_validator("budgets", mode="before")
    @classmethod
    def _budgets(cls, value) -> list[Budget]:
        return [Budget.parse(budget) for budget in _as_list(value)]

    @field_validator("models", "tasks", "seeds", "methods", "budgets")
    @classmethod
    def _not_empty(cls, value: list) -> list:
        if not value:
            raise ValueError("must list at least one entry")
        return value

    @model_validator(mode="after")
    def _mme_limit_even(self) -> SweepConfig:
        """lmms-eval scores MME's questions in pairs (two per image) and asserts on a lone one at
        aggregation, after the whole run: an odd limit would fail every MME run at its end."""
        from visionzip_eval.benchmarks import benchmark_key

        mme = [task for task in self.tasks if benchmark_key(task) == "MME"]
        if self.limit is not None and self.limit % 2 and mme:
            raise ValueError(f"limit {self.limit} is odd, and MME ({', '.join(mme)}) scores its questions in "
                             f"pairs: use an even limit ({self.limit + 1})")
        return self

    @model_validator(mode="after")
    def _methods_build(self) -> SweepConfig:
        """Options that are each valid but not together (VisionZip's selection_precision=reference
        with merge=average) fail here, not in every run."""
        for method in self.methods:
            for budget in self.budgets:
                if budget.is_full:
                    continue
                try:
                    method.build(budget)
                except ValueError as error:
                    raise ValueError(f"method {method.label} at budget {budget.label}: {error}") from None
        return self


def _as_list(value) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list, got {value!r}")
    return list(value)


def _location(error: dict) -> str:
    return ".".join(str(part) for part in error["loc"]) or "(top level)"


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``list[ModelSpec]``, ``X | None``, ...)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _key_guess(loc: tuple) -> str:
    """``: did you mean budgets?`` for an unknown key close to one its mapping takes (as
    misspelt task names get), else ''."""
    import difflib

    models: list[type[BaseModel]] = [SweepConfig]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        models = ([m for f in fields for m in _models_in(f.annotation)] if fields
                  else [m for m in models if m.__name__ == part])  # a union member pydantic names
        if not models:
            return ""
    keys = sorted({key for model in models for key in model.model_fields})
    guesses = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    return f": did you mean {guesses[0]}?" if guesses else ""


def _one_line(error: yaml.YAMLError) -> str:
    """The YAML error's problem and where, on one line (its text spans several, with a caret)."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem}, line {mark.line + 1} column {mark.column + 1}"
    return " ".join(str(error).split()) or type(error).__name__


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep config; relative paths in it resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not a text file (not UTF-8: byte {error.object[error.start]:#04x} at offset {error.start}); "
            "a sweep config is a YAML file (see configs/)"
        ) from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file ({error.strerror or error})") from None
    if "\x00" in text:
        raise ConfigError(
            f"{path}: not a text file (NUL character at offset {text.index(chr(0))}); a sweep config is a YAML file (see configs/)"
        )
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(error)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    try:
        config = SweepConfig.model_validate(raw)
    except ValidationError as error:
        typos = [e for e in error.errors() if e["type"] == "extra_forbidden" and _key_guess(e["loc"])]
        first = (typos or error.errors())[0]  # a misspelt key explains the "missing" one beside it
        kind = f"unknown key{_key_guess(first['loc'])}" if first["type"] == "extra_forbidden" else first["msg"]
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise ConfigError(f"{path}: {_location(first)}: {kind}{more}") from None
    if config.include_path and not Path(config.include_path).is_absolute():
        config.include_path = str((path.parent / config.include_path).resolve())
    return config
