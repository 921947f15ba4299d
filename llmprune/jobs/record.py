"""The record of a job (``llmprune.json``): what was pruned, how, and with what result."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from llmprune import __version__
from llmprune.engine.config import PruneConfig
from llmprune.engine.driver import PruneReport
from llmprune.eval.speed import weights_bytes
from llmprune.io.data import SPLIT_SOURCES
from llmprune.io.loading import BUILTIN_MODELS
from llmprune.io.memory import memory_report
from llmprune.jobs.spec import Job
from llmprune.structured.run import StructuredConfig, StructuredReport

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import transformers

    return {"llmprune": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def same_text(job: Job) -> bool:
    """Whether evaluation scores the very text calibration was drawn from (a source without
    disjoint splits: pydoc, or the same file): the perplexity is then not held out."""
    cal, ev = job.calibration.source, job.evaluation.source
    if ev is None or cal in SPLIT_SOURCES or ev in SPLIT_SOURCES:
        return False
    if cal == ev:
        return True
    a, b = Path(cal).expanduser(), Path(ev).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def warn_before_work(job: Job) -> None:
    """What the user should know about a job whose inputs all turned out fine (said once they
    did, so a failing run shows only its error)."""
    if not job.out:
        log.warning("no output folder (--out) given: the pruned model is measured, then discarded")
    if same_text(job):
        log.warning("calibration and evaluation use the same text (%s): the perplexity is not measured on "
                    "held-out text", job.evaluation.source)


def base_model_name(spec: str) -> str:
    """What the record calls the base model: a built-in name or Hub id as given, a local path
    made absolute (a relative one means nothing once the checkpoint is elsewhere)."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec not in BUILTIN_MODELS and path.exists() else spec


def _common(job: Job, model: Any, calibration: torch.Tensor, dense: dict[str, Any] | None,
            pruned: dict[str, Any] | None, timings: dict[str, float], device: torch.device,
            command: list[str] | None) -> dict[str, Any]:
    evaluation = None
    if dense is not None and pruned is not None:
        evaluation = {**dense, "ppl_dense": dense["ppl"], "ppl_pruned": pruned["ppl"],
                      "same_text_as_calibration": same_text(job)}
        evaluation.pop("ppl")
    notes = []
    if job.model in BUILTIN_MODELS or str(job.model).endswith(".gguf"):
        notes.append("Base weights are dequantized from a 4-bit GGUF (Q4_1) and carry its "
                     "quantization noise; perplexities compare like with like.")
    return {
        "llmprune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "base_model": base_model_name(job.model),
        "base_model_description": BUILTIN_MODELS.get(job.model, job.model),
        "architecture": type(model).__name__,
        "evaluation": evaluation,
        "timings": timings,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "versions": versions(),
        # What reproduces the job: the command line, and the recipe (the only record of an API call).
        "recipe": json.loads(json.dumps(dataclasses.asdict(job))),
        "notes": notes,
        "memory": memory_report(),  # peaks since the job started (``reset_peaks`` in run)
    }


def build_structured_record(job: Job, model: Any, report: StructuredReport, calibration: torch.Tensor,
                            dense: dict[str, Any] | None, pruned: dict[str, Any] | None,
                            timings: dict[str, float], device: torch.device, command: list[str] | None,
                            speed_dense: dict[str, Any] | None, speed_pruned: dict[str, Any] | None,
                            bytes_dense: int) -> dict[str, Any]:
    config = job.prune
    assert isinstance(config, StructuredConfig)
    speed = None
    if speed_dense and speed_pruned:
        speed = {**speed_pruned, "tokens_per_s_dense": speed_dense["tokens_per_s"],
                 "tokens_per_s_pruned": speed_pruned["tokens_per_s"],
                 "speedup": speed_pruned["tokens_per_s"] / speed_dense["tokens_per_s"]}
        speed.pop("tokens_per_s")
    return {
        **_common(job, model, calibration, dense, pruned, timings, device, command),
        "kind": "structured",
        "method": "block-influence" if config.pattern == "layers" else config.score,
        "dropped_layers": sorted(set(range(report.layers_before)) - set(report.plan.layers)),
        "pattern": config.pattern,
        "target": config.amount,
        "config": dataclasses.asdict(config),
        "calibration": {**dataclasses.asdict(job.calibration), "seqlen": calibration.shape[1],
                        "tokens": calibration.numel()},
        "structure": {
            "attention_heads": [report.heads_before, report.heads_after],
            "kv_heads_after": report.kv_heads_after,
            "intermediate_size": [report.intermediate_before, report.intermediate_after],
            "decoder_layers": [report.layers_before, report.layers_after],
            "bias_compensation": report.bias_compensation,
            "experts_per_moe_layer": [report.experts_before, report.experts_after],
        },
        "parameters": {"before": report.params_before, "after": report.params_after,
                       "decoder_layers_before": report.layer_params_before,
                       "decoder_layers_after": report.layer_params_after,
                       "decoder_layer_fraction_removed": report.layer_params_removed},
        "weights_bytes": {"before": bytes_dense, "after": weights_bytes(model)},
        "decode_speed": speed,
        "then_sparsity": report.then,
        "layers": report.errors,
    }


def build_record(job: Job, model: Any, report: PruneReport, calibration: torch.Tensor,
                 dense: dict[str, Any] | None, pruned: dict[str, Any] | None,
                 timings: dict[str, float], device: torch.device,
                 command: list[str] | None) -> dict[str, Any]:
    assert isinstance(job.prune, PruneConfig)
    options = job.prune.options()
    common = _common(job, model, calibration, dense, pruned, timings, device, command)
    config = dataclasses.asdict(job.prune)
    if report.model_target != options.model_target:
        # The default recipe's pull, dropped for this model (experts): the recipe and the config
        # say what ran, so rerunning them gives the same run instead of a refusal.
        config["model_target"] = common["recipe"]["prune"]["model_target"] = report.model_target
    return {
        **common,
        "kind": "sparse",
        "method": job.prune.method,
        "pattern": str(options.pattern),
        "sparsity_target": options.sparsity,
        "sparsity_achieved": report.sparsity,
        "sparsity_of_pruned_linears": report.linear_sparsity,
        "unpruned_weights": report.unpruned,
        "experts": report.experts(),
        "config": config,
        "resolved_options": {"group": options.group, "update": options.update, "refine": options.refine,
                             "allocation": job.prune.allocation,
                             "blocksize": options.blocksize, "damp": options.damp,
                             "nm_select": options.nm_select, "shrink": options.shrink,
                             "cg_iterations": options.cg_iterations, "model_target": report.model_target,
                             "pass_dtype": report.pass_dtype},
        "allocation": report.allocation,
        "recovery": report.recovery,
        "calibration": {**dataclasses.asdict(job.calibration), "seqlen": calibration.shape[1],
                        "tokens": calibration.numel(), "batch_size": report.batch_size,
                        "one_pass": report.one_pass},
        "layer_seconds": report.layer_seconds,
        "layers": [dataclasses.asdict(item) for item in report.linears],
    }
