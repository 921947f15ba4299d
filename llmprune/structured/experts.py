"""Expert removal: the same number of whole experts dropped from every mixture-of-experts layer,
for a physically smaller model that stock ``transformers`` loads.

Scores, from the calibration tokens, one decoder layer at a time (each layer sees the outputs of
the layers before it, already reduced):

* ``reap`` (default; Lasby et al. 2025, REAP): the mean over the tokens routed to expert e of
  g_e(x)·‖f_e(x)‖₂, its routing weight times the norm of its output: what the layer's output
  loses on average when e is gone, as the router weights it.
* ``reap-sum``: the same products summed over the routed tokens instead (REAP times the
  routed-token count; the REAP authors' ``weighted_ean_sum``): what the layer's output loses
  over the whole calibration text, so a rarely chosen expert counts for little.
* ``frequency``: how many tokens are routed to e.
* ``random``: a seeded random order (the baseline).

The experts with the lowest scores go: their slices of the fused expert weights, the router's
rows (and any per-expert router bias), and the config's expert count is rewritten. The router
then chooses among the experts left, with its top-k unchanged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from llmprune.engine.capture import capture_layer_calls
from llmprune.engine.config import PruneConfig
from llmprune.engine.driver import auto_batch_size, prune, resolve_device, run_batches, widest_width
from llmprune.engine.experts import expert_containers, layout_of, unfused
from llmprune.engine.model import check_finite, find_decoder_layers, routers
from llmprune.errors import LlmpruneError
from llmprune.progress import Cancel, Event, Progress, check_cancel
from llmprune.structured.run import StructuredConfig, StructuredReport
from llmprune.structured.shrink import Plan

log = logging.getLogger(__name__)

COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # the config's expert count


def _config_count(config: Any) -> tuple[str, int] | None:
    for key in COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return key, value
    return None


def plan_removal(model: nn.Module, ratio: float) -> tuple[int, int]:
    """(experts per MoE layer, experts to remove from each), or a clear error before any work."""
    _, layers = find_decoder_layers(model)
    counts = {layout.experts for layer in layers for module in expert_containers(layer).values()
              if (layout := layout_of(module)) is not None}
    name = type(model).__name__
    if not counts:
        raise LlmpruneError(f"pattern experts removes experts of mixture-of-experts layers; {name} has none "
                            "(use heads, channels, structured or layers)")
    if len(counts) > 1:
        raise LlmpruneError(f"{name}'s MoE layers hold different expert counts {sorted(counts)}; removing the same "
                            "number from each needs one count")
    experts = counts.pop()
    remove = math.floor(ratio * experts + 0.5)  # to the nearest count, halves up
    config = getattr(model, "config", None)
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    if remove == 0:
        raise LlmpruneError(f"sparsity {ratio:g} removes no expert of {experts}; at least {0.5 / experts:.3g} "
                            "removes one")
    if remove >= experts:
        raise LlmpruneError(f"sparsity {ratio:g} removes all {experts} experts of every MoE layer")
    if experts - remove < top_k:
        raise LlmpruneError(f"sparsity {ratio:g} leaves {experts - remove} experts per layer, fewer than the "
                            f"{top_k} each token is routed to (num_experts_per_tok); at most {experts - top_k} "
                            f"of {experts} can go")
    groups, chosen_groups = (int(getattr(config, key, 1) or 1) for key in ("n_group", "topk_group"))
    if groups > 1:  # group-limited routing (DeepSeek-V3): every group must lose the same number
        left = (experts - remove) // groups
        if remove % groups:
            raise LlmpruneError(f"the router picks experts in {groups} groups of {experts // groups} (n_group): "
                                f"the count removed must be a multiple of {groups}, got {remove}")
        if left < 2 or chosen_groups * left < top_k:
            raise LlmpruneError(f"{left} experts left per router group is too few: each group's score is its "
                                f"top two, and {chosen_groups} groups (topk_group) must hold {top_k} experts")
    if config is None or _config_count(config) is None:
        raise LlmpruneError(f"{name}'s config names no expert count ({', '.join(COUNT_KEYS)}) to rewrite")
    return experts, remove


class _Tally:
    """Per container, per expert: routed tokens and the sum of routing weight × output norm."""

    def __init__(self, experts: int) -> None:
        self.experts = experts
        self.weighted: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor] = {}

    def observe(self, container: str, expert: int, weights: torch.Tensor, outputs: torch.Tensor) -> None:
        for table in (self.weighted, self.tokens):
            table.setdefault(container, torch.zeros(self.experts, dtype=torch.float64))
        self.weighted[container][expert] += float((weights.float() * outputs.float().norm(dim=-1)).sum())
        self.tokens[container][expert] += weights.numel()

    def scores(self, container: str, kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, routed tokens) of one container's experts; low scores go first."""
        tokens = self.tokens.get(container, torch.zeros(self.experts, dtype=torch.float64))
        if kind in ("reap", "reap-sum"):
            weighted = self.weighted.get(container, torch.zeros(self.experts, dtype=torch.float64))
            return (weighted / tokens.clamp_min(1) if kind == "reap" else weighted.clone()), tokens
        if kind == "frequency":
            return tokens.clone(), tokens
        return torch.rand(self.experts, generator=generator, dtype=torch.float64), tokens


def _slice(module: nn.Module, keep: torch.Tensor, experts: int) -> None:
    """Keep rows ``keep`` of every parameter and buffer of ``module`` (not its children) with
    one row per expert, and its expert count attributes."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.shape[0] == experts:
            module.register_parameter(name, nn.Parameter(param.detach()[keep].clone(),
                                                         requires_grad=param.requires_grad))
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer is not None and buffer.ndim and buffer.shape[0] == experts:
            setattr(module, name, buffer[keep].clone())
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(module, key, None) == experts:
            setattr(module, key, len(keep))


def _lowest(scores: torch.Tensor, count: int, groups: int) -> list[int]:
    """The ``count`` lowest-scoring experts (ties by index, so runs repeat), the same number
    from each of ``groups`` contiguous router groups."""
    size = len(scores) // groups
    gone: list[int] = []
    for group in range(groups):
        members = range(group * size, (group + 1) * size)
        gone += sorted(members, key=lambda e: (float(scores[e]), e))[: count // groups]
    return sorted(gone)


def _check_sliced(block: nn.Module, experts: int, where: str) -> None:
    """After slicing: no tensor of the MoE block may still hold one row per removed-from expert
    count (it would crash the next forward or save an inconsistent checkpoint)."""
    for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
        if tensor is None or not tensor.ndim or "shared_expert" in name:
            continue
        if tensor.shape[0] == experts or tuple(tensor.shape) == (1, experts):
            raise LlmpruneError(f"{where}.{name} still has {experts} rows after expert removal: this MoE "
                                "layout keeps per-expert tensors llmprune does not know to slice")


@torch.no_grad()
def remove_experts(model: nn.Module, config: StructuredConfig, calibration: torch.Tensor, *,
                   device: str | torch.device | None = None, batch_size: int | None = None,
                   progress: Progress | None = None, cancel: Cancel | None = None
                   ) -> tuple[nn.Module, StructuredReport]:
    """Remove ``round(config.sparsity × E)`` experts from every MoE layer of ``model`` (in place;
    returned as :func:`~llmprune.structured.run.prune_structured` returns its smaller model), by
    ``config.score``. Progress: stage "prune", in layers; ``cancel`` polled between layers."""
    start = time.perf_counter()
    experts, remove = plan_removal(model, config.amount)
    layers_path, layers = find_decoder_layers(model)
    check_finite(model)
    run_device = resolve_device(device)
    model.eval()
    layer_params = sum(p.numel() for p in layers.parameters())
    report = StructuredReport(config, Plan(list(range(len(layers)))), layers_before=len(layers),
                              layers_after=len(layers), params_before=sum(p.numel() for p in model.parameters()),
                              layer_params_before=layer_params, experts_before=experts,
                              experts_after=experts - remove)
    widest = max(widest_width(layer) for layer in layers)
    size = batch_size or auto_batch_size(calibration.shape[0], calibration.shape[1], widest, run_device)
    inputs, calls = capture_layer_calls(model, layers, list(calibration.split(size)))
    hidden: Sequence[torch.Tensor] = inputs
    generator = torch.Generator().manual_seed(0)
    if progress is not None:
        progress(Event("prune", 0, len(layers), "layers"))
    for index, layer in enumerate(layers):
        check_cancel(cancel, f"after {index} of {len(layers)} decoder layers")
        home = next(layer.parameters()).device
        layer.to(run_device)
        containers = expert_containers(layer)
        if containers and remove:
            tally = _Tally(experts)
            with unfused(layer, observe=tally.observe):
                run_batches(layer, hidden, calls[index], run_device, [])
            for name, module in containers.items():
                value, tokens = tally.scores(name, config.score, generator)
                gone = _lowest(value, remove, int(getattr(model.config, "n_group", 1) or 1))
                keep = torch.tensor([e for e in range(experts) if e not in gone], device=run_device)
                parent = name.rpartition(".")[0]
                beside = [r for n, r in routers(layer).items() if n.rpartition(".")[0] == parent
                          and any(p.shape[0] == experts for p in r.parameters(recurse=False))]
                if len(beside) != 1:  # a shared expert's 1-row gate has no expert rows and is not counted
                    raise LlmpruneError(f"{layers_path}.{index}.{name}: found {len(beside)} routers with one row "
                                        "per expert beside it; expert removal needs exactly one")
                for target in (module, *beside):
                    _slice(target, keep, experts)
                _check_sliced(layer.get_submodule(parent) if parent else layer, experts,
                              f"{layers_path}.{index}.{parent}")
                report.errors.append({"layer": index, "container": f"{layers_path}.{index}.{name}",
                                      "removed_experts": gone, "scores": [float(v) for v in value],
                                      "tokens": [int(t) for t in tokens]})
        hidden = run_batches(layer, hidden, calls[index], run_device, [])
        layer.to(home)
        if progress is not None:
            progress(Event("prune", index + 1, len(layers), "layers"))
    if remove:
        key_count = _config_count(model.config)
        assert key_count is not None
        setattr(model.config, key_count[0], experts - remove)
        for owner in (model, getattr(model, "model", None)):  # e.g. the load-balancing loss's count
            if owner is not None and getattr(owner, "num_experts", None) == experts:
                setattr(owner, "num_experts", experts - remove)  # noqa: B010  (an nn.Module attribute mypy cannot see)
    if config.then_sparsity:
        sparse = prune(model, PruneConfig(sparsity=config.then_sparsity), calibration, device=run_device,
                       batch_size=batch_size, progress=progress, cancel=cancel)
        report.then = {"method": sparse.config.method, "sparsity_target": config.then_sparsity,
                       "sparsity_achieved": sparse.sparsity, "seconds": sparse.seconds}
    report.params_after = sum(p.numel() for p in model.parameters())
    report.layer_params_after = sum(p.numel() for p in layers.parameters())
    report.seconds = time.perf_counter() - start
    log.info("removed %d of %d experts per MoE layer (%s)", remove, experts, config.score)
    return model, report
