"""The method registry: register by decorator, build by name, list everything registered
(as timm's ``@register_model`` / ``create_model`` / ``list_models``).

``MethodSpec`` is the typed form of "a method and its options" that crosses every boundary
(sweep config, adapter model_args, run folders, reports): parsed and validated once, then
passed as is. Its ``label`` (``vispruner`` or ``vispruner,important_ratio=0.3``: non-default
options only, the model_args syntax) names run folders and report rows.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Literal

from visionzip_eval.budget import Budget
from visionzip_eval.methods.base import NoReduction, TokenReducer
from visionzip_eval.records import FULL_METHOD as NONE  # the label of full-budget runs

KINDS = ("pre-llm", "in-llm")


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type: Any
    default: Any

    @property
    def type_name(self) -> str:
        if typing.get_origin(self.type) is Literal:
            return "/".join(repr(v) for v in typing.get_args(self.type))
        return getattr(self.type, "__name__", str(self.type))

    def coerce(self, method: str, value: Any) -> Any:
        """``value`` as this option's type (model_args arrive as text or as lmms-eval's guess)."""
        kind = self.type
        problem = f"method {method!r}: option {self.name} must be {self.type_name}, got {value!r}"
        if typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            if value not in choices:
                raise ValueError(problem)
            return value
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise ValueError(problem)
        if kind is int:
            if isinstance(value, bool):
                raise ValueError(problem)
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            try:
                return int(str(value).strip())
            except ValueError:
                raise ValueError(problem) from None
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(problem)
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ValueError(problem) from None
        if kind is str:
            return str(value)
        return value

    def as_dict(self) -> dict:
        return {"name": self.name, "type": self.type_name, "default": self.default}


@dataclass(frozen=True)
class MethodInfo:
    """One registered method: its class and what ``visionzip-eval methods`` prints."""

    name: str
    cls: type
    kind: str
    display: str
    paper: str
    code: str

    @property
    def description(self) -> str:
        doc = (self.cls.__doc__ or "").strip()
        return " ".join(doc.split("\n\n")[0].split())

    @property
    def options(self) -> list[OptionInfo]:
        hints = typing.get_type_hints(self.cls)
        out = []
        for f in fields(self.cls):
            if f.name in self.cls.budget_fields or not f.init:
                continue
            default = f.default if f.default is not MISSING else None
            out.append(OptionInfo(f.name, hints.get(f.name, Any), default))
        return out

    def as_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "display": self.display, "description": self.description,
            "options": [o.as_dict() for o in self.options], "paper": self.paper, "code": self.code,
        }


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(
    name: str, *, kind: str = "pre-llm", display: str | None = None, paper: str = "", code: str = ""
) -> Callable[[type], type]:
    """Class decorator: register a ``TokenReducer`` dataclass under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].cls.__name__}, {cls.__name__})")
        if name == NONE or "," in name or "__" in name:
            raise ValueError(f"{name!r} cannot name a method (reserved, or breaks run folder names)")
        cls.name, cls.kind = name, kind
        _REGISTRY[name] = MethodInfo(name, cls, kind, display or name, paper, code)
        return cls

    return decorate


def list_methods(kind: str | None = None) -> list[MethodInfo]:
    """Every registered method (of ``kind`` if given), by name."""
    return [info for name, info in sorted(_REGISTRY.items()) if kind is None or info.kind == kind]


def method_info(name: str) -> MethodInfo:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def display_name(label: str) -> str:
    """How reports name a method label: ``VisPruner`` or ``VisPruner (important_ratio=0.3)``;
    labels of unregistered methods come back unchanged."""
    name, _, options = str(label).partition(",")
    info = _REGISTRY.get(name)
    if info is None:
        return str(label)
    return f"{info.display} ({options.replace(',', ', ')})" if options else info.display


@dataclass(frozen=True)
class MethodSpec:
    """A method name and its non-default options, validated and typed."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, value: MethodSpec | str | dict, **options) -> MethodSpec:
        """From a spec, a name or label (``"vispruner,important_ratio=0.3"``), or a mapping
        (``{"name": "vispruner", "important_ratio": 0.3}``), plus ``options``."""
        if isinstance(value, MethodSpec):
            if not options:
                return value
            value = {"name": value.name, **dict(value.options)}
        if isinstance(value, dict):
            given = dict(value)
            if "name" not in given:
                raise ValueError(f"a method entry needs a name, got {value!r}")
            name = given.pop("name")
        elif isinstance(value, str):
            name, *pairs = [part.strip() for part in value.split(",")]
            given = {}
            for pair in pairs:
                key, sep, text = pair.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"cannot read method option {pair!r} in {value!r}: write name=value")
                given[key.strip()] = text.strip()
        else:
            raise ValueError(f"a method is a name or a mapping with a name, got {value!r}")
        given.update(options)
        if name == NONE and not given:
            return cls(NONE)
        info = method_info(str(name))
        known = {o.name: o for o in info.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            valid = ", ".join(f"{o.name} ({o.type_name}, default {o.default!r})" for o in known.values()) or "none"
            raise ValueError(f"method {info.name!r} has no option {', '.join(unknown)}: its options are {valid}")
        typed = {key: known[key].coerce(info.name, raw) for key, raw in given.items()}
        non_default = tuple(sorted((k, v) for k, v in typed.items() if v != known[k].default))
        return cls(info.name, non_default)

    @property
    def label(self) -> str:
        return ",".join([self.name] + [f"{k}={_text(v)}" for k, v in self.options])

    @property
    def is_none(self) -> bool:
        return self.name == NONE

    def as_dict(self) -> dict:
        return {"name": self.name, **dict(self.options)}

    def build(self, budget: Budget | int | str | None, **fallbacks) -> TokenReducer:
        """The reducer for this method at ``budget`` (``full``: no reduction, whatever the
        method). ``fallbacks`` fill options this spec leaves unset, where the method has them
        (the run's ``seed`` for the random baseline), without changing the label."""
        parsed = Budget.parse(budget)
        if parsed.is_full or self.is_none:
            if not parsed.is_full:
                raise ValueError(f"method 'none' keeps every token: its budget is full, got {parsed.label}")
            return NoReduction()
        info = method_info(self.name)
        names = {o.name for o in info.options}
        options = {k: v for k, v in fallbacks.items() if k in names}
        options.update(self.options)
        return info.cls.from_budget(parsed, **options)

    def __str__(self) -> str:
        return self.label


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def get_method(name: MethodSpec | str | dict, budget: Budget | int | str | None = "full", **options) -> TokenReducer:
    """Build a reducer by name: ``get_method("vispruner", 64, important_ratio=0.3)``."""
    return MethodSpec.parse(name, **options).build(budget)
