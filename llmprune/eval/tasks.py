"""lm-eval tasks on an in-memory model, through lm-eval's own Python API.

``HFLM(pretrained=model, tokenizer=tokenizer)`` wraps the (pruned) model without saving it, and
``simple_evaluate`` runs any registered task or group, or tasks from a local folder of task YAMLs
(``include``). The numbers are lm-eval's own: a direct ``lm_eval --model hf`` run on the saved
checkpoint reports the same.
"""

from __future__ import annotations

import difflib
import logging
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.engine.model import polled
from llmprune.engine.placement import placed
from llmprune.errors import LlmpruneError
from llmprune.progress import Cancel

log = logging.getLogger(__name__)


# lm-eval's task index takes seconds to build (it reads ~15k task YAMLs), so each is built once
# per process and kept while the files it read are unchanged; the index is only read afterwards.
_MANAGERS: dict[tuple[Any, ...], Any] = {}
_MANAGERS_LOCK = threading.Lock()


def _stamp(include: Path | None) -> tuple[Any, ...]:
    """What an index depends on: the include folder's task files, as they are now."""
    if include is None:
        return ()
    return tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size)
                        for p in include.rglob("*") if p.is_file()))


def task_manager(include: str | None) -> Any:
    from lm_eval.tasks import TaskManager

    folder = None
    if include is not None:
        folder = Path(include).expanduser().resolve()
        if not folder.is_dir():
            raise LlmpruneError(f"--tasks-include {include} is not a folder of lm-eval task YAML files")
    key = (str(folder), _stamp(folder))
    with _MANAGERS_LOCK:
        if key not in _MANAGERS:
            _MANAGERS[key] = TaskManager(include_path=str(folder)) if folder else TaskManager()
        return _MANAGERS[key]


# datasets builders that read local files: tasks built on them need no Hub.
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}


def hub_tasks(manager: Any, names: tuple[str, ...]) -> list[str]:
    """The tasks among ``names`` (groups and tags followed down to their tasks) whose dataset
    comes from the Hugging Face Hub, read from the task index without loading anything."""
    from pathlib import Path

    index = manager.task_index
    stack: list[Any] = list(names)
    seen: set[str] = set()
    found: list[str] = []
    while stack:
        name = stack.pop()
        entry = index.get(name) if isinstance(name, str) else None
        if entry is None or name in seen:
            continue
        seen.add(name)
        cfg = entry.cfg or {}
        path = cfg.get("dataset_path")
        if path is not None and str(path) not in LOCAL_BUILDERS and not Path(str(path)).exists():
            found.append(name)
        members = cfg.get("task")
        if isinstance(members, list):
            stack += [m if isinstance(m, str) else m.get("task") for m in members if isinstance(m, (str, dict))]
        if getattr(entry.kind, "name", "") == "TAG":
            stack += [n for n, e in index.items() if name in (e.tags or ())]
    return sorted(found)


def check_tasks(names: tuple[str, ...], include: str | None) -> Any:
    """The task manager, once every name is known to it and its data loads (before any work)."""
    from llmprune.io.hub import describe_hub_error, hub_errors, hub_unreachable

    manager = task_manager(include)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise LlmpruneError(f"unknown lm-eval task {name!r}{hint} (local tasks: --tasks-include DIR)")
    remote = hub_tasks(manager, names)
    reason = hub_unreachable() if remote else None
    if reason is not None and "HF_HUB_OFFLINE" not in reason:  # offline mode reads the cache, quickly
        raise LlmpruneError(f"lm-eval task {remote[0]} needs its dataset from the Hugging Face Hub, which is "
                            f"unreachable ({reason}); local tasks: --tasks-include DIR (HF_HUB_OFFLINE=1 uses a "
                            "cached copy)")
    from lm_eval.tasks import get_task_dict

    try:  # loads each task's dataset now, so a missing one fails before any pruning
        get_task_dict(list(names), manager)
    except hub_errors() as exc:
        raise LlmpruneError(f"lm-eval cannot load the data of {', '.join(names)}: {describe_hub_error(exc)} "
                            "(local tasks: --tasks-include DIR)") from None
    return manager


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` as {task: {metric: value, metric_stderr: value}}."""
    table: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",")[0]
            row[metric] = float(value)
        table[task] = row
    return table


@torch.no_grad()
def evaluate_tasks(model: nn.Module, tokenizer: Any, names: tuple[str, ...], *, include: str | None = None,
                   limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                   device: torch.device | None = None, manager: Any = None,
                   cancel: Cancel | None = None, layer_devices: list[torch.device] | None = None) -> dict[str, Any]:
    """Run lm-eval ``names`` on ``model``; returns {"results": {task: metrics}, "n_samples", ...}.
    ``cancel`` is polled before each of the model's forward passes. ``layer_devices`` (from a
    device map): each decoder layer runs there and the rest on ``device``, instead of the whole
    model on ``device``."""
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = manager or check_tasks(names, include)
    front = device if device is not None else next(model.parameters()).device
    count = int(limit) if limit is not None and limit >= 1 else limit
    with placed(model, front, layer_devices), polled(model, cancel, "during lm-eval"):
        # HFLM sends its batches to model.device: the first parameter's, the embeddings' (front).
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=count,
                              num_fewshot=num_fewshot, log_samples=False, random_seed=0,
                              numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    if out is None:  # lm-eval returns None on non-zero ranks only
        raise LlmpruneError("lm-eval returned no results")
    return {"results": summarize(out["results"]), "n_samples": {k: v.get("effective", v) if isinstance(v, dict)
                                                                else v for k, v in out.get("n-samples", {}).items()},
            "limit": limit, "num_fewshot": num_fewshot, "lm_eval": getattr(lm_eval, "__version__", "unknown")}
