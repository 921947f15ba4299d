"""Recipes: plain YAML that maps one to one onto the job's frozen dataclasses.

    model: smollm2-135m
    prune: {method: sparsegpt, pattern: "2:4"}
    calibration: {source: wikipedia, samples: 128, seqlen: 2048}
    evaluation: {source: wikipedia, windows: 16}
    out: ./smol-2of4

Top-level keys are the fields of :class:`~llmprune.jobs.pipeline.Job`; ``prune`` holds the fields of
:class:`~llmprune.engine.config.PruneConfig`, or of :class:`StructuredConfig` when its pattern is a
structure (heads, channels, structured, layers); ``calibration``, ``evaluation`` and ``tasks``
those of their configs. Unknown keys fail with a "did you mean" suggestion, values are checked
against the field's type, and ``--set key.sub=value`` overrides any of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from llmprune.engine.config import CalibrationConfig, PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.jobs.spec import EvalConfig, Job, TasksConfig
from llmprune.structured.run import STRUCTURES, StructuredConfig

SECTIONS: dict[str, type] = {"calibration": CalibrationConfig, "evaluation": EvalConfig, "tasks": TasksConfig}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against (and converted to) ``hint``; a clear error naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, option)
            except LlmpruneError:
                continue
    elif origin is typing.Literal:
        if value in args:
            return value
    elif origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            inner = args[0] if args and args[-1] is Ellipsis else None
            if inner is not None:
                return tuple(_coerce(key, item.strip() if isinstance(item, str) else item, inner) for item in items)
            if len(items) == len(args):
                return tuple(_coerce(key, item, a) for item, a in zip(items, args, strict=True))
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is type(None) and value is None:
        return None
    extra = "; quote N:M patterns (\"2:4\"), YAML reads 2:4 as a number" if key.endswith("pattern") else ""
    raise LlmpruneError(f"recipe key {key}: expected {_describe(hint)}, got {value!r}{extra}")


def _unknown(key: str, known: Iterable[str]) -> LlmpruneError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(known)}"
    return LlmpruneError(f"unknown recipe key {key}{hint}")


def _section(prefix: str, cls: type, data: Any, origin: str | None = None) -> Any:
    if not isinstance(data, Mapping):
        raise LlmpruneError(f"recipe key {prefix}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = _hints(cls)
    values = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown(f"{prefix}.{key}", (f"{prefix}.{k}" for k in hints))
        values[key] = _coerce(f"{prefix}.{key}", value, hints[key])
    try:
        return cls(**values)
    except LlmpruneError as exc:
        raise LlmpruneError(f"{origin + ', ' if origin else ''}{prefix}: {exc}") from None


def prune_class(data: Mapping[str, Any]) -> type:
    return StructuredConfig if data.get("pattern") in STRUCTURES else PruneConfig


def job_from_dict(data: Mapping[str, Any], origin: str | None = None) -> Job:
    """A :class:`Job` from recipe data (every key and value checked). ``origin`` (e.g. "recipe
    x.yaml") is named in the errors of a section's values."""
    if not isinstance(data, Mapping):
        raise LlmpruneError(f"a recipe is a mapping of job fields, got {type(data).__name__}")
    hints = _hints(Job)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "prune":
            values[key] = _section(key, prune_class(value if isinstance(value, Mapping) else {}), value, origin)
        elif key in SECTIONS:
            values[key] = _section(key, SECTIONS[key], value, origin)
        elif key in hints:
            values[key] = _coerce(key, value, hints[key])
        else:
            raise _unknown(key, hints)
    if "model" not in values:
        raise LlmpruneError("recipe key model is required (a built-in name, folder, .gguf or Hub id)")
    return Job(**values)


def job_to_dict(job: Job) -> dict[str, Any]:
    """The recipe data of ``job`` (round-trips through :func:`job_from_dict`)."""
    data = dataclasses.asdict(job)
    if isinstance(job.prune, StructuredConfig) and job.prune.split is not None:
        data["prune"]["split"] = list(job.prune.split)
    data["tasks"]["names"] = list(job.tasks.names)
    return data


def _field_hint(dotted: str, data: Mapping[str, Any]) -> Any:
    head, _, rest = dotted.partition(".")
    if not rest:
        hints = _hints(Job)
        if head not in hints:
            raise _unknown(head, hints)
        return hints[head]
    if head == "prune":
        cls = prune_class(data.get("prune") or {})
    elif head in SECTIONS:
        cls = SECTIONS[head]
    else:
        raise _unknown(dotted, [f"{s}.x" for s in ("prune", *SECTIONS)])
    hints = _hints(cls)
    if rest not in hints:
        raise _unknown(dotted, (f"{head}.{k}" for k in hints))
    return hints[rest]


def apply_set(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set key.sub=value`` to recipe ``data`` (a string field takes the text as
    it is, so ``prune.pattern=2:4`` works; other values are read as YAML)."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise LlmpruneError(f"--set expects KEY=VALUE (e.g. calibration.samples=64), got {assignment!r}")
    hint = _field_hint(key, data)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    takes_text = hint is str or (optional and str in typing.get_args(hint))
    value: Any
    if optional and text.strip().lower() in ("null", "none", "~", ""):
        value = None
    elif takes_text:
        value = text
    else:
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise LlmpruneError(f"--set {key}: cannot read {text!r} ({exc})") from None
    head, _, rest = key.partition(".")
    if rest:
        section = data.setdefault(head, {})
        if not isinstance(section, dict):
            raise LlmpruneError(f"recipe key {head} is not a mapping")
        section[rest] = value
    else:
        data[key] = value


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The raw recipe data of a YAML file."""
    file = Path(path)
    if not file.is_file():
        raise LlmpruneError(f"recipe {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise LlmpruneError(f"recipe {file} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LlmpruneError(f"recipe {file} must be a mapping of job fields")
    return data


def load_recipe(path: str | Path, sets: Iterable[str] = ()) -> Job:
    """The job of recipe ``path`` with ``--set`` overrides applied."""
    data = read_recipe(path)
    for assignment in sets:
        apply_set(data, assignment)
    return job_from_dict(data, origin=f"recipe {path}")
