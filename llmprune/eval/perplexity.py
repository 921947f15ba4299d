"""Perplexity with the published protocol (non-overlapping windows of the joined test text)."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn

from llmprune.engine.capture import capture_layer_calls
from llmprune.engine.model import find_decoder_layers
from llmprune.engine.placement import move_front
from llmprune.engine.stream import StreamHost
from llmprune.io.converted import ModelCheckpoint
from llmprune.progress import Cancel, Progress, Steps

log = logging.getLogger(__name__)

CE_ROWS = 256  # token positions per cross-entropy call: bounds its log-softmax copy (~50 MB at 49k vocab)


def summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Σ −log p(ids[t+1] | ids[:t+1]) over all positions, without copying the (batch, seqlen,
    vocab) logits: the last position of each row gets no target, instead of slicing it off."""
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    total = 0.0
    for start in range(0, flat.shape[0], CE_ROWS):
        total += nn.functional.cross_entropy(
            flat[start : start + CE_ROWS].float(), flat_targets[start : start + CE_ROWS],
            reduction="sum", ignore_index=-100,
        ).item()
    return total


class LossHead:
    """The model's output head applied to final hidden states a few rows at a time, giving
    Σ NLL without ever holding (batch, seqlen, vocab) logits (1 GB per 1k-token window at
    Gemma 3's 262k vocabulary). ``post`` is what the model's forward does to the head's output
    (Gemma's final soft-capping, Cohere's logit scale, Granite's logit scaling)."""

    def __init__(self, model: Any) -> None:
        self.base: nn.Module = model.base_model
        self.head: nn.Module = model.get_output_embeddings()
        config = model.config
        self.scale = getattr(config, "logit_scale", None)
        self.scaling = getattr(config, "logits_scaling", None)
        self.cap = getattr(config, "final_logit_softcapping", None)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids=ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if isinstance(self.scale, (int, float)):
            logits = logits * self.scale
        if isinstance(self.scaling, (int, float)):
            logits = logits / self.scaling
        if isinstance(self.cap, (int, float)):
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def summed_nll(self, hidden: torch.Tensor, ids: torch.Tensor) -> float:
        """:func:`summed_nll` of the logits of ``hidden`` (batch, seqlen, width), ``CE_ROWS``
        positions at a time."""
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        total = 0.0
        for start in range(0, flat.shape[0], CE_ROWS):
            logits = self.logits(flat[start : start + CE_ROWS]).float()
            total += nn.functional.cross_entropy(logits, flat_targets[start : start + CE_ROWS], reduction="sum",
                                                 ignore_index=-100).item()
        return total


PROBE = 32  # tokens of the first window on which the head is checked against the model's own logits
PROBE_TOLERANCE = 1e-4  # nats, on every log-probability of the probe (both paths do the same ops)


def loss_head(model: Any, probe: torch.Tensor) -> LossHead | None:
    """A :class:`LossHead` for ``model`` when it reproduces the model's own log-probabilities on
    ``probe`` (1, ≤ PROBE) token ids, else None: a forward that does more after its head than
    the steps known (or that the head path cannot run) is scored from its full logits instead
    (correct, only less frugal)."""
    base, output = getattr(model, "base_model", None), getattr(model, "get_output_embeddings", None)
    if base is None or base is model or output is None or output() is None:
        return None
    head = LossHead(model)
    try:
        full = model(input_ids=probe, use_cache=False).logits.float().log_softmax(-1)
        ours = head.logits(head.hidden(probe)).float().log_softmax(-1)
    except Exception as exc:  # any failure of the head path: the full-logits path
        log.info("%s: no loss from hidden states (%s); perplexity from full logits", type(model).__name__, exc)
        return None
    if full.shape != ours.shape or not torch.allclose(full, ours, rtol=0, atol=PROBE_TOLERANCE):
        log.info("%s: the output head does not reproduce the model's logits; perplexity from full logits",
                 type(model).__name__)
        return None
    return head


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    stage: str = "eval",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> float:
    """exp(mean next-token NLL) over every predicted token of ``windows`` (n, seqlen).

    Each window is scored on its own (no context carried over), as in GPTQ/SparseGPT/Wanda;
    the mean is over all predicted tokens, n · (seqlen − 1). The loss comes from the final
    hidden states, a few positions at a time (:class:`LossHead`). Progress: ``stage``, in
    windows; ``cancel`` is polled after each batch.
    """
    model.eval()
    run_device = torch.device(device) if device else next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    steps = Steps(progress, cancel, stage, windows.shape[0], "windows")
    steps(0)
    head = loss_head(model, windows[:1, :PROBE].to(run_device))
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(run_device)
        if head is not None:
            total_nll += head.summed_nll(head.hidden(batch), batch)
        else:
            total_nll += summed_nll(model(input_ids=batch, use_cache=False).logits, batch)
        total_tokens += batch[:, 1:].numel()
        steps(min(start + batch_size, windows.shape[0]))
    return math.exp(total_nll / total_tokens)


class Substitute:
    """A decoder layer's forward that ignores the hidden states it is given and runs the real
    layer on stored ones: the model's own tail (final norm, lm_head) then sees them."""

    def __init__(self, layer: nn.Module, stored: torch.Tensor) -> None:
        self.layer, self.stored = layer, stored

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.layer).forward
        if args:
            return forward(self.layer, self.stored.to(args[0].device), *args[1:], **kwargs)
        kwargs["hidden_states"] = self.stored.to(kwargs["hidden_states"].device)
        return forward(self.layer, **kwargs)


class MemoryLayers:
    """The layers of an in-memory model, for :func:`layerwise_perplexity`: nothing to read, and
    each layer goes back where it was after its turn."""

    def __init__(self, model: nn.Module) -> None:
        self.layers_path, self.layers = find_decoder_layers(model)

    def load_rest(self) -> None:
        pass

    def release_rest(self) -> None:
        pass

    def fetch(self, index: int, layer: nn.Module) -> None:
        pass


@torch.no_grad()
def layerwise_perplexity(model: nn.Module, source: Any, windows: torch.Tensor, devices: list[torch.device],
                         device: torch.device, batch_size: int = 1, stage: str = "eval",
                         progress: Progress | None = None, cancel: Cancel | None = None,
                         keep: bool = True) -> float:
    """:func:`perplexity` one decoder layer at a time, layer i on ``devices[i]`` (a device map),
    the last one and the head on ``device``. ``source`` gives the layers (``fetch``, and
    ``load_rest`` / ``release_rest`` for the tensors outside them): a :class:`MemoryLayers`, or
    a streaming host reading shards. ``keep``: layers go back where they were after their turn
    (else to the meta device: a streamed model holds one layer at a time). Progress in layers
    (the last step is the loss); ``cancel`` is polled after each."""
    layers = source.layers
    batches = list(windows.split(batch_size))
    steps = Steps(progress, cancel, stage, len(layers) + 1, "layers")
    steps(0)
    source.load_rest()
    try:
        hidden, calls = capture_layer_calls(model, layers, batches)
        for index, layer in enumerate(layers[:-1]):
            source.fetch(index, layer)
            home = next(layer.parameters()).device
            layer.to(devices[index])
            hidden = [call.run(layer, state, devices[index]).to("cpu")
                      for state, call in zip(hidden, calls[index], strict=True)]
            layer.to(home if keep else "meta")
            steps(index + 1)
        last = layers[-1]
        source.fetch(len(layers) - 1, last)
        total = tail_nll(model, source.layers_path, layers, hidden, batches, device, keep)
    finally:
        source.release_rest()
    steps(len(layers) + 1)
    return math.exp(total / windows[:, 1:].numel())


@torch.no_grad()
def tail_nll(model: nn.Module, layers_path: str, layers: nn.ModuleList, hidden: list[torch.Tensor],
             batches: list[torch.Tensor], device: torch.device, keep: bool = True) -> float:
    """Σ next-token NLL over ``batches`` when the last decoder layer is given ``hidden`` (the
    states entering it, one tensor per batch) and the model's own tail (final norm, head, its
    post-processing) follows, on ``device``. The embeddings and earlier layers are skipped; the
    front modules go back where the embeddings were afterwards, the last layer where it was
    (``keep``) or to the meta device."""
    last = layers[-1]
    home = next(last.parameters()).device
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    front = next(embeddings.parameters()).device if isinstance(embeddings, nn.Module) else torch.device("cpu")
    if front.type == "meta":  # a streamed model's front is read in by the caller
        front = torch.device("cpu")
    last.to(device)
    move_front(model, layers_path, device)
    total = 0.0
    saved = [block.__dict__.get("forward") for block in layers]
    try:
        for block in layers[:-1]:
            block.forward = lambda *a, **k: a[0] if a else k["hidden_states"]
        # Causal: the stored states of the first positions are those of the shorter probe.
        last.forward = Substitute(last, hidden[0][:1, :PROBE])
        head = loss_head(model, batches[0][:1, :PROBE].to(device))
        for batch, state in zip(batches, hidden, strict=True):
            last.forward = Substitute(last, state)
            ids = batch.to(device)
            if head is not None:
                total += head.summed_nll(head.hidden(ids), ids)
            else:
                total += summed_nll(model(input_ids=ids, use_cache=False).logits, ids)
    finally:
        for block, original in zip(layers, saved, strict=True):
            if original is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = original
        move_front(model, layers_path, front)
        last.to(home if keep else "meta")
    return total


def streamed_perplexity(model: nn.Module, host: StreamHost, source: ModelCheckpoint, windows: torch.Tensor,
                        devices: list[torch.device], device: torch.device, batch_size: int = 1,
                        stage: str = "eval", progress: Progress | None = None, cancel: Cancel | None = None) -> float:
    """:func:`layerwise_perplexity` with each decoder layer read from ``source`` (the dense
    checkpoint, or the pruned shards written so far) and dropped after its turn."""
    reader = copy.copy(host)  # the same model and layers, read from ``source``
    reader.source = source
    return layerwise_perplexity(model, reader, windows, devices, device, batch_size, stage, progress, cancel,
                                keep=False)
