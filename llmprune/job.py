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
from llmprune.data import SPLIT_SOURCES, calibration_data, check_text_source, evaluation_data, wants_bos
from llmprune.driver import PruneReport, check_prunable, prune, resolve_device
from llmprune.errors import LlmpruneError
from llmprune.evaluate import perplexity
from llmprune.export import OutputLock, check_output, save_checkpoint
from llmprune.loading import BUILTIN_MODELS, load, resolve
from llmprune.memory import available_bytes, memory_report
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
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise LlmpruneError(f"eval batch size must be >= 1 (windows per forward), got {self.batch_size}")


@dataclass(frozen=True)
class TasksConfig:
    """lm-eval tasks run on the dense and the pruned model. ``names``: lm-eval task or group names
    (empty: none); ``include``: a folder of local task YAMLs; ``limit``: examples per task (a
    count, or a fraction below 1); ``num_fewshot``: None = each task's default."""

    names: tuple[str, ...] = ()
    include: str | None = None
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.limit is not None and not self.limit > 0:
            raise LlmpruneError(f"task limit must be positive, got {self.limit}")
        if self.batch_size < 1:
            raise LlmpruneError(f"task batch size must be >= 1, got {self.batch_size}")


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
    stream: str = "auto"
    resume: bool = False
    offload_dir: str | None = None
    device_map: str | None = None
    tasks: TasksConfig = field(default_factory=TasksConfig)
    push_to_hub: str | None = None
    private: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 0:
            raise LlmpruneError(f"batch size must be >= 0 (0 or None: auto), got {self.batch_size}")
        if self.stream not in ("auto", "on", "off"):
            raise LlmpruneError(f"stream must be auto, on or off, got {self.stream!r}")
        streaming_only = [flag for flag, value in (("resume", self.resume), ("offload_dir", self.offload_dir))
                          if value]
        if streaming_only and self.stream == "off":
            raise LlmpruneError(f"{streaming_only[0]} needs streaming; drop stream='off' (--stream off)")
        if (streaming_only or self.stream == "on") and isinstance(self.prune, StructuredConfig):
            raise LlmpruneError("streaming, resume and offload_dir apply to unstructured and N:M pruning")
        if (streaming_only or self.stream == "on") and not self.out:
            raise LlmpruneError("streaming writes the checkpoint as it goes; give an output folder (out, --out)")


def window_length(requested: int | None, model: Any) -> int:
    """A calibration or evaluation window length: ``requested``, or min(2048, the model's limit);
    longer than the limit is an error."""
    limit = model_max_length(model)
    default = min(2048, limit) if limit else 2048
    if requested is not None and limit is not None and requested > limit:
        raise LlmpruneError(f"seqlen {requested} exceeds the model's limit of {limit} tokens")
    if requested is not None and requested < 2:
        raise LlmpruneError(f"seqlen must be >= 2, got {requested}")
    return requested or default


def evaluate_ppl(model: Any, tokenizer: Any, config: EvalConfig, device: torch.device,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Perplexity of ``model`` under ``config``, with the protocol's facts."""
    assert config.source is not None
    seqlen = window_length(config.seqlen, model)
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


def read_paths(job: Job) -> list[Path]:
    """Local paths the job reads (the model, its text files): the output may not replace them."""
    candidates = [job.calibration.source, job.evaluation.source or ""]
    if job.model in BUILTIN_MODELS:
        from llmprune.assets import cache_dir

        paths = [cache_dir() / "models" / job.model]
    else:
        candidates.append(job.model)
        paths = []
    return paths + [Path(c).expanduser() for c in candidates if c and Path(c).expanduser().exists()]


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


def check_job(job: Job) -> Path | None:
    """Everything about ``job`` that can be refused before any work; returns the resolved
    output folder (None: nothing is saved)."""
    if job.push_to_hub and not job.out:
        raise LlmpruneError("push_to_hub (--push-to-hub) uploads the saved checkpoint; give an output folder (--out)")
    if job.device_map and isinstance(job.prune, StructuredConfig):
        raise LlmpruneError("device_map (--device-map) applies to unstructured and N:M pruning; structured pruning "
                            "runs each layer on device (--device)")
    for source in (job.calibration.source, job.evaluation.source):
        if source:
            check_text_source(source)
    return check_output(job.out, job.overwrite, read_paths(job)) if job.out else None  # before hours of work


def warn_before_work(job: Job) -> None:
    """What the user should know about a job whose inputs all turned out fine (said once they
    did, so a failing run shows only its error)."""
    if not job.out:
        log.warning("no output folder (--out) given: the pruned model is measured, then discarded")
    if same_text(job):
        log.warning("calibration and evaluation use the same text (%s): the perplexity is not measured on "
                    "held-out text", job.evaluation.source)


def run(job: Job, progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
        command: list[str] | None = None,
        on_saved: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``job``; returns the record also written to ``llmprune.json``. ``on_saved`` is given
    the record once it is complete and the checkpoint published, before any Hub push, so a
    failed push never loses it."""
    out = check_job(job)
    device = resolve_device(job.device)
    manager = None
    if job.tasks.names:
        from llmprune.tasks import check_tasks

        manager = check_tasks(job.tasks.names, job.tasks.include)
    lock = OutputLock(out).acquire() if out is not None else None
    try:
        folder = streaming_source(job)
        if folder is not None:
            if job.tasks.names:
                raise LlmpruneError("lm-eval tasks need the whole model in memory, which a streaming run never "
                                    "holds; evaluate the result with `llmprune eval OUT --tasks ...`")
            from llmprune.streamjob import run_streaming

            assert out is not None
            record = run_streaming(job, folder, out, device, progress, cancel, command)
        else:
            record = _run_in_memory(job, out, device, manager, progress, cancel, command)
    finally:
        if lock is not None:
            lock.release()
    if on_saved is not None:
        on_saved(record)
    return push_record(job, record)


def _run_in_memory(job: Job, out: Path | None, device: torch.device, manager: Any, progress: Progress | None,
                   cancel: Callable[[], bool] | None, command: list[str] | None) -> dict[str, Any]:
    timings: dict[str, float] = {}

    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    tick = time.perf_counter()
    model, tokenizer = load(job.model, job.dtype)
    if isinstance(job.prune, PruneConfig):
        check_prunable(model, job.prune.allow_partial)
    timings["load_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    cal = job.calibration
    seqlen = window_length(cal.seqlen, model)
    calibration = calibration_data(tokenizer, cal.source, cal.samples, seqlen, cal.seed)
    timings["calibration_data_s"] = time.perf_counter() - tick
    warn_before_work(job)

    dense = pruned = None
    if job.evaluation.source:
        dense = evaluate_ppl(model, tokenizer, job.evaluation, device, stage("eval dense"))
        timings["eval_dense_s"] = dense.pop("seconds")
    tasks: dict[str, Any] = {}
    if manager is not None:
        tasks["dense"] = run_tasks(model, tokenizer, job, device, manager, timings, "dense")

    if isinstance(job.prune, StructuredConfig):
        return _run_structured(job, out, model, tokenizer, calibration, dense, timings, device, stage,
                               cancel, command, tasks, manager)
    devices = None
    if job.device_map:
        from llmprune.model import find_decoder_layers
        from llmprune.placement import layer_devices

        layers_path, layers = find_decoder_layers(model)
        devices = layer_devices(model, layers_path, len(layers), job.device_map)
    report = prune(model, job.prune, calibration, device=device, batch_size=job.batch_size,
                   progress=stage("prune"), cancel=cancel, layer_devices=devices)
    timings["prune_s"] = report.seconds

    if job.evaluation.source:
        pruned = evaluate_ppl(model, tokenizer, job.evaluation, device, stage("eval pruned"))
        timings["eval_pruned_s"] = pruned.pop("seconds")
    if manager is not None:
        tasks["pruned"] = run_tasks(model, tokenizer, job, device, manager, timings, "pruned")

    record = build_record(job, model, report, calibration, dense, pruned, timings, device, command)
    if tasks:
        record["tasks"] = tasks
    if out is not None:
        tick = time.perf_counter()
        save_checkpoint(model, tokenizer, out, record, model_card, job.overwrite)
        record["timings"]["save_s"] = time.perf_counter() - tick
        record["out"] = str(out)
    return record


def run_tasks(model: Any, tokenizer: Any, job: Job, device: torch.device, manager: Any,
              timings: dict[str, float], which: str) -> dict[str, Any]:
    from llmprune.tasks import evaluate_tasks

    tick = time.perf_counter()
    config = job.tasks
    result = evaluate_tasks(model, tokenizer, config.names, include=config.include, limit=config.limit,
                            num_fewshot=config.num_fewshot, batch_size=config.batch_size, device=device,
                            manager=manager)
    timings[f"tasks_{which}_s"] = time.perf_counter() - tick
    return result


def push_record(job: Job, record: dict[str, Any]) -> dict[str, Any]:
    """Push the published checkpoint when asked. A failed push keeps the checkpoint and says how
    to push it later."""
    if job.push_to_hub and record.get("out"):
        from llmprune.hub import push

        try:
            record["pushed_to"] = push(Path(record["out"]), job.push_to_hub, private=job.private)
        except LlmpruneError as exc:
            raise LlmpruneError(f"{exc}; the checkpoint is saved in {record['out']}: push it later with "
                                f"`llmprune push {record['out']} --repo {job.push_to_hub}`") from None
    return record


# A checkpoint is streamed (auto mode) when its weights take more than this share of the memory
# still available: loading it whole would not leave room for statistics and activations.
STREAM_SHARE = 0.5


def streaming_source(job: Job) -> Path | None:
    """The safetensors folder to stream from, or None to load the model into memory."""
    forced = job.stream == "on" or job.resume or job.offload_dir is not None
    if job.stream == "off" or isinstance(job.prune, StructuredConfig) or not job.out:
        return None
    where, gguf = resolve(job.model)
    if gguf:
        if forced:
            raise LlmpruneError(f"{job.model} is a GGUF file; streaming needs a safetensors checkpoint "
                                "(convert it once with save_pretrained)")
        return None
    folder = Path(where)
    if not folder.is_dir():
        folder = _hub_snapshot(where)
    if not list(folder.glob("*.safetensors")):
        if forced:
            raise LlmpruneError(f"{folder} holds no safetensors weights; streaming needs them")
        return None
    if forced:
        return folder
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    available = available_bytes()
    return folder if available is not None and size > STREAM_SHARE * available else None


def _hub_snapshot(repo: str) -> Path:
    """The Hub checkpoint's files in the local cache (downloaded when the Hub is reachable)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from llmprune.hub import describe_hub_error, hub_errors, hub_unreachable

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    reason = hub_unreachable()
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=reason is not None))
    except LocalEntryNotFoundError:
        raise LlmpruneError(f"cannot load model {repo!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
                            f"not a local folder or .gguf, and not in the Hugging Face cache; the Hub is "
                            f"unreachable ({reason})") from None
    except hub_errors() as exc:
        raise LlmpruneError(f"cannot load model {repo!r} from the Hugging Face Hub: "
                            f"{describe_hub_error(exc)}") from None


def _run_structured(job: Job, out: Path | None, model: Any, tokenizer: Any, calibration: torch.Tensor,
                    dense: dict[str, Any] | None, timings: dict[str, float], device: torch.device,
                    stage: Callable[[str], Any], cancel: Callable[[], bool] | None, command: list[str] | None,
                    tasks: dict[str, Any], manager: Any) -> dict[str, Any]:
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
    if manager is not None:
        tasks["pruned"] = run_tasks(pruned_model, tokenizer, job, device, manager, timings, "pruned")
    record = build_structured_record(job, pruned_model, report, calibration, dense, pruned, timings, device,
                                     command, speed_dense, speed_pruned, bytes_dense)
    if tasks:
        record["tasks"] = tasks
    if out is not None:
        from llmprune.card import structured_card

        tick = time.perf_counter()
        save_checkpoint(pruned_model, tokenizer, out, record, structured_card, job.overwrite)
        record["timings"]["save_s"] = time.perf_counter() - tick
        record["out"] = str(out)
    return record


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
        "argv": sys.argv if command is None else command,
        "notes": notes,
        "memory": memory_report(),
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
        "sparsity_of_pruned_linears": report.linear_sparsity,
        "unpruned_weights": report.unpruned,
        "config": dataclasses.asdict(job.prune),
        "resolved_options": {"group": options.group, "update": options.update,
                             "blocksize": options.blocksize, "damp": options.damp,
                             "nm_select": options.nm_select, "shrink": options.shrink},
        "calibration": {**dataclasses.asdict(job.calibration), "seqlen": calibration.shape[1],
                        "tokens": calibration.numel(), "batch_size": report.batch_size,
                        "one_pass": report.one_pass},
        "layer_seconds": report.layer_seconds,
        "layers": [dataclasses.asdict(item) for item in report.linears],
    }
