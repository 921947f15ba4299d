"""Model stores: where a job's model lives while the pipeline works on it.

:class:`MemoryStore` loads the whole model; :class:`StreamStore` builds it without weights and
streams one decoder layer at a time from safetensors shards to the output's shards (for
checkpoints larger than memory, and runs that must survive an interruption: ``--resume``). The
pipeline (:mod:`llmprune.jobs.pipeline`) asks a store for the same things either way: the model
and tokenizer, perplexity, pruning, a finished checkpoint folder to publish.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.engine.config import PruneConfig
from llmprune.engine.curves import curve_allocation
from llmprune.engine.driver import PREPASS_SAMPLES, PruneReport, check_prunable, prune
from llmprune.engine.model import find_decoder_layers
from llmprune.engine.observe import InputNorms, plain_layers
from llmprune.engine.saliency import check_gradients_possible
from llmprune.engine.stream import (
    OFFLOAD_SHARE,
    StreamHost,
    activation_bytes,
    build_skeleton,
    check_disk,
    fingerprint,
    open_staging,
)
from llmprune.errors import LlmpruneError
from llmprune.eval.perplexity import MemoryLayers, layerwise_perplexity, perplexity, streamed_perplexity
from llmprune.io.converted import ModelCheckpoint
from llmprune.io.export import make_staging, signals_held, write_metadata
from llmprune.io.generated import generated_windows, tokens_read
from llmprune.io.journal import FOLDER as JOURNAL_FOLDER
from llmprune.io.journal import Journal
from llmprune.io.loading import BUILTIN_MODELS, check_local_folder, load, parse_dtype, resolve
from llmprune.io.memory import available_bytes
from llmprune.io.shards import Checkpoint
from llmprune.jobs.spec import Job
from llmprune.methods import get_method, pieces
from llmprune.progress import Cancel, Progress
from llmprune.structured.experts import plan_removal
from llmprune.structured.run import StructuredConfig

log = logging.getLogger(__name__)

Card = Callable[[dict[str, Any]], str]


class ModelStore:
    """The model of one job, and everything the pipeline does that depends on where it lives."""

    model: Any  # a transformers PreTrainedModel
    tokenizer: Any
    devices: list[torch.device] | None = None  # one per decoder layer, from --device-map

    def load(self) -> None:
        raise NotImplementedError

    def prepare(self, calibration: torch.Tensor, device: torch.device) -> None:
        """Called once the calibration set is known, before any evaluation: a store that must
        check disk space or open a journal does it here, so it fails before the work."""

    def perplexity(self, windows: torch.Tensor, device: torch.device, batch_size: int, stage: str,
                   progress: Progress | None, cancel: Cancel | None) -> float:
        raise NotImplementedError

    def can_generate(self) -> bool:
        """Whether the whole model is in one place to sample calibration windows from."""
        return False

    def generate(self, calibration: torch.Tensor, count: int, seed: int, device: torch.device,
                 progress: Progress | None, cancel: Cancel | None) -> torch.Tensor:
        """``calibration`` with its first ``count`` windows written by the dense model."""
        raise LlmpruneError(f"{type(self).__name__} cannot sample calibration windows")

    def prune(self, config: PruneConfig, calibration: torch.Tensor, device: torch.device, batch_size: int | None,
              progress: Progress | None, cancel: Cancel | None) -> PruneReport:
        raise NotImplementedError

    def replace(self, model: nn.Module) -> None:
        """Put a new model (the physically smaller one structured pruning builds) in the store."""
        raise LlmpruneError(f"{type(self).__name__} cannot take a new model")

    def write(self, out: Path, record: dict[str, Any], card: Card) -> Path:
        """Write the finished checkpoint (weights, config, tokenizer, record, card) to a staging
        folder beside ``out`` and return it; the pipeline publishes it."""
        raise NotImplementedError

    def facts(self) -> dict[str, Any] | None:
        """What the record says about how the store ran (None: nothing to say)."""
        return None

    def close(self, failed: bool) -> None:
        """Remove what the store wrote that is not worth keeping (``failed``: the job did not
        publish)."""


def layer_devices_of(model: nn.Module, device_map: str | None) -> list[torch.device] | None:
    if not device_map:
        return None
    from llmprune.engine.placement import layer_devices

    layers_path, layers = find_decoder_layers(model)
    return layer_devices(model, layers_path, len(layers), device_map)


class MemoryStore(ModelStore):
    """The whole model in memory (on the CPU between layer visits)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.staging: Path | None = None
        self.owl_norms: InputNorms | None = None

    def load(self) -> None:
        self.model, self.tokenizer = load(self.job.model, self.job.dtype)
        if isinstance(self.job.prune, PruneConfig):
            check_prunable(self.model, self.job.prune.allow_partial)
            refuse_early(self.job.prune, self.model, streamed=False)
        elif self.job.prune.pattern == "experts":  # refused before the dense evaluation, not after it
            plan_removal(self.model, self.job.prune.amount)
        self.devices = layer_devices_of(self.model, self.job.device_map)

    def perplexity(self, windows: torch.Tensor, device: torch.device, batch_size: int, stage: str,
                   progress: Progress | None, cancel: Cancel | None) -> float:
        if self.devices is not None:  # a device map: each layer where the map puts it
            return layerwise_perplexity(self.model, MemoryLayers(self.model), windows, self.devices, device,
                                        batch_size, stage, progress, cancel)
        home = next(self.model.parameters()).device
        self.model.to(device)
        try:
            return perplexity(self.model, windows, batch_size=batch_size, stage=stage, progress=progress,
                              cancel=cancel)
        finally:
            self.model.to(home)

    def can_generate(self) -> bool:
        return self.devices is None

    def generate(self, calibration: torch.Tensor, count: int, seed: int, device: torch.device,
                 progress: Progress | None, cancel: Cancel | None) -> torch.Tensor:
        config = self.job.prune
        samples, seqlen = calibration.shape
        # OWL reads the input norms of the tokens the dense model reads while writing, with no pass
        # of its own, where they are at least a quarter of the windows its pass would read (the
        # default's quarter of the calibration set: measured on them, README).
        if not (isinstance(config, PruneConfig) and config.allocation == "owl"
                and 4 * count >= min(samples, PREPASS_SAMPLES) and plain_layers(find_decoder_layers(self.model)[1])):
            return generated_windows(self.model, self.tokenizer, calibration, count, seed, device, progress, cancel)
        with InputNorms(self.model) as norms:
            windows = generated_windows(self.model, self.tokenizer, calibration, count, seed, device, progress, cancel)
        # Each token once (a model that generates without its key/value cache reads the prefix again).
        expected = tokens_read(count, seqlen)
        if norms.tokens == expected:
            self.owl_norms = norms
        else:
            log.info("the model read %d tokens while writing the calibration windows, not %d: OWL makes its own "
                     "pass", norms.tokens, expected)
        return windows

    def prune(self, config: PruneConfig, calibration: torch.Tensor, device: torch.device, batch_size: int | None,
              progress: Progress | None, cancel: Cancel | None) -> PruneReport:
        return prune(self.model, config, calibration, device=device, batch_size=batch_size, progress=progress,
                     cancel=cancel, layer_devices=self.devices, owl_norms=self.owl_norms)

    def replace(self, model: nn.Module) -> None:
        self.model = model

    def write(self, out: Path, record: dict[str, Any], card: Card) -> Path:
        with signals_held():  # made and owned (for close to remove) with nothing in between
            self.staging = make_staging(out)
        self.model.save_pretrained(self.staging, max_shard_size="5GB")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self.staging)
        write_metadata(self.staging, record, card)
        return self.staging

    def close(self, failed: bool) -> None:
        if failed and self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


def refuse_early(config: PruneConfig, model: nn.Module, streamed: bool) -> None:
    """What this model cannot do, refused before the dense evaluation: a method that reads the
    network loss's gradients where they cannot be had (streaming, fused experts); sensitivity
    curves measured on other layers."""
    method = get_method(config.method_name)
    layers = find_decoder_layers(model)[1]
    check_gradients_possible(method, pieces.needs(method, config.options()), layers, streamed)
    if config.sensitivity is not None:  # the whole allocation, so no part of it fails after the work
        curve_allocation(config.sensitivity, layers, config.target_sparsity)


def check_tensor_names(model: Any, source: ModelCheckpoint) -> None:
    """Refuse a checkpoint whose tensors (under the model's names, converted as transformers
    converts them) are not exactly the model's (missing weights would be left empty, unexpected
    ones dropped), before any work."""
    state = model.state_dict(keep_vars=True)
    parameters = {id(p) for p in model.parameters()}
    aliases: dict[int, list[str]] = {}
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(name)
    present = source.names
    missing = sorted(names[0] for key, names in aliases.items() if key in parameters and not present & set(names))
    # What transformers itself ignores in a checkpoint: its model's patterns, and buffers the
    # model makes itself (rotary inv_freq, causal-mask biases) that older checkpoints saved.
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    buffers = {name for name, _ in model.named_buffers()}
    unexpected = sorted(n for n in present - set(state) if n not in buffers and not any(p.search(n) for p in ignored))
    shapes = source.shapes
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


class StreamStore(ModelStore):
    """The model without weights; each decoder layer read from ``folder``'s shards when visited and
    written, pruned, to the staging folder beside ``out``, with a journal for ``--resume``."""

    def __init__(self, job: Job, folder: Path, out: Path) -> None:
        self.job, self.folder, self.out = job, folder, out
        self.journal: Journal | None = None
        self.staging: Path | None = None
        self.resuming = False
        self.pruned = False
        self.offload: Path | None = None
        self.activations = 0

    def load(self) -> None:
        from transformers import AutoTokenizer

        assert isinstance(self.job.prune, PruneConfig)
        check_local_folder(self.folder, self.job.model)
        checkpoint = Checkpoint(self.folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = build_skeleton(self.folder, parse_dtype(self.job.dtype))
        self.source = ModelCheckpoint(self.model, checkpoint)
        check_prunable(self.model, self.job.prune.allow_partial)
        refuse_early(self.job.prune, self.model, streamed=True)
        check_tensor_names(self.model, self.source)
        self.devices = layer_devices_of(self.model, self.job.device_map)

    def prepare(self, calibration: torch.Tensor, device: torch.device) -> None:
        job = self.job
        storage = next(self.model.parameters()).dtype
        width = self.model.get_input_embeddings().weight.shape[1]
        self.activations = activation_bytes(calibration.shape[0], calibration.shape[1], width, storage)
        self.staging, self.resuming = open_staging(self.out, job.resume, job.overwrite)
        stamp = fingerprint(str(self.folder.resolve()), job.prune, calibration, job.batch_size, storage, str(device))
        self.journal = Journal.load(self.staging, stamp) if self.resuming else Journal.start(self.staging, stamp)
        self.resumed_at = len(self.journal.layers)
        offload = Path(job.offload_dir).expanduser().resolve() if job.offload_dir else None
        available = available_bytes()
        if offload is None and available is not None and 3 * self.activations > OFFLOAD_SHARE * available:
            offload = self.journal.folder  # too large for memory: keep them beside the journal
        if offload is not None:
            offload.mkdir(parents=True, exist_ok=True)
        self.offload = offload
        itemsize = torch.empty((), dtype=storage).element_size()
        written = sum(e["bytes"] for e in self.journal.layers)
        expected = sum(int(t.numel()) for t in self.model.state_dict().values()) * itemsize
        # Recovery toward the dense model journals its activations too (the last layer's and the next).
        prune = job.prune
        toward_model = isinstance(prune, PruneConfig) and prune.recover == "blockwise" \
            and prune.recover_target == "model"
        dense = 2 * self.activations if toward_model else 0
        check_disk(self.staging, max(0, expected - written) + 2 * self.activations + dense, "the pruned checkpoint")
        if offload is not None and offload != self.journal.folder:
            gigabytes = self.activations / 1e9
            check_disk(offload, 2 * self.activations, f"offloaded activations ({gigabytes:.2f} GB a layer)")
        self.host = StreamHost(self.model, self.source, self.staging, self.journal, offload)

    def perplexity(self, windows: torch.Tensor, device: torch.device, batch_size: int, stage: str,
                   progress: Progress | None, cancel: Cancel | None) -> float:
        assert self.staging is not None
        source = ModelCheckpoint(self.model, Checkpoint(self.staging)) if self.pruned else self.source
        devices = self.devices or [device] * len(self.host.layers)
        return streamed_perplexity(self.model, self.host, source, windows, devices, device, batch_size, stage,
                                   progress, cancel)

    def prune(self, config: PruneConfig, calibration: torch.Tensor, device: torch.device, batch_size: int | None,
              progress: Progress | None, cancel: Cancel | None) -> PruneReport:
        self.host.load_rest(head=False)  # the capture runs no head
        report = prune(self.model, config, calibration, device=device, batch_size=batch_size, progress=progress,
                       cancel=cancel, layer_devices=self.devices, host=self.host)
        self.host.finalize()
        self.pruned = True
        return report

    def write(self, out: Path, record: dict[str, Any], card: Card) -> Path:
        assert self.staging is not None
        self.host.drop_journal()
        self.model.config.save_pretrained(self.staging)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(self.staging)
        self.tokenizer.save_pretrained(self.staging)
        write_metadata(self.staging, record, card)
        return self.staging

    def facts(self) -> dict[str, Any] | None:
        return {"source": str(self.folder), "resumed_at_layer": self.resumed_at,
                "activations_offloaded_to": str(self.offload) if self.offload else None,
                "activation_bytes": self.activations,
                "layer_devices": [str(d) for d in self.devices] if self.devices else None}

    def close(self, failed: bool) -> None:
        # A fresh run that fails before its first layer is done has nothing worth resuming: leave
        # no interrupted run behind (a rerun would otherwise be asked for --resume).
        # Nor one whose journal is gone (stopped while its metadata was written): no resume could
        # use it.
        if failed and self.staging is not None and self.staging.exists():
            fresh_and_empty = not self.resuming and (self.journal is None or not self.journal.layers)
            if fresh_and_empty or not (self.staging / JOURNAL_FOLDER).exists():
                shutil.rmtree(self.staging, ignore_errors=True)


# A checkpoint is streamed (auto mode) when its weights take more than this share of the memory
# still available: loading it whole would not leave room for statistics and activations.
STREAM_SHARE = 0.5


def open_store(job: Job, out: Path | None) -> ModelStore:
    """The store ``job`` runs on: streamed when asked, or when the checkpoint would not fit."""
    folder = streaming_source(job)
    if folder is None:
        return MemoryStore(job)
    if job.calibration.generated:
        raise LlmpruneError("calibration.generated (--generated) samples from the whole model in memory, which a "
                            "streaming run never holds; give --stream off or --generated 0")
    if job.tasks.names:
        raise LlmpruneError("lm-eval tasks need the whole model in memory, which a streaming run never "
                            "holds; evaluate the result with `llmprune eval OUT --tasks ...`")
    assert out is not None
    return StreamStore(job, folder, out)


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

    from llmprune.io.hub import describe_hub_error, hub_errors, hub_unreachable

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
