"""A whole pruning job, as the CLI runs it: load, calibrate, measure, prune, measure, save.

Plain function over frozen specs, with progress and cancel callbacks, so the same job can run
from a notebook, the CLI, or (later) a service.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from llmprune import __version__
from llmprune.card import model_card
from llmprune.config import CalibrationConfig, PruneConfig
from llmprune.data import calibration_data, evaluation_data, wants_bos
from llmprune.driver import PruneReport, prune, resolve_device
from llmprune.errors import LlmpruneError
from llmprune.evaluate import perplexity
from llmprune.export import check_output, save_checkpoint
from llmprune.loading import BUILTIN_MODELS, load
from llmprune.model import model_max_length
from llmprune.speed import decode_speed, weights_bytes
from llmprune.structured.run import StructuredConfig, StructuredReport, prune_structured

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity protocol: ``source`` text (None = skip), window length (None = min(2048, model
    limit)), and how many of the first windows to score (0 = all, the full published protocol)."""

    source: str | None = "wikipedia"
    seqlen: int | None = None
    windows: int = 16
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.windows < 0:
            raise LlmpruneError(f"eval windows must be >= 0 (0 = all), got {self.windows}")
        if self.seqlen is not None and self.seqlen < 2:
            raise LlmpruneError(f"eval seqlen must be >= 2, got {self.seqlen}")


@dataclass(frozen=True)
class Job:
    """``prune``: a :class:`PruneConfig` (unstructured, N:M) or a :class:`StructuredConfig`
    (heads, channels, structured, layers). ``decode_tokens``: for structured runs, tokens
    generated to measure decode speed before and after (0 = skip)."""

    model: str
    prune: PruneConfig | StructuredConfig = field(default_factory=PruneConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    out: str | None = None
    overwrite: bool = False
    device: str | None = None
    dtype: str | None = None
    batch_size: int | None = None
    decode_tokens: int = 64


def _seqlen(requested: int | None, model: Any) -> int:
    limit = model_max_length(model)
    default = min(2048, limit) if limit else 2048
    if requested is not None and limit is not None and requested > limit:
        raise LlmpruneError(f"seqlen {requested} exceeds the model's limit of {limit} tokens")
    return requested or default


def evaluate_ppl(model: Any, tokenizer: Any, config: EvalConfig, device: torch.device,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Perplexity of ``model`` under ``config``, with the protocol's facts."""
    assert config.source is not None
    seqlen = _seqlen(config.seqlen, model)
    windows = evaluation_data(tokenizer, config.source, seqlen, config.windows or None)
    home = next(model.parameters()).device
    model.to(device)
    tick = time.perf_counter()
    try:
        ppl = perplexity(model, windows, batch_size=config.batch_size, progress=progress)
    finally:
        model.to(home)
    return {"source": config.source, "split": "evaluation", "seqlen": seqlen,
            "windows": windows.shape[0], "tokens": windows.numel(), "bos": wants_bos(tokenizer) is not None,
            "ppl": ppl, "seconds": time.perf_counter() - tick}


def versions() -> dict[str, str]:
    import transformers

    return {"llmprune": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def run(job: Job, progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
        command: list[str] | None = None) -> dict[str, Any]:
    """Run ``job``; returns the record also written to ``llmprune.json``."""
    if job.out:
        check_output(job.out, job.overwrite)  # refuse before hours of work, not after
    device = resolve_device(job.device)
    timings: dict[str, float] = {}

    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    tick = time.perf_counter()
    model, tokenizer = load(job.model, job.dtype)
    timings["load_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    cal = job.calibration
    seqlen = _seqlen(cal.seqlen, model)
    calibration = calibration_data(tokenizer, cal.source, cal.nsamples, seqlen, cal.seed)
    timings["calibration_data_s"] = time.perf_counter() - tick

    dense = pruned = None
    if job.evaluation.source:
        dense = evaluate_ppl(model, tokenizer, job.evaluation, device, stage("eval dense"))
        timings["eval_dense_s"] = dense.pop("seconds")

    if isinstance(job.prune, StructuredConfig):
        return _run_structured(job, model, tokenizer, calibration, dense, timings, device, stage, cancel, command)
    report = prune(model, job.prune, calibration, device=device, batch_size=job.batch_size,
                   progress=stage("prune"), cancel=cancel)
    timings["prune_s"] = report.seconds

    if job.evaluation.source:
        pruned = evaluate_ppl(model, tokenizer, job.evaluation, device, stage("eval pruned"))
        timings["eval_pruned_s"] = pruned.pop("seconds")

    record = build_record(job, model, report, calibration, dense, pruned, timings, device, command)
    if job.out:
        tick = time.perf_counter()
        save_checkpoint(model, tokenizer, Path(job.out), record, model_card(record), job.overwrite)
        record["timings"]["save_s"] = time.perf_counter() - tick
        record["out"] = str(Path(job.out).resolve())
    return record


def _run_structured(job: Job, model: Any, tokenizer: Any, calibration: torch.Tensor, dense: dict[str, Any] | None,
                    timings: dict[str, float], device: torch.device, stage: Callable[[str], Any],
                    cancel: Callable[[], bool] | None, command: list[str] | None) -> dict[str, Any]:
    assert isinstance(job.prune, StructuredConfig)
    speed_dense = speed_pruned = None
    if job.decode_tokens:
        speed_dense = decode_speed(model, tokenizer, job.decode_tokens, device=device)
    bytes_dense = weights_bytes(model)
    pruned_model, report = prune_structured(model, job.prune, calibration, device=device,
                                            batch_size=job.batch_size, progress=stage("prune"), cancel=cancel)
    del model
    timings["prune_s"] = report.seconds
    pruned = None
    if job.evaluation.source:
        pruned = evaluate_ppl(pruned_model, tokenizer, job.evaluation, device, stage("eval pruned"))
        timings["eval_pruned_s"] = pruned.pop("seconds")
    if job.decode_tokens:
        speed_pruned = decode_speed(pruned_model, tokenizer, job.decode_tokens, device=device)
    record = build_structured_record(job, pruned_model, report, calibration, dense, pruned, timings, device,
                                     command, speed_dense, speed_pruned, bytes_dense)
    if job.out:
        from llmprune.card import structured_card

        tick = time.perf_counter()
        save_checkpoint(pruned_model, tokenizer, Path(job.out), record, structured_card, job.overwrite)
        record["timings"]["save_s"] = time.perf_counter() - tick
        record["out"] = str(Path(job.out).resolve())
    return record


def _common(job: Job, model: Any, calibration: torch.Tensor, dense: dict[str, Any] | None,
            pruned: dict[str, Any] | None, timings: dict[str, float], device: torch.device,
            command: list[str] | None) -> dict[str, Any]:
    evaluation = None
    if dense is not None and pruned is not None:
        evaluation = {**dense, "ppl_dense": dense["ppl"], "ppl_pruned": pruned["ppl"]}
        evaluation.pop("ppl")
    notes = []
    if job.model in BUILTIN_MODELS or str(job.model).endswith(".gguf"):
        notes.append("Base weights are dequantized from a 4-bit GGUF (Q4_1) and carry its "
                     "quantization noise; perplexities compare like with like.")
    return {
        "llmprune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "base_model": job.model,
        "base_model_description": BUILTIN_MODELS.get(job.model, job.model),
        "architecture": type(model).__name__,
        "evaluation": evaluation,
        "timings": timings,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "versions": versions(),
        "argv": sys.argv if command is None else command,
        "notes": notes,
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
        "method": config.score,
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
        },
        "parameters": {"before": report.params_before, "after": report.params_after,
                       "decoder_layers_before": report.layer_params_before,
                       "decoder_layers_after": report.layer_params_after,
                       "decoder_layer_fraction_removed": report.layer_params_removed},
        "weights_bytes": {"before": bytes_dense, "after": weights_bytes(model)},
        "decode_speed": speed,
        "layers": report.errors,
    }


def build_record(job: Job, model: Any, report: PruneReport, calibration: torch.Tensor,
                 dense: dict[str, Any] | None, pruned: dict[str, Any] | None,
                 timings: dict[str, float], device: torch.device,
                 command: list[str] | None) -> dict[str, Any]:
    assert isinstance(job.prune, PruneConfig)
    options = job.prune.options()
    return {
        **_common(job, model, calibration, dense, pruned, timings, device, command),
        "kind": "sparse",
        "method": job.prune.method,
        "pattern": str(options.pattern),
        "sparsity_target": options.sparsity,
        "sparsity_achieved": report.sparsity,
        "config": dataclasses.asdict(job.prune),
        "resolved_options": {"group": options.group, "update": options.update,
                             "blocksize": options.blocksize, "damp": options.damp,
                             "nm_select": options.nm_select},
        "calibration": {**dataclasses.asdict(job.calibration), "seqlen": calibration.shape[1],
                        "tokens": calibration.numel(), "batch_size": report.batch_size,
                        "one_pass": report.one_pass},
        "layers": [dataclasses.asdict(item) for item in report.linears],
    }
