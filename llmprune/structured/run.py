"""Structured pruning, one decoder layer at a time: attention heads, MLP channels, a solver-chosen
mix of both (``structured``, by parameters removed), or whole decoder layers.

For each layer, in one lockstep pass (see driver.visit_layer): when every calibration batch has
reached o_proj, its input statistics are complete; the heads to drop are chosen there and o_proj's
columns for them are zeroed (OBS: and the other columns re-fitted), so the MLP then sees the
pruned attention output; the same happens at down_proj for MLP channels. Zeroed columns give the
same outputs as the physically smaller model, which :func:`shrink` builds at the end.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from llmprune.core.stats import MEAN_VAR
from llmprune.engine.capture import capture_layer_calls
from llmprune.engine.driver import (
    StatSet,
    auto_batch_size,
    fits_lockstep,
    resolve_device,
    run_batches,
    visit_layer,
)
from llmprune.engine.gradients import LossGradients, loss_gradients
from llmprune.engine.model import (
    check_finite,
    eager_attention_width,
    find_decoder_layers,
    find_linears,
    get_weight,
    set_weight,
)
from llmprune.errors import LlmpruneError
from llmprune.methods.base import HESSIAN
from llmprune.progress import Cancel, Event, Progress, Steps, check_cancel
from llmprune.structured.anatomy import LayerAnatomy, Widths, inspect_layer, widths_of
from llmprune.structured.bridge import bridge
from llmprune.structured.obs import Removal, greedy_remove, greedy_remove_columns
from llmprune.structured.scores import EXPERT_SCORES, GRADIENT_SCORES, SCORES, STATS_OF, Unit, unit_scores
from llmprune.structured.shrink import Plan, shrink

log = logging.getLogger(__name__)

STRUCTURES = ("heads", "channels", "structured", "layers", "experts")


@dataclass(frozen=True)
class StructuredConfig:
    """* ``pattern``: ``heads`` (attention heads), ``channels`` (MLP channels), ``structured``
      (both, the split chosen by the OBS error to remove ``params`` of the decoder-layer
      parameters) or ``layers`` (whole decoder layers, by ShortGPT's block influence).
    * ``sparsity``: fraction of heads / channels / layers to remove (rounded to what the
      architecture allows; the report says what was removed).
    * ``params``: for ``structured``, the fraction of decoder-layer parameters to remove.
    * ``score``: ``obs`` (default: OBS selection with weight update), ``magnitude``,
      ``wanda-sp``, ``flap`` (with bias compensation where the model has or can take a bias),
      ``taylor`` ((Σ w·g)² over the unit), ``obd`` (Σ ½·F·w² over the unit), both from gradients of
      the calibration loss on the dense model.
    * ``split``: for ``structured``, fix the (head units, MLP channels) removed per layer instead
      of allocating them (see :func:`allocate`, which returns it).
    * ``kv``: with grouped-query attention, ``query`` removes the same number of query heads
      from every KV group; ``groups`` removes whole KV groups (their query heads and K/V head).
    * ``drop_layers``: for ``structured``, drop this many whole decoder layers (lowest block
      influence on the dense model) and remove the rest of ``params`` as heads and channels of
      the layers kept. Depth buys more decode speed per parameter than width (each layer also
      costs fixed per-token work), at a price in quality; 0 (default) is width only.
    * ``bridge``: with ``drop_layers`` and the ``obs`` score, refit the down_proj of the last
      kept layer before each run of dropped layers to carry the best linear part of what they
      added (see :mod:`llmprune.structured.bridge`). The one-shot scores are left without it,
      as published.
    """

    pattern: str = "heads"
    sparsity: float | None = None
    params: float | None = None
    score: str = "obs"
    kv: Literal["query", "groups"] = "query"
    damp: float = 0.01
    sequential: bool = True
    split: tuple[int, int] | None = None  # structured: (head units, channels) per layer, skips allocation
    drop_layers: int = 0
    bridge: bool = True
    then_sparsity: float | None = None

    def __post_init__(self) -> None:
        if self.pattern not in STRUCTURES:
            raise LlmpruneError(f"unknown structure {self.pattern!r}; use one of {', '.join(STRUCTURES)}")
        if self.then_sparsity is not None and (self.pattern != "experts" or not (
                isinstance(self.then_sparsity, (int, float)) and 0 < self.then_sparsity < 1)):
            raise LlmpruneError("then_sparsity (--then-sparsity) takes a fraction in (0, 1) and applies to pattern "
                                f"experts; got {self.then_sparsity!r} with pattern {self.pattern}")
        if self.pattern == "experts":
            if self.score == "obs":  # the structured default: experts' own is REAP
                object.__setattr__(self, "score", "reap")
            if self.score not in EXPERT_SCORES:
                raise LlmpruneError(f"expert removal scores experts by {', '.join(EXPERT_SCORES)}; got {self.score!r}")
        elif self.score not in SCORES:
            raise LlmpruneError(f"unknown structured score {self.score!r}; use one of {', '.join(SCORES)}")
        if self.kv not in ("query", "groups"):
            raise LlmpruneError(f"kv must be 'query' or 'groups', got {self.kv!r}")
        amount = self.params if self.pattern == "structured" else self.sparsity
        what = "params" if self.pattern == "structured" else "sparsity"
        if amount is None:
            raise LlmpruneError(f"pattern {self.pattern} needs {what} (--{what}), a fraction in [0, 1)")
        if not (math.isfinite(amount) and 0 <= amount < 1):
            raise LlmpruneError(f"{what} must be in [0, 1), got {amount}")
        if self.pattern == "layers" and self.score != "obs":
            raise LlmpruneError("layer removal ranks layers by block influence; it takes no score (--method)")
        if isinstance(self.drop_layers, bool) or not isinstance(self.drop_layers, int) or self.drop_layers < 0:
            raise LlmpruneError(f"drop_layers must be a whole number >= 0, got {self.drop_layers!r}")
        if self.drop_layers and self.pattern != "structured":
            raise LlmpruneError("drop_layers (--drop-layers) applies to pattern structured (pattern layers drops "
                                "layers alone)")
        if not (math.isfinite(self.damp) and self.damp > 0):
            raise LlmpruneError(f"damp must be positive, got {self.damp}")

    @property
    def amount(self) -> float:
        value = self.params if self.pattern == "structured" else self.sparsity
        assert value is not None
        return value


@dataclass
class StructuredReport:
    config: StructuredConfig
    plan: Plan
    heads_before: int = 0
    heads_after: int = 0
    kv_heads_after: int = 0
    intermediate_before: int | None = None
    intermediate_after: int | None = None
    layers_before: int = 0
    layers_after: int = 0
    params_before: int = 0
    params_after: int = 0
    layer_params_before: int = 0
    layer_params_after: int = 0
    experts_before: int | None = None  # per MoE layer (pattern experts)
    experts_after: int | None = None
    then: dict[str, Any] | None = None  # then_sparsity: the unstructured pass's target and achieved sparsity
    errors: list[dict[str, Any]] = field(default_factory=list)  # per layer: OBS error, removed units
    bias_compensation: bool = False
    seconds: float = 0.0

    @property
    def layer_params_removed(self) -> float:
        return 1 - self.layer_params_after / self.layer_params_before if self.layer_params_before else 0.0


def _layer_params(layers: nn.ModuleList) -> int:
    return sum(p.numel() for p in layers.parameters())


# --- how much to remove -------------------------------------------------------------------------


def nearest(x: float) -> int:
    """Round half up (Python's round() goes to even: 0.5 -> 0 would silently remove nothing)."""
    return math.floor(x + 0.5)


def head_count(widths: Widths, fraction: float, kv: str) -> int:
    """Units to remove: query heads per KV group (``query``) or KV groups (``groups``)."""
    if kv == "groups":
        count, total, unit = nearest(fraction * widths.kv_heads), widths.kv_heads, "KV groups"
    else:
        count, total, unit = nearest(fraction * widths.group_size), widths.group_size, "query heads per KV group"
    if count >= total:
        raise LlmpruneError(f"removing {fraction:.0%} of heads would leave no heads ({count} of {total} {unit})")
    return count


def width_share(config: StructuredConfig, n_layers: int) -> float:
    """The share of each kept layer's parameters that heads and channels must remove so that,
    with ``drop_layers`` whole layers gone, ``params`` of the decoder-layer parameters go."""
    drop = config.drop_layers
    if not drop:
        return config.amount
    if drop >= n_layers:
        raise LlmpruneError(f"dropping {drop} of {n_layers} decoder layers would leave none")
    share = (config.amount * n_layers - drop) / (n_layers - drop)
    if abs(share) < 1e-3:  # params ≈ drop / n_layers as typed (0.2333 for 7 of 30): depth only
        return 0.0
    if share < 0:
        raise LlmpruneError(f"dropping {drop} of {n_layers} decoder layers removes {drop / n_layers:.1%} of the "
                            f"decoder-layer parameters, more than params {config.amount:.0%} (--params)")
    return share


def layers_to_drop(config: StructuredConfig, layers: nn.ModuleList, hidden: list[torch.Tensor],
                   calls: list[list[Any]], device: torch.device,
                   cancel: Cancel | None, progress: Progress | None = None) -> tuple[set[int], list[float]]:
    """``drop_layers`` layers of least block influence on the dense model, and every layer's influence."""
    if not config.drop_layers:
        return set(), []
    influence = block_influence(layers, hidden, calls, device, progress, cancel)
    order = sorted(range(len(layers)), key=lambda i: (influence[i], i))
    return set(order[:config.drop_layers]), influence


def unit_params(widths: Widths, anatomy: LayerAnatomy, kv: str) -> tuple[int, int]:
    """(parameters of one head unit, of one MLP channel) in a decoder layer."""
    d, h = widths.head_dim, widths.hidden
    head = 2 * d * h  # q rows + o columns
    if kv == "groups":
        head = widths.group_size * head + 2 * d * h  # its query heads + its K and V head
    return head, 3 * h


# --- units ------------------------------------------------------------------------------------


def head_units(anatomy: LayerAnatomy, kv: str) -> list[Unit]:
    w = anatomy.widths
    d = w.head_dim

    def rows(blocks: list[Any], index: int) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for b in blocks:
            out.setdefault(b.name, []).extend(range(b.offset + index * d, b.offset + (index + 1) * d))
        return out

    if kv == "groups":
        units = []
        for g in range(w.kv_heads):
            heads = range(g * w.group_size, (g + 1) * w.group_size)
            unit_rows: dict[str, list[int]] = {}
            for h in heads:
                for name, r in rows(anatomy.q_rows, h).items():
                    unit_rows.setdefault(name, []).extend(r)
            for name, r in rows(anatomy.kv_rows, g).items():
                unit_rows.setdefault(name, []).extend(r)
            units.append(Unit(unit_rows, [c for h in heads for c in range(h * d, (h + 1) * d)]))
        return units
    return [Unit(rows(anatomy.q_rows, h), list(range(h * d, (h + 1) * d))) for h in range(w.heads)]


def channel_units(anatomy: LayerAnatomy) -> list[Unit]:
    assert anatomy.widths.intermediate is not None
    return [Unit({b.name: [b.offset + j] for b in anatomy.channel_rows}, [j])
            for j in range(anatomy.widths.intermediate)]


def _partition(anatomy: LayerAnatomy, kv: str) -> list[list[int]] | None:
    w = anatomy.widths
    if kv == "groups":
        return None
    return [list(range(g * w.group_size, (g + 1) * w.group_size)) for g in range(w.kv_heads)]


def _lowest_units(scores: torch.Tensor, count: int, partition: list[list[int]] | None) -> list[int]:
    """The ``count`` lowest-scoring units, the same number from every part of ``partition``."""
    if partition is None:
        return sorted(scores.argsort(stable=True)[:count].tolist())
    chosen: list[int] = []
    for part in partition:
        order = scores[part].argsort(stable=True)[: count // len(partition)].tolist()
        chosen.extend(part[i] for i in order)
    return sorted(chosen)


# --- per-layer choice -----------------------------------------------------------------------------


class _LayerPruner:
    """Handles o_proj and down_proj of one layer as their statistics become complete."""

    def __init__(self, layer: nn.Module, anatomy: LayerAnatomy, config: StructuredConfig,
                 heads: int, channels: int, grads: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
                 compensate: set[str]) -> None:
        self.layer, self.anatomy, self.config = layer, anatomy, config
        self.linears = find_linears(layer)
        self.heads, self.channels, self.grads, self.compensate = heads, channels, grads, compensate
        self.removed_heads: list[int] = []
        self.removed_channels: list[int] = []
        self.info: dict[str, Any] = {}

    def __call__(self, name: str, stats: StatSet) -> None:
        if name == self.anatomy.o and self.heads:
            units = head_units(self.anatomy, self.config.kv)
            count = self.heads * (self.anatomy.widths.kv_heads if self.config.kv == "query" else 1)
            self.removed_heads = self._remove(name, stats, units, count, _partition(self.anatomy, self.config.kv))
        elif name == self.anatomy.down and self.channels:
            self.removed_channels = self._remove(name, stats, channel_units(self.anatomy), self.channels, None)

    def _remove(self, name: str, stats: StatSet, units: list[Unit], count: int,
                partition: list[list[int]] | None) -> list[int]:
        linear = self.linears[name]
        W = get_weight(linear).detach().float()
        raw = stats.raw()
        if self.config.score == "obs":
            groups = [u.columns for u in units]
            if len(groups[0]) == 1:
                result: Removal = greedy_remove_columns(W, raw[HESSIAN], count, self.config.damp)
            else:
                result = greedy_remove(W, raw[HESSIAN], groups, count, self.config.damp, partition)
            set_weight(linear, result.weight)
            self.info[f"{name}.obs_error"] = result.errors[-1] if result.errors else 0.0
            return sorted(result.removed)
        weights = {n: get_weight(m).detach().float() for n, m in self.linears.items()}
        removed = _lowest_units(unit_scores(self.config.score, units, weights, name, raw, self.grads), count,
                                partition)
        columns = torch.tensor([c for u in removed for c in units[u].columns])
        if self.config.score == "flap" and name in self.compensate:
            # The removed inputs' average contribution becomes a constant output bias.
            shift = W[:, columns] @ raw[MEAN_VAR][0][columns]
            bias = getattr(linear, "bias", None)
            if bias is None:
                linear.bias = nn.Parameter(shift.to(W.dtype).to(get_weight(linear).dtype), requires_grad=False)
            else:
                bias.data += shift.to(bias.dtype)
        W[:, columns] = 0.0
        set_weight(linear, W)
        return removed


# --- the loop ------------------------------------------------------------------------------------


def block_influence(layers: nn.ModuleList, hidden: list[torch.Tensor], calls: list[list[Any]],
                    device: torch.device, progress: Progress | None = None,
                    cancel: Cancel | None = None) -> list[float]:
    """ShortGPT's BI_i = 1 − E_tokens[cos(h_in, h_out)] of each layer on the dense model
    (progress: stage "influence", in layers)."""
    scores = []
    steps = Steps(progress, cancel, "influence", len(layers), "layers")
    steps(0)
    for index, layer in enumerate(layers):
        home = next(layer.parameters()).device
        layer.to(device)
        outputs = list(run_batches(layer, hidden, calls[index], device, []))
        layer.to(home)
        sims = [nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).flatten()
                for a, b in zip(hidden, outputs, strict=True)]
        scores.append(1.0 - float(torch.cat(sims).mean()))
        hidden = outputs
        steps(len(scores))
    return scores


def _can_take_bias(model: nn.Module, linear: nn.Module, flag: str) -> bool:
    if getattr(linear, "bias", None) is not None:
        return True
    text = getattr(model.config, "text_config", None) or model.config
    return hasattr(text, flag)


@torch.no_grad()
def prune_structured(
    model: nn.Module, config: StructuredConfig, calibration: torch.Tensor, *,
    device: str | torch.device | None = None, batch_size: int | None = None,
    progress: Progress | None = None, cancel: Cancel | None = None,
    gradients: LossGradients | None = None,
) -> tuple[nn.Module, StructuredReport]:
    """Prune ``model`` structurally; returns a new, physically smaller model (stock transformers
    classes, rewritten config) and the report. ``model`` itself is changed (zeroed columns) and
    should be dropped afterwards: the new model shares its unsliced tensors (embeddings, norms,
    the head), so changing either in place changes both. ``gradients``: for ``taylor`` and ``obd``, the
    output of :func:`~llmprune.engine.gradients.loss_gradients` on this model, if already computed.
    ``progress`` is given :class:`~llmprune.progress.Event` s of each phase ("gradients" sequences, "influence" and
    "allocate" layers where the pattern needs them, then "prune" layers); ``cancel`` is polled
    at every step of each."""
    if config.pattern == "experts":
        raise LlmpruneError("pattern experts is llmprune.structured.experts.remove_experts (same arguments)")
    start = time.perf_counter()
    if calibration.ndim != 2:
        raise LlmpruneError("calibration must be a (nsamples, seqlen) tensor of token ids")
    layers_path, layers = find_decoder_layers(model)
    check_finite(model)
    run_device = resolve_device(device)
    model.eval()
    widths = widths_of(model.config)
    pattern = config.pattern
    need_attention = pattern in ("heads", "structured")
    need_mlp = pattern in ("channels", "structured")
    anatomy = inspect_layer(layers[0], widths, need_attention, need_mlp)
    for layer in layers[1:]:
        if inspect_layer(layer, widths, need_attention, need_mlp) != anatomy:
            raise LlmpruneError("decoder layers differ in layout; uniform structured pruning needs identical layers")
    report = StructuredReport(config, Plan(list(range(len(layers)))), heads_before=widths.heads,
                              intermediate_before=widths.intermediate, layers_before=len(layers),
                              params_before=sum(p.numel() for p in model.parameters()),
                              layer_params_before=_layer_params(layers))

    widest = max(max(get_weight(lin).shape) for lin in find_linears(layers[0]).values())
    size = batch_size or auto_batch_size(calibration.shape[0], calibration.shape[1], widest, run_device)
    alive = max(widest, eager_attention_width(model, calibration.shape[1]))
    lockstep = config.sequential and fits_lockstep(calibration.shape[0], calibration.shape[1], alive,
                                                   device=run_device)

    share = width_share(config, len(layers)) if pattern == "structured" else config.amount
    grads = gradients
    if config.score in GRADIENT_SCORES and grads is None:
        grads = loss_gradients(model, calibration, run_device, progress=progress, cancel=cancel)
        model.eval()
    hidden, calls = capture_layer_calls(model, layers, list(calibration.split(size)))

    if pattern == "layers":
        drop = nearest(config.amount * len(layers))
        if drop >= len(layers):
            raise LlmpruneError(f"removing {config.amount:.0%} of {len(layers)} layers would leave none")
        influence = block_influence(layers, hidden, calls, run_device, progress, cancel)
        order = sorted(range(len(layers)), key=lambda i: (influence[i], i))
        report.plan = Plan(sorted(set(range(len(layers))) - set(order[:drop])))
        report.errors = [{"layer": i, "block_influence": bi, "removed": i not in report.plan.layers}
                         for i, bi in enumerate(influence)]
    else:
        dropped, influence = layers_to_drop(config, layers, hidden, calls, run_device, cancel, progress)
        report.plan = Plan([i for i in range(len(layers)) if i not in dropped])
        heads, channels = _counts(config, widths, anatomy, layers, hidden, calls, run_device, cancel, share, dropped,
                                  progress)
        compensate = set()
        if config.score == "flap":
            for name, flag in ((anatomy.o, "attention_bias"), (anatomy.down, "mlp_bias")):
                if name and _can_take_bias(model, find_linears(layers[0])[name], flag):
                    compensate.add(name)
            if not compensate:
                log.warning("FLAP: %s cannot take output biases; pruning without bias compensation",
                            type(model).__name__)
            report.bias_compensation = bool(compensate)
        targets = {n: m for n, m in find_linears(layers[0]).items() if n in (anatomy.o, anatomy.down)}
        kinds = STATS_OF[config.score]
        for index, layer in enumerate(layers):
            check_cancel(cancel, f"after {index} of {len(layers)} decoder layers")
            if index in dropped:  # gone: the next layer's inputs are this layer's inputs
                report.errors.append({"layer": index, "block_influence": influence[index], "removed": True})
                if progress is not None:
                    progress(Event("prune", index + 1, len(layers), "layers"))
                continue
            home = next(layer.parameters()).device
            layer.to(run_device)
            layer_grads = None
            if grads is not None:
                layer_grads = {}
                for n, m in find_linears(layer).items():
                    mean, fisher = grads.of(f"{layers_path}.{index}.{n}", m)
                    layer_grads[n] = (mean.to(run_device), fisher.to(run_device))
            pruner = _LayerPruner(layer, anatomy, config, heads, channels, layer_grads, compensate)
            layer_targets = {n: m for n, m in find_linears(layer).items() if n in targets}
            inputs = hidden
            hidden = list(visit_layer(layer, hidden, calls[index], layer_targets, kinds, pruner,
                                      config.sequential, run_device, lockstep))
            after = _run_after(index, dropped, len(layers))
            explained = None
            if after and config.bridge and config.score == "obs":
                assert widths.intermediate is not None
                removed = set(pruner.removed_channels)
                kept = [j for j in range(widths.intermediate) if j not in removed]
                hidden, explained = bridge(layer, find_linears(layer)[anatomy.down], inputs, hidden, calls[index],
                                           [(layers[j], calls[j]) for j in after], kept, config.damp, run_device)
            del inputs
            layer.to(home)
            _record(report, index, pruner, widths, config.kv)
            if explained is not None:
                report.errors[-1].update(bridged_layers=after, bridge_explained=explained)
            if influence:
                report.errors[-1]["block_influence"] = influence[index]
            if progress is not None:
                progress(Event("prune", index + 1, len(layers), "layers"))

    pruned = shrink(model, report.plan, anatomy)
    new_layers = find_decoder_layers(pruned)[1]
    new_widths = widths_of(pruned.config)
    report.heads_after, report.kv_heads_after = new_widths.heads, new_widths.kv_heads
    report.intermediate_after, report.layers_after = new_widths.intermediate, len(new_layers)
    report.params_after = sum(p.numel() for p in pruned.parameters())
    report.layer_params_after = _layer_params(new_layers)
    report.seconds = time.perf_counter() - start
    return pruned, report


def _run_after(index: int, dropped: set[int], n_layers: int) -> list[int]:
    """The dropped layers right after layer ``index``, up to the next kept one."""
    run = []
    for j in range(index + 1, n_layers):
        if j not in dropped:
            break
        run.append(j)
    return run


def _record(report: StructuredReport, index: int, pruner: _LayerPruner, widths: Widths, kv: str) -> None:
    plan = report.plan
    if pruner.removed_heads or pruner.heads:
        if kv == "groups":
            kept_groups = [g for g in range(widths.kv_heads) if g not in pruner.removed_heads]
            plan.kv_heads[index] = kept_groups
            size = widths.group_size
            plan.heads[index] = [h for g in kept_groups for h in range(g * size, (g + 1) * size)]
        else:
            plan.heads[index] = [h for h in range(widths.heads) if h not in pruner.removed_heads]
    if pruner.channels:
        assert widths.intermediate is not None
        plan.channels[index] = [j for j in range(widths.intermediate) if j not in set(pruner.removed_channels)]
    report.errors.append({"layer": index, "removed_heads": pruner.removed_heads,
                          "removed_channels": len(pruner.removed_channels), **pruner.info})


def _counts(config: StructuredConfig, widths: Widths, anatomy: LayerAnatomy, layers: nn.ModuleList,
            hidden: list[torch.Tensor], calls: list[list[Any]], device: torch.device,
            cancel: Cancel | None, share: float, dropped: set[int],
            progress: Progress | None = None) -> tuple[int, int]:
    """(head units to remove per layer, channels to remove per layer); for ``structured``,
    ``share`` of every layer not in ``dropped``."""
    if config.pattern == "heads":
        return head_count(widths, config.amount, config.kv), 0
    assert widths.intermediate is not None
    if config.split is not None:
        return config.split
    if config.pattern == "channels":
        channels = nearest(config.amount * widths.intermediate)
        if channels >= widths.intermediate:
            raise LlmpruneError(f"removing {config.amount:.0%} of MLP channels would leave none")
        return 0, channels
    return allocate(config, widths, anatomy, layers, hidden, calls, device, cancel, share, dropped, progress)


def allocate(config: StructuredConfig, widths: Widths, anatomy: LayerAnatomy, layers: nn.ModuleList,
             hidden: list[torch.Tensor], calls: list[list[Any]], device: torch.device,
             cancel: Cancel | None, share: float | None = None,
             dropped: set[int] | None = None, progress: Progress | None = None) -> tuple[int, int]:
    """Split ``share`` (default ``params``) of every layer's parameters between heads and
    channels: a pass over the dense layers (those in ``dropped`` skipped, as they will be)
    collects the OBS error of removing 0, 1, ... head units and channels per layer; the
    feasible split with the least total error wins. Errors of o_proj and down_proj are in the
    same units (both write the residual stream), so they add up. Progress: stage "allocate",
    in layers."""
    assert widths.intermediate is not None
    share = config.amount if share is None else share
    dropped = dropped or set()
    head_p, channel_p = unit_params(widths, anatomy, config.kv)
    per_group = widths.kv_heads if config.kv == "query" else 1  # heads removed per head unit count
    target = share * _layer_params(layers) / len(layers)
    max_heads = (widths.kv_heads if config.kv == "groups" else widths.group_size) - 1
    options = []
    for h in range(max_heads + 1):
        left = target - h * per_group * head_p
        if left < -head_p * per_group / 2:
            break  # these heads alone overshoot the target
        c = max(0, math.ceil(left / channel_p))
        if c < widths.intermediate:
            options.append((h, c))
    if not options:
        raise LlmpruneError(f"cannot remove {share:.0%} of each decoder layer's parameters "
                            "with heads and channels")
    if len(options) == 1 or share == 0:
        return options[0]
    head_err = [0.0] * (max_heads + 1)
    chan_curve = torch.zeros(max(c for _, c in options) + 1, dtype=torch.float64)
    collected: dict[str, torch.Tensor] = {}

    def keep(name: str, stats: StatSet) -> None:
        collected[name] = stats.raw()[HESSIAN]

    steps = Steps(progress, cancel, "allocate", len(layers), "layers")
    steps(0)
    for index, layer in enumerate(layers):
        if index in dropped:
            steps(index + 1)
            continue
        home = next(layer.parameters()).device
        layer.to(device)
        linears = find_linears(layer)
        collected.clear()
        targets = {n: m for n, m in linears.items() if n in (anatomy.o, anatomy.down)}
        outputs = list(visit_layer(layer, hidden, calls[index], targets, {HESSIAN}, keep, False, device, False,
                                    observe=True))
        layer.to(home)
        H_o, H_d = collected[anatomy.o], collected[anatomy.down]  # on the execution device
        W_o = get_weight(linears[anatomy.o]).detach().float().to(H_o.device)
        units = head_units(anatomy, config.kv)
        full = greedy_remove(W_o, H_o, [u.columns for u in units], max_heads * per_group,
                             config.damp, _partition(anatomy, config.kv))
        for h in range(1, max_heads + 1):
            head_err[h] += full.errors[h * per_group - 1]
        W_d = get_weight(linears[anatomy.down]).detach().float().to(H_d.device)
        curve = greedy_remove_columns(W_d, H_d, len(chan_curve) - 1, config.damp)
        chan_curve[1:] += torch.tensor(curve.errors, dtype=torch.float64)
        hidden = outputs
        steps(index + 1)
    best = min(options, key=lambda hc: head_err[hc[0]] + float(chan_curve[hc[1]]))
    log.info("allocation: %s head units and %s channels per layer (of %s)", best[0], best[1], options)
    return best


@torch.no_grad()
def plan_split(model: nn.Module, config: StructuredConfig, calibration: torch.Tensor,
               device: str | torch.device | None = None) -> tuple[int, int]:
    """The (head units, channels) per layer that ``structured`` pruning of ``model`` would remove;
    pass it back as ``StructuredConfig(split=...)`` to reuse it across runs (model unchanged)."""
    layers = find_decoder_layers(model)[1]
    widths = widths_of(model.config)
    anatomy = inspect_layer(layers[0], widths, True, True)
    run_device = resolve_device(device)
    widest = max(max(get_weight(lin).shape) for lin in find_linears(layers[0]).values())
    size = auto_batch_size(calibration.shape[0], calibration.shape[1], widest, run_device)
    share = width_share(config, len(layers))
    hidden, calls = capture_layer_calls(model, layers, list(calibration.split(size)))
    dropped, _ = layers_to_drop(config, layers, hidden, calls, run_device, None)
    return allocate(config, widths, anatomy, layers, hidden, calls, run_device, None, share, dropped)
