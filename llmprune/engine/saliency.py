"""What a method needs from outside a decoder layer: per-weight statistics from the network
loss's gradients, and the sparsity of each linear under a global comparison group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from llmprune.core.patterns import global_prune_counts
from llmprune.engine.experts import expert_containers, unfused
from llmprune.engine.gradients import LossGradients
from llmprune.engine.model import find_linears, get_weight
from llmprune.errors import LlmpruneError
from llmprune.methods import FISHER, GRADIENT, PER_WEIGHT, Method, Stats
from llmprune.progress import Event, Progress, check_cancel


class Host(Protocol):
    def fetch(self, index: int, layer: nn.Module) -> None: ...

    def release(self, index: int, layer: nn.Module) -> None: ...


def check_gradients_possible(method: Method, kinds: set[str], layers: nn.ModuleList, streamed: bool) -> None:
    """Refuse, before any work, what gradients of the network loss cannot serve."""
    if not kinds & PER_WEIGHT:
        return
    if streamed:
        raise LlmpruneError(f"method {method.name} needs gradients of the whole model's loss, and a streaming run "
                            "holds one decoder layer at a time; run it in memory (--stream off) or on a device map")
    for index, layer in enumerate(layers):
        if expert_containers(layer):
            raise LlmpruneError(f"method {method.name} reads per-weight gradients of linear layers, and decoder "
                                f"layer {index} holds fused expert weights; use wanda, sparsegpt or magnitude")


def layer_weight_stats(gradients: LossGradients | None, kinds: set[str], prefix: str, layer: nn.Module,
                       device: torch.device) -> dict[str, Stats] | None:
    """Per linear of one decoder layer (names relative to it): the per-weight statistics of
    ``kinds`` on ``device``; None when the method reads none."""
    wanted = kinds & PER_WEIGHT
    if not wanted:
        return None
    assert gradients is not None
    found: dict[str, Stats] = {}
    for name, linear in find_linears(layer).items():
        mean, fisher = gradients.of(f"{prefix}.{name}", linear)
        stats: Stats = {}
        if GRADIENT in wanted:
            stats[GRADIENT] = mean.to(device)
        if FISHER in wanted:
            stats[FISHER] = fisher.to(device)
        found[name] = stats
    return found


def global_allocation(method: Method, layers_path: str, layers: nn.ModuleList, host: Host,
                      gradients: LossGradients | None, kinds: set[str], target: float, expert_statistics: Any,
                      progress: Progress | None, cancel: Callable[[], bool] | None) -> dict[str, Any]:
    """One comparison group over every prunable weight of every decoder layer: the method's
    saliency of each weight (known before pruning), the ``target`` share of the lowest pruned.
    Returns the allocation record: each linear's [pruned, size] (by full name) and each layer's
    sparsity. Holds
    every weight's saliency in memory meanwhile (4 bytes each). Progress: stage "allocate"."""
    assert method.saliency is not None
    names: list[str] = []
    scores: list[torch.Tensor] = []
    per_layer: list[list[int]] = []
    for index, layer in enumerate(layers):
        check_cancel(cancel, f"while ranking weights, after {index} of {len(layers)} decoder layers")
        host.fetch(index, layer)
        prefix = f"{layers_path}.{index}"
        with unfused(layer, expert_statistics):
            extra = layer_weight_stats(gradients, kinds, prefix, layer, torch.device("cpu")) or {}
            start = len(names)
            for name, linear in find_linears(layer).items():
                names.append(f"{prefix}.{name}")
                scores.append(method.saliency(get_weight(linear).detach().float(), extra.get(name, {})).cpu())
            per_layer.append(list(range(start, len(names))))
        host.release(index, layer)
        if progress is not None:
            progress(Event("allocate", index + 1, len(layers), "layers"))
    counts = global_prune_counts(scores, target)
    sizes = [s.numel() for s in scores]
    pairs = {name: [count, size] for name, count, size in zip(names, counts, sizes, strict=True)}
    layer_sparsity = [sum(counts[i] for i in members) / max(1, sum(sizes[i] for i in members))
                      for members in per_layer]
    return {"kind": "global", "method": method.name, "sparsity": layer_sparsity, "linear_counts": pairs}
