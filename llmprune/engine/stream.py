"""Prune a model larger than memory: decoder layers streamed from safetensors shards to disk.

The model is built without weights (under ``torch.device("meta")``, its buffers then made real
as transformers' own loading makes them). The embeddings and other non-layer tensors the
calibration capture needs are read for it and released; all of them are copied, by byte range,
into the first output shard. Then, for each decoder layer, its tensors are
read from the source shards, the layer is pruned by the same :func:`llmprune.engine.driver.prune` loop
as in memory, written to a shard of its own and released again. Memory therefore holds one
decoder layer, its statistics and the calibration activations (which may themselves live in a
file, :class:`~llmprune.io.activations.BatchFile`).

Every finished layer is recorded in a :class:`~llmprune.io.journal.Journal` in the output's
temporary folder, so ``resume=True`` continues an interrupted run from its last complete layer
and writes the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune import __version__
from llmprune.engine.driver import LayerHost, LinearReport, PruneReport, Resumed, Sink
from llmprune.engine.model import find_decoder_layers, is_finite
from llmprune.errors import LlmpruneError
from llmprune.io.activations import BatchFile, file_sha256
from llmprune.io.converted import ModelCheckpoint, stored_layout
from llmprune.io.export import make_staging
from llmprune.io.journal import FOLDER as JOURNAL_FOLDER
from llmprune.io.journal import Journal
from llmprune.io.shards import DTYPES, Stored, copy_shard, locate, shard_name, write_index, write_shard
from llmprune.io.threads import MODEL_BUILD

log = logging.getLogger(__name__)

# Activations are moved to a file when input, output and one batch in flight would take more
# than this share of the memory still available.
OFFLOAD_SHARE = 0.25


def staging_folder(out: Path) -> Path:
    """The fixed temporary folder beside ``out`` that a streaming run writes and resumes."""
    return out.parent / f".{out.name}.partial"


def build_skeleton(folder: Path, dtype: torch.dtype | None) -> nn.Module:
    """The model with every parameter on the meta device (no memory), buffers real."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    # torch.device("meta") is thread-local; accelerate's init_empty_weights patches nn.Module for
    # the whole process, so a job in another thread would build its model empty too.
    with MODEL_BUILD, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or _config_dtype(config))
    with MODEL_BUILD:
        materialise_buffers(model)
    model.tie_weights()
    model.eval()
    return model


def materialise_buffers(model: nn.Module) -> None:
    """Give a model built on the meta device real buffers, filled as transformers fills them when
    it loads a checkpoint: by the model's own ``_init_weights`` (rotary frequencies, embedding
    scales). The persistent ones a checkpoint holds are read over them later. A buffer the
    model's initialisation leaves unfilled is an error, not a silent NaN."""
    filled: list[str] = []
    for name, buffer in list(model.named_buffers()):
        if buffer.device.type == "meta":
            blank = torch.full_like(buffer, float("nan") if buffer.is_floating_point() else 0, device="cpu")
            _set(model, name, blank)
            filled.append(name)
    init = getattr(model, "_init_weights", None)
    owners = {name.rpartition(".")[0] for name in filled}
    with torch.no_grad():
        for owner in sorted(owners):
            if init is not None:
                init(model.get_submodule(owner))
    for name in filled:
        value = model.get_buffer(name)
        if value.is_floating_point() and torch.isnan(value).any():
            raise LlmpruneError(f"{type(model).__name__} does not compute its buffer {name} without building the "
                                "whole model; prune it in memory (--stream off)")


def _config_dtype(config: Any) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, value) if isinstance(value, str) else value


def _own_tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters (tied ones once) and persistent buffers, by full name: what a checkpoint holds."""
    stem = prefix.rstrip(".")
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(prefix=stem))
    persistent = module.state_dict(prefix=prefix)
    tensors.update((n, b) for n, b in module.named_buffers(prefix=stem) if n in persistent)
    return tensors


def _set(model: nn.Module, name: str, value: torch.Tensor | None, device: str = "cpu") -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, device, value=value)


def activation_bytes(nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype) -> int:
    return nsamples * seqlen * hidden * torch.empty((), dtype=dtype).element_size()


def check_disk(folder: Path, needed: int, what: str) -> None:
    """Fail before any work when ``folder``'s file system lacks ``needed`` bytes."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise LlmpruneError(f"not enough disk for {what} in {folder}: needs {needed / 1e9:.2f} GB, "
                            f"{free / 1e9:.2f} GB free")


class StreamHost(LayerHost):
    """Reads each decoder layer from ``source`` and writes it, pruned, to ``staging``, stored as
    ``save_pretrained`` stores it (:func:`~llmprune.io.converted.stored_layout`: a mixture of
    experts one matrix per expert, as the checkpoints of most families hold them)."""

    def __init__(self, model: nn.Module, source: ModelCheckpoint, staging: Path, journal: Journal,
                 offload_dir: Path | None) -> None:
        self.model, self.source, self.staging, self.journal = model, source, staging, journal
        self.layers_path, self.layers = find_decoder_layers(model)
        self.total = len(self.layers) + 1  # shard 1: everything outside the decoder layers
        self.offload_dir = offload_dir
        self.rest = {name: t for name, t in _own_tensors(model).items()
                     if not name.startswith(self.layers_path + ".")}
        self.parameters = {name for name, _ in model.named_parameters()}
        self.previous: BatchFile | None = None
        self.previous_dense: BatchFile | None = None  # the dense model's activations (recovery)

    # -- the front: embeddings, final norm, lm_head ---------------------------------------
    def load_rest(self, head: bool = True) -> None:
        """Read the non-layer tensors. ``head=False``: those the calibration capture needs, all but
        an untied output head, which only the evaluation runs (:meth:`captured` copies it)."""
        skip = None if head else self._head()
        wanted = [n for n in self.rest if (n in self.source.names or not self._is_buffer(n)) and n != skip]
        for name, value in self.source.read(wanted).items():
            _set(self.model, name, value)
        self.model.tie_weights()  # type: ignore[operator]  # setting a tensor replaces the Parameter, which unties it

    def _head(self) -> str | None:
        """The name of the output head's weight when it is a tensor of its own (not tied)."""
        get = getattr(self.model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        weight = getattr(head, "weight", None)
        if weight is None or weight is self.model.get_input_embeddings().weight:  # type: ignore[operator]
            return None
        return next((n for n, p in self.model.named_parameters() if p is weight), None)

    def release_rest(self) -> None:
        for name in self.rest:
            if not self._is_buffer(name):
                _set(self.model, name, None, "meta")
        self.model.tie_weights()  # type: ignore[operator]

    def _is_buffer(self, name: str) -> bool:
        return name not in self.parameters

    def captured(self, model: nn.Module) -> None:
        if self.journal.rest is None:
            self._write_rest()
        self.release_rest()

    def _write_rest(self) -> None:
        """Shard 1: the tensors outside the decoder layers, never pruned. Those the source holds
        in the model's dtype are copied from it by byte range (a large model's embeddings and
        head would otherwise be resident while written), checked for NaN and Inf on the way."""
        model = _own_tensors(self.model)
        stored = locate(self.source.checkpoint, [n for n in self.rest if self.source.plain(n)])
        parts: dict[str, Stored | torch.Tensor] = {}
        held: dict[str, torch.Tensor] = {}
        for name in self.rest:
            tensor, found = model[name], stored.get(name)
            if found is not None and DTYPES[found.dtype] == tensor.dtype and found.shape == list(tensor.shape):
                parts[name] = found
            elif tensor.device.type == "meta":  # the head, in another dtype than the model's
                held[name] = self.source.read([name])[name].to(tensor.dtype)
            else:
                held[name] = tensor
        parts.update(stored_layout(self.model, held) if held else {})

        def check(name: str, chunk: torch.Tensor) -> None:
            if chunk.is_floating_point() and not is_finite(chunk):
                raise LlmpruneError(f"weight {name} contains NaN or Inf; the checkpoint is damaged")

        name = shard_name(1, self.total)
        path = copy_shard(self.staging, name, parts, check)
        size = sum(p.end - p.start if isinstance(p, Stored) else p.numel() * p.element_size() for p in parts.values())
        self.journal.record_rest({"shard": name, "sha256": file_sha256(path), "tensors": sorted(parts),
                                  "bytes": size})

    # -- the decoder layers ----------------------------------------------------------------
    def lockstep_budget(self) -> int:
        """Running every calibration batch through a layer at once (lockstep) keeps all their
        activations alive; a streaming run allows that only while they are no larger than one
        decoder layer's weights. Otherwise each batch runs alone, one pass per input group: the
        same result (same batches, same order) for more compute and far less memory."""
        from llmprune.engine.driver import LOCKSTEP_BUDGET

        layer = sum(t.numel() for t in _own_tensors(self.layers[0]).values())
        return min(LOCKSTEP_BUDGET, layer)

    def resume(self, hidden: list[torch.Tensor]) -> Resumed:
        done = self.journal.layers
        if not done:
            return Resumed(0, hidden)
        last = done[-1]
        folder = self.offload_dir or self.journal.folder
        stored = BatchFile.reopen(folder, last["activations"])
        if len(stored) != len(hidden) or [tuple(t.shape) for t in hidden] != stored.shapes:
            raise LlmpruneError(f"resume journal in {self.staging} holds activations of another shape")
        self.previous = stored
        inputs: Sequence[torch.Tensor] = stored if self.offload_dir else list(stored)
        dense = None
        if "dense_activations" in last:
            self.previous_dense = BatchFile.reopen(self.journal.folder, last["dense_activations"])
            dense = list(self.previous_dense)
        linears = [LinearReport(**{**item, "shape": tuple(item["shape"])}) for e in done for item in e["linears"]]
        log.info("resuming after decoder layer %d of %d", last["index"] + 1, len(self.layers))
        return Resumed(last["index"] + 1, inputs, linears, [e["seconds"] for e in done],
                       [(int(e["weights"][0]), int(e["weights"][1])) for e in done],
                       [r for e in done for r in e.get("recovery") or []], dense)

    def _prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    def fetch(self, index: int, layer: nn.Module) -> None:
        prefix = self._prefix(index)
        expected = set(_own_tensors(layer, prefix))
        present = {n for n in self.source.names if n.startswith(prefix)}
        if expected - present:
            missing = sorted(expected - present)[0]
            raise LlmpruneError(f"tensor {missing} is not in the checkpoint at {self.source.folder} "
                                "(its names do not match this transformers version's model)")
        for name, value in self.source.read(sorted(expected)).items():
            _set(self.model, name, value)

    def release(self, index: int, layer: nn.Module) -> None:
        # Only what fetch reads back goes: a buffer the layer computes itself must survive.
        for name in _own_tensors(layer, self._prefix(index)):
            if not self._is_buffer(name):
                _set(self.model, name, None, "meta")

    def sink(self, index: int) -> Sink:
        if self.offload_dir is None:
            return []
        return BatchFile(self.offload_dir / f"activations-{index:05d}.bin")

    def finish(self, index: int, layer: nn.Module, outputs: Sink, report: PruneReport,
               dense: list[torch.Tensor] | None = None) -> Sequence[torch.Tensor]:
        tensors = stored_layout(self.model, _own_tensors(layer, self._prefix(index)))
        name = shard_name(index + 2, self.total)
        path = write_shard(self.staging, name, tensors)
        if isinstance(outputs, BatchFile):
            stored = outputs.close()
        else:
            stored = BatchFile(self.journal.folder / f"activations-{index:05d}.bin")
            for batch in outputs:
                stored.append(batch)
            stored.close()
        dense_file = None
        if dense is not None:  # recovery toward the dense model resumes from its activations too
            dense_file = BatchFile(self.journal.folder / f"dense-{index:05d}.bin")
            for batch in dense:
                dense_file.append(batch)
            dense_file.close()
        prefix = self._prefix(index)
        self.journal.record_layer({
            "index": index, "shard": name, "sha256": file_sha256(path), "tensors": sorted(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "linears": [asdict(r) for r in report.linears if r.name.startswith(prefix)],
            "seconds": report.layer_seconds[-1], "activations": stored.describe(),
            "weights": list(report.weight_counts[-1]),
            "recovery": [r for r in report.recovery if r["layer"] == index],
            **({"dense_activations": dense_file.describe()} if dense_file is not None else {}),
        })
        if self.previous is not None:
            self.previous.path.unlink(missing_ok=True)
        if self.previous_dense is not None:
            self.previous_dense.path.unlink(missing_ok=True)
        self.previous, self.previous_dense = stored, dense_file
        layer.to("meta")
        return stored if isinstance(outputs, BatchFile) else outputs

    def finalize(self) -> None:
        """Write the shard index: the folder's weights are a complete checkpoint. The journal and
        the last layer's activations stay until :meth:`drop_journal`, so a run stopped after
        this (during the evaluation or the save) still resumes, with every layer done."""
        entries = [self.journal.rest, *self.journal.layers]
        weight_map = {tensor: entry["shard"] for entry in entries if entry for tensor in entry["tensors"]}
        write_index(self.staging, weight_map, sum(entry["bytes"] for entry in entries if entry))

    def drop_journal(self) -> None:
        """Remove the journal and the last activations: the folder is about to be published."""
        for previous in (self.previous, self.previous_dense):
            if previous is not None:
                previous.path.unlink(missing_ok=True)
        shutil.rmtree(self.staging / JOURNAL_FOLDER, ignore_errors=True)


def fingerprint(source: str, config: Any, calibration: torch.Tensor, batch_size: int | None,
                dtype: torch.dtype, device: str) -> dict[str, Any]:
    """What must match for a resumed run to write what an uninterrupted one would."""
    return {
        # JSON-normal (tuples as lists), as the journal reads it back
        "model": source, "config": json.loads(json.dumps(asdict(config))), "dtype": str(dtype),
        "batch_size": batch_size,
        "calibration_sha256": hashlib.sha256(calibration.to(torch.int64).numpy().tobytes()).hexdigest(),
        "calibration_shape": list(calibration.shape), "device": device,
        "llmprune": __version__, "torch": torch.__version__.split("+")[0],
    }


def open_staging(out: Path, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """The staging folder for ``out``: (path, whether it holds an interrupted run to resume).
    The caller holds ``out``'s :class:`~llmprune.io.export.OutputLock`, so no live run owns it."""
    staging = staging_folder(out)
    if staging.exists() and not resume:
        if not overwrite:
            raise LlmpruneError(f"an interrupted run left {staging}; pass --resume to continue it, or "
                                "--overwrite to discard it and start again")
        shutil.rmtree(staging)
    if staging.exists():
        return staging, True
    if resume:
        log.warning("nothing to resume in %s; starting from the first layer", staging)
    return make_staging(out, "partial"), False
