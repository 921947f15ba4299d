"""What a client may ask of the service: a recipe whose every path stays inside the service's
own folders. Checked before a job is queued; the server, not the client, decides where outputs
go and which device runs them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError
from llmprune.io.data import BUILTIN, HUB_SETS
from llmprune.io.loading import BUILTIN_MODELS
from llmprune.jobs.recipe import job_from_dict
from llmprune.jobs.spec import Job

# Keys that name places on the server or choose its hardware: the server sets them.
SERVER_KEYS = {"out": "the server puts each job's output under its --workdir",
               "offload_dir": "the server keeps offloaded activations beside the job",
               "overwrite": "every job writes a folder of its own",
               "resume": "the server resumes its own interrupted jobs",
               "device": "the server's --workers choose the device",
               "device_map": "the server's --workers choose the devices"}
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _inside(path: str, roots: Sequence[Path], what: str, key: str) -> str:
    """``path`` resolved (symlinks followed) when it lies inside one of ``roots``, else refused.
    A relative path is taken relative to each root in turn."""
    candidate = Path(path)
    if "~" in path or "\x00" in path or not path.strip():
        raise LlmpruneError(f"{key}: {path!r} is not a {what} the service can read")
    for root in roots:
        try:
            resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        except (OSError, RuntimeError, ValueError):  # a link loop, a name the system refuses
            continue
        if resolved.is_relative_to(root.resolve()) and resolved.exists():
            return str(resolved)
    where = ", ".join(str(r) for r in roots) or "none configured"
    raise LlmpruneError(f"{key}: {path!r} is not a {what} under the service's folders ({where})")


def _model(spec: str, models: Sequence[Path]) -> str:
    if spec in BUILTIN_MODELS:
        return spec
    if HUB_ID.match(spec) and ".." not in spec:
        for root in models:  # a folder under a models root wins over a Hub id of the same name
            if (root / spec).resolve().is_relative_to(root.resolve()) and (root / spec).exists():
                return str((root / spec).resolve())
        return spec
    return _inside(spec, models, "model folder", "model")


def _text(spec: str, data: Sequence[Path], key: str) -> str:
    if spec in BUILTIN or spec in HUB_SETS:
        return spec
    return _inside(spec, data, "text file", key)


def confine(recipe: Any, models: Sequence[Path], data: Sequence[Path]) -> dict[str, Any]:
    """The recipe with every path resolved inside the service's folders; refused (one line,
    naming the key) when a key is the server's to set or a path reaches outside."""
    if not isinstance(recipe, Mapping):
        raise LlmpruneError(f"a recipe is a mapping of job fields, got {type(recipe).__name__}")
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in recipe.items()}
    for key, why in SERVER_KEYS.items():
        if key in out:
            raise LlmpruneError(f"recipe key {key} is not accepted by the service: {why}")
    model = out.get("model")
    if isinstance(model, str):
        out["model"] = _model(model, models)
    for section in ("calibration", "evaluation"):
        part = out.get(section)
        if isinstance(part, dict) and isinstance(part.get("source"), str):
            part["source"] = _text(part["source"], data, f"{section}.source")
    if isinstance(out.get("saliency"), str):  # a model card's correlation table
        out["saliency"] = _inside(out["saliency"], data, "saliency.json", "saliency")
    prune = out.get("prune")
    if isinstance(prune, dict) and isinstance(prune.get("sensitivity"), str):  # curves to allocate from
        prune["sensitivity"] = _inside(prune["sensitivity"], data, "sensitivity.json", "prune.sensitivity")
    tasks = out.get("tasks")
    if isinstance(tasks, dict) and isinstance(tasks.get("include"), str):
        tasks["include"] = _inside(tasks["include"], data, "task folder", "tasks.include")
    return out


def check_recipe(recipe: Any, models: Sequence[Path], data: Sequence[Path]) -> tuple[dict[str, Any], Job]:
    """The confined recipe and the job it makes (every key and value checked as recipes are)."""
    confined = confine(recipe, models, data)
    # The server gives every job its output folder; a stand-in lets the checks that need one run.
    return confined, job_from_dict({**confined, "out": "llmprune-service-output"}, "request")
