"""One job as a row of the dashboard's table: the same fields on the server-rendered page and in
the ``/v1/events`` stream that keeps it live."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from llmprune.engine.config import PruneConfig
from llmprune.jobs.spec import EvalConfig


def _default(name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(PruneConfig)}[name]


def model_name(spec: str) -> str:
    """A model as people name it: a built-in or Hub id as given, a folder by its last part."""
    return Path(spec).name if spec.startswith("/") else spec


def evaluation_label(recipe: dict[str, Any]) -> str:
    """How a job's perplexity is measured (text, window length, windows): only jobs measured
    alike share a plot."""
    part = recipe.get("evaluation") or {}
    fields = {f.name: f.default for f in dataclasses.fields(EvalConfig)}
    source = part.get("source", fields["source"])
    if source is None:
        return "no evaluation"
    seqlen = part.get("seqlen", fields["seqlen"])
    return f"{model_name(str(source))}, {seqlen or 'model length'} × {part.get('windows', fields['windows'])}"


def job_summary(job: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    recipe, result = job.get("recipe") or {}, job.get("result") or {}
    prune = recipe.get("prune") or {}
    progress = job.get("progress") or {}
    started, finished = job.get("started"), job.get("finished")
    end = (finished or now or time.time()) if started else None
    pattern = result.get("pattern") or prune.get("pattern") or _default("pattern")
    target = result.get("sparsity_target", prune.get("sparsity"))
    if target is None and pattern == "unstructured":
        target = _default("sparsity")
    return {
        "id": job["id"], "status": job["status"], "model": model_name(str(recipe.get("model", "?"))),
        "base_model": str(recipe.get("model", "?")),
        "method": result.get("method") or prune.get("method") or _default("method"), "pattern": pattern,
        "target": target, "achieved": result.get("sparsity_achieved"),
        "stage": progress.get("stage"), "done": progress.get("done"), "total": progress.get("total"),
        "unit": progress.get("unit"),
        "ppl_dense": result.get("ppl_dense"), "ppl_pruned": result.get("ppl_pruned"),
        "created": job.get("created"), "started": started, "finished": finished,
        "duration": (end - started) if started and end else None,
        "error": job.get("error"), "cancel_requested": bool(job.get("cancel_requested")),
        "group": f"{model_name(str(recipe.get('model', '?')))} · {evaluation_label(recipe)}",
    }
