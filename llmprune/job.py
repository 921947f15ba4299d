"""A whole pruning job, as the CLI runs it: load, calibrate, measure, prune, measure, save.

Plain function over frozen specs, with progress and cancel callbacks, so the same job can run
from a notebook, the CLI, or (later) a service.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmprune.card import model_card
from llmprune.config import PruneConfig
from llmprune.data import calibration_data, check_text_source, evaluation_data, wants_bos
from llmprune.driver import check_prunable, prune, resolve_device
from llmprune.errors import LlmpruneError
from llmprune.evaluate import perplexity
from llmprune.export import OutputLock, check_output, save_checkpoint
from llmprune.loading import BUILTIN_MODELS, load, resolve
from llmprune.memory import available_bytes, reset_peaks
from llmprune.model import window_length
from llmprune.record import build_record, build_structured_record, warn_before_work
from llmprune.spec import EvalConfig as EvalConfig  # re-exported: the specs' old home
from llmprune.spec import Job as Job
from llmprune.spec import Progress as Progress
from llmprune.spec import TasksConfig as TasksConfig
from llmprune.speed import decode_speed, weights_bytes
from llmprune.streamjob import run_streaming
from llmprune.structured.run import StructuredConfig, prune_structured

log = logging.getLogger(__name__)


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
    if job.out and job.offload_dir:
        offload, out = Path(job.offload_dir).expanduser().resolve(), Path(job.out).expanduser().resolve()
        if offload.is_relative_to(out):
            raise LlmpruneError(f"offload_dir (--offload-dir) {offload} is inside the output folder {out}; "
                                "put it elsewhere")
    return check_output(job.out, job.overwrite, read_paths(job)) if job.out else None  # before hours of work


def run(job: Job, progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
        command: list[str] | None = None,
        on_saved: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``job``; returns the record also written to ``llmprune.json``. ``on_saved`` is given
    the record once it is complete and the checkpoint published, before any Hub push, so a
    failed push never loses it. ``command``: the command line that asked for the job (None: an
    API call, which the record's recipe then stands for). Peak memory is counted from here."""
    out = check_job(job)
    device = resolve_device(job.device)
    manager = None
    if job.tasks.names:
        from llmprune.tasks import check_tasks

        manager = check_tasks(job.tasks.names, job.tasks.include)
    lock = OutputLock(out).acquire() if out is not None else None
    reset_peaks()  # the record's peaks are this job's
    try:
        folder = streaming_source(job)
        if folder is not None:
            if job.tasks.names:
                raise LlmpruneError("lm-eval tasks need the whole model in memory, which a streaming run never "
                                    "holds; evaluate the result with `llmprune eval OUT --tasks ...`")
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


