"""The pruning job of :mod:`llmprune.job`, streamed: for checkpoints larger than memory, and for
runs that must survive an interruption (``--resume``)."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmprune.card import model_card
from llmprune.config import PruneConfig
from llmprune.data import calibration_data, evaluation_data, wants_bos
from llmprune.driver import check_prunable, prune
from llmprune.errors import LlmpruneError
from llmprune.export import publish_folder, write_metadata
from llmprune.journal import Journal
from llmprune.loading import check_local_folder, parse_dtype
from llmprune.memory import available_bytes
from llmprune.model import find_decoder_layers, window_length
from llmprune.record import build_record, warn_before_work
from llmprune.shards import Checkpoint
from llmprune.spec import Job, Progress
from llmprune.stream import (
    OFFLOAD_SHARE,
    StreamHost,
    activation_bytes,
    build_skeleton,
    check_disk,
    fingerprint,
    open_staging,
    stream_perplexity,
)


def check_tensor_names(model: Any, source: Checkpoint) -> None:
    """Refuse a checkpoint whose tensor names are not exactly the model's (missing weights would
    be left empty, unexpected ones dropped), before any work."""
    state = model.state_dict(keep_vars=True)
    parameters = {id(p) for p in model.parameters()}
    aliases: dict[int, list[str]] = {}
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(name)
    present = set(source.files)
    missing = sorted(names[0] for key, names in aliases.items() if key in parameters and not present & set(names))
    # What transformers itself ignores in a checkpoint: its model's patterns, and buffers the
    # model makes itself (rotary inv_freq, causal-mask biases) that older checkpoints saved.
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    buffers = {name for name, _ in model.named_buffers()}
    unexpected = sorted(n for n in present - set(state) if n not in buffers and not any(p.search(n) for p in ignored))
    shapes = source.shapes()
    wrong = sorted(n for n in present & set(state) if tuple(state[n].shape) != shapes[n])
    if wrong:
        raise LlmpruneError(f"weight {wrong[0]} has shape {list(shapes[wrong[0]])} in {source.folder}, but the config "
                            f"makes it {list(state[wrong[0]].shape)}; the checkpoint is damaged or made for another "
                            "model class")
    for names, what in ((missing, "missing from"), (unexpected, "unexpected in")):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise LlmpruneError(f"weight {names[0]}{more} {what} the checkpoint at {source.folder}; the checkpoint "
                                "is damaged or made for another model class")


def run_streaming(job: Job, folder: Path, out: Path, device: torch.device, progress: Progress | None,
                  cancel: Callable[[], bool] | None, command: list[str] | None) -> dict[str, Any]:
    """The job, streamed. The caller has checked ``out`` and holds its lock."""
    from transformers import AutoTokenizer

    assert isinstance(job.prune, PruneConfig)
    timings: dict[str, float] = {}

    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    tick = time.perf_counter()
    check_local_folder(folder, job.model)
    source = Checkpoint(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = build_skeleton(folder, parse_dtype(job.dtype))
    check_prunable(model, job.prune.allow_partial)
    check_tensor_names(model, source)
    storage = next(model.parameters()).dtype
    layers_path, layers = find_decoder_layers(model)
    devices = None
    if job.device_map:
        from llmprune.placement import layer_devices

        devices = layer_devices(model, layers_path, len(layers), job.device_map)
    timings["load_s"] = time.perf_counter() - tick

    cal = job.calibration
    seqlen = window_length(cal.seqlen, model)
    calibration = calibration_data(tokenizer, cal.source, cal.samples, seqlen, cal.seed)
    windows = None
    if job.evaluation.source:
        windows = evaluation_data(tokenizer, job.evaluation.source, window_length(job.evaluation.seqlen, model),
                                  job.evaluation.windows or None)
    warn_before_work(job)
    width = model.get_input_embeddings().weight.shape[1]  # type: ignore[operator]
    activations = activation_bytes(cal.samples, seqlen, width, storage)

    staging, resuming = open_staging(out, job.resume, job.overwrite)
    journal: Journal | None = None
    try:
        stamp = fingerprint(str(folder.resolve()), job.prune, calibration, job.batch_size, storage, str(device))
        journal = Journal.load(staging, stamp) if resuming else Journal.start(staging, stamp)
        return _stream(job, folder, out, device, stage, cancel, command, timings, source, tokenizer, model,
                       devices, calibration, windows, activations, staging, journal)
    except BaseException:
        # A fresh run that fails before its first layer is done has nothing worth resuming: leave
        # no interrupted run behind (a rerun would otherwise be asked for --resume).
        if not resuming and (journal is None or not journal.layers):
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _stream(job: Job, folder: Path, out: Path, device: torch.device, stage: Callable[[str], Any],
            cancel: Callable[[], bool] | None, command: list[str] | None, timings: dict[str, float],
            source: Checkpoint, tokenizer: Any, model: Any, devices: Any, calibration: torch.Tensor,
            windows: torch.Tensor | None, activations: int, staging: Path, journal: Journal) -> dict[str, Any]:
    assert isinstance(job.prune, PruneConfig)
    storage = next(model.parameters()).dtype
    resumed_at = len(journal.layers)
    offload = Path(job.offload_dir).expanduser().resolve() if job.offload_dir else None
    available = available_bytes()
    if offload is None and available is not None and 3 * activations > OFFLOAD_SHARE * available:
        offload = journal.folder  # too large for memory: keep them beside the journal
    if offload is not None:
        offload.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=storage).element_size()
    written = sum(e["bytes"] for e in journal.layers)
    expected = sum(int(t.numel()) for t in model.state_dict().values()) * itemsize
    check_disk(staging, max(0, expected - written) + 2 * activations, "the pruned checkpoint")
    if offload is not None and offload != journal.folder:
        check_disk(offload, 2 * activations, f"offloaded activations ({activations / 1e9:.2f} GB a layer)")

    host = StreamHost(model, source, staging, journal, offload)
    dense = pruned = None
    if windows is not None:
        tick = time.perf_counter()
        dense = _ppl(model, host, source, windows, device, job, tokenizer, stage("eval dense"))
        timings["eval_dense_s"] = time.perf_counter() - tick

    host.load_rest()
    report = prune(model, job.prune, calibration, device=device, batch_size=job.batch_size,
                   progress=stage("prune"), cancel=cancel, layer_devices=devices, host=host)
    timings["prune_s"] = report.seconds
    host.finalize()

    if windows is not None:
        tick = time.perf_counter()
        pruned = _ppl(model, host, Checkpoint(staging), windows, device, job, tokenizer, stage("eval pruned"))
        timings["eval_pruned_s"] = time.perf_counter() - tick

    record = build_record(job, model, report, calibration, dense, pruned, timings, device, command)
    record["streaming"] = {"source": str(folder), "resumed_at_layer": resumed_at,
                           "activations_offloaded_to": str(offload) if offload else None,
                           "activation_bytes": activations,
                           "layer_devices": [str(d) for d in devices] if devices else None}
    tick = time.perf_counter()
    model.config.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_metadata(staging, record, model_card)
    record["timings"]["save_s"] = time.perf_counter() - tick
    publish_folder(staging, out, job.overwrite)
    record["out"] = str(out)
    return record


def _ppl(model: Any, host: StreamHost, source: Checkpoint, windows: torch.Tensor, device: torch.device,
         job: Job, tokenizer: Any, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    ppl = stream_perplexity(model, host, source, windows, device, job.evaluation.batch_size, progress)
    return {"source": job.evaluation.source, "split": "evaluation", "seqlen": windows.shape[1],
            "windows": windows.shape[0], "tokens": windows.numel(), "bos": wants_bos(tokenizer) is not None,
            "ppl": ppl}
