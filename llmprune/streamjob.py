"""The pruning job of :mod:`llmprune.job`, streamed: for checkpoints larger than memory, and for
runs that must survive an interruption (``--resume``)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmprune.card import model_card
from llmprune.config import PruneConfig
from llmprune.data import calibration_data, evaluation_data, wants_bos
from llmprune.driver import prune
from llmprune.errors import LlmpruneError
from llmprune.export import CARD, RECORD, check_output
from llmprune.job import Job, Progress, _seqlen, build_record
from llmprune.journal import Journal
from llmprune.loading import parse_dtype
from llmprune.memory import available_bytes
from llmprune.model import find_decoder_layers
from llmprune.shards import Checkpoint
from llmprune.stream import (
    OFFLOAD_SHARE,
    StreamHost,
    activation_bytes,
    build_skeleton,
    check_disk,
    fingerprint,
    open_staging,
    publish_staging,
    stream_perplexity,
)


def run_streaming(job: Job, folder: Path, device: torch.device, progress: Progress | None,
                  cancel: Callable[[], bool] | None, command: list[str] | None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    assert isinstance(job.prune, PruneConfig) and job.out
    out = check_output(job.out, job.overwrite)
    timings: dict[str, float] = {}

    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    tick = time.perf_counter()
    source = Checkpoint(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = build_skeleton(folder, parse_dtype(job.dtype))
    storage = next(model.parameters()).dtype
    layers_path, layers = find_decoder_layers(model)
    devices = None
    if job.device_map:
        from llmprune.placement import layer_devices

        devices = layer_devices(model, layers_path, len(layers), job.device_map)
    timings["load_s"] = time.perf_counter() - tick

    cal = job.calibration
    seqlen = _seqlen(cal.seqlen, model)
    calibration = calibration_data(tokenizer, cal.source, cal.samples, seqlen, cal.seed)
    width = model.get_input_embeddings().weight.shape[1]  # type: ignore[operator]
    activations = activation_bytes(cal.samples, seqlen, width, storage)

    staging, resuming = open_staging(out, job.resume, job.overwrite)
    stamp = fingerprint(str(folder.resolve()), job.prune, calibration, job.batch_size, storage, str(device))
    journal = Journal.load(staging, stamp) if resuming else Journal.start(staging, stamp)
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
    try:
        check_disk(staging, max(0, expected - written) + 2 * activations, "the pruned checkpoint")
        if offload is not None and offload != journal.folder:
            check_disk(offload, 2 * activations, f"--offload-dir activations ({activations / 1e9:.2f} GB a layer)")
    except LlmpruneError:
        if not resuming:  # nothing was done: leave no interrupted run behind
            shutil.rmtree(staging, ignore_errors=True)
        raise

    host = StreamHost(model, source, staging, journal, offload)
    dense = pruned = None
    windows = None
    if job.evaluation.source:
        tick = time.perf_counter()
        windows = evaluation_data(tokenizer, job.evaluation.source, _seqlen(job.evaluation.seqlen, model),
                                  job.evaluation.windows or None)
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
    _write_metadata(model, tokenizer, staging, record)
    record["timings"]["save_s"] = time.perf_counter() - tick
    publish_staging(staging, out, job.overwrite)
    record["out"] = str(out)
    return record


def _ppl(model: Any, host: StreamHost, source: Checkpoint, windows: torch.Tensor, device: torch.device,
         job: Job, tokenizer: Any, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    ppl = stream_perplexity(model, host, source, windows, device, job.evaluation.batch_size, progress)
    return {"source": job.evaluation.source, "split": "evaluation", "seqlen": windows.shape[1],
            "windows": windows.shape[0], "tokens": windows.numel(), "bos": wants_bos(tokenizer) is not None,
            "ppl": ppl}


def _write_metadata(model: Any, tokenizer: Any, staging: Path, record: dict[str, Any]) -> None:
    """config (no sparsity_config), generation config, tokenizer, llmprune.json, model card."""
    model.config.save_pretrained(staging)
    config_path = staging / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("sparsity_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    record["checkpoint_bytes"] = sum(f.stat().st_size for f in staging.glob("*.safetensors"))
    (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    (staging / CARD).write_text(model_card(record))
