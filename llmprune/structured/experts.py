"""Expert removal: the same number of whole experts dropped from every mixture-of-experts layer,
for a physically smaller model that stock ``transformers`` loads.

Scores, from the calibration tokens, one decoder layer at a time (each layer sees the outputs of
the layers before it, already reduced):

* ``reap`` (default; Lasby et al. 2025, REAP): the mean over the tokens routed to expert e of
  g_e(x)·‖f_e(x)‖₂, its routing weight times the norm of its output: what the layer's output
  loses on average when e is gone, as the router weights it.
* ``frequency``: how many tokens are routed to e.
* ``random``: a seeded random order (the baseline).

The experts with the lowest scores go: their slices of the fused expert weights, the router's
rows (and any per-expert router bias), and the config's expert count is rewritten. The router
then chooses among the experts left, with its top-k unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from llmprune.engine.capture import capture_layer_calls
from llmprune.engine.config import PruneConfig
from llmprune.engine.driver import auto_batch_size, prune, resolve_device, run_batches
from llmprune.engine.experts import expert_containers, layout_of, unfused
from llmprune.engine.model import check_finite, find_decoder_layers, find_linears, get_weight, routers
from llmprune.errors import LlmpruneError
from llmprune.progress import Cancel, Event, Progress, check_cancel
from llmprune.structured.run import StructuredConfig, StructuredReport
from llmprune.structured.scores import EXPERT_SCORES
from llmprune.structured.shrink import Plan

log = logging.getLogger(__name__)

__all__ = ["EXPERT_SCORES", "plan_removal", "remove_experts"]
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
    remove = round(ratio * experts)
    config = getattr(model, "config", None)
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    if remove >= experts:
        raise LlmpruneError(f"sparsity {ratio:g} removes all {experts} experts of every MoE layer")
    if experts - remove < top_k:
        raise LlmpruneError(f"sparsity {ratio:g} leaves {experts - remove} experts per layer, fewer than the "
                            f"{top_k} each token is routed to (num_experts_per_tok); at most "
                            f"{(experts - top_k) / experts:.3g}")
    groups = int(getattr(config, "n_group", 1) or 1)
    if groups > 1 and (experts - remove) % groups:
        raise LlmpruneError(f"the router picks experts in {groups} groups (n_group); {experts - remove} experts "
                            f"left do not divide into them")
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
        if kind == "reap":
            weighted = self.weighted.get(container, torch.zeros(self.experts, dtype=torch.float64))
            return weighted / tokens.clamp_min(1), tokens
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
    widest = max(max(get_weight(lin).shape) for lin in find_linears(layers[0]).values())
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
                # Lowest score first; ties (e.g. experts no token reached) by index, so runs repeat.
                order = sorted(range(experts), key=lambda e: (float(value[e]), e))
                gone = sorted(order[:remove])
                keep = torch.tensor([e for e in range(experts) if e not in gone], device=run_device)
                parent = name.rpartition(".")[0]
                beside = [r for n, r in routers(layer).items() if n.rpartition(".")[0] == parent]
                for module_ in (module, *beside):  # a shared expert's 1-row gate has no expert rows
                    _slice(module_, keep, experts)
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
