"""Per-layer sensitivity analysis (Li et al. 2016, "Pruning Filters for Efficient ConvNets",
section 3.2): prune one decoder layer (or one kind of linear, q/k/v/o/gate/up/down, in every
layer) at a time, at each ratio, with any method, and measure the whole model's perplexity on
a held-out text. The curves show which layers can take more sparsity; ``allocation
sensitivity`` (:func:`llmprune.core.allocation.sensitivity_sparsities`) turns them into
per-layer sparsities with the same mean.

Cheaper than running the model from scratch for every point: the calibration and evaluation
inputs of every decoder layer come from one dense pass, layer by layer; a point prunes layer l
from its dense calibration inputs and runs the evaluation from layer l on (layers before it are
unchanged, so their outputs are reused). Pruning kinds instead keeps each (kind, ratio)'s
pruned weights (CPU, the checkpoint's dtype: one copy of the linears per ratio) until every
layer is done, then evaluates each combination over the whole model.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from llmprune.analysis.forward import Visit, advance, nll_from
from llmprune.engine.capture import capture_layer_calls
from llmprune.engine.config import PruneConfig
from llmprune.engine.driver import Discard, auto_batch_size, prune_layer, resolve_device, widest_width
from llmprune.engine.experts import expert_containers, unfused
from llmprune.engine.gradients import LossGradients, loss_gradients
from llmprune.engine.model import check_finite, find_decoder_layers, find_linears, get_weight, set_weight
from llmprune.engine.saliency import check_gradients_possible, layer_weight_stats
from llmprune.errors import LlmpruneError
from llmprune.methods import PER_WEIGHT, get_method, pieces
from llmprune.progress import Progress, Steps

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGE = "sensitivity"


@dataclass(frozen=True)
class SensitivityConfig:
    """``method``: any unstructured method (``wanda`` default); ``ratios``: sparsities in (0, 1),
    rising; ``by``: ``layers`` (one decoder layer at a time) or ``kinds`` (one kind of linear in
    every layer at a time); ``layers``: which decoder layers (None: all; ``by`` layers only);
    ``sequential``: as :class:`~llmprune.engine.config.PruneConfig`'s, inside the pruned layer."""

    method: str = "wanda"
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    by: Literal["layers", "kinds"] = "layers"
    layers: tuple[int, ...] | None = None
    sequential: bool = True

    def __post_init__(self) -> None:
        ratios = self.ratios
        if not (isinstance(ratios, (tuple, list)) and ratios and all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and 0 < r < 1
                for r in ratios)):
            raise LlmpruneError(f"ratios must be sparsities in (0, 1), e.g. 0.3,0.5,0.7,0.9; got {ratios!r}")
        if any(b <= a for a, b in itertools.pairwise(ratios)):
            raise LlmpruneError(f"ratios must rise, each once; got {list(ratios)}")
        object.__setattr__(self, "ratios", tuple(float(r) for r in ratios))
        if self.by not in ("layers", "kinds"):
            raise LlmpruneError(f"sensitivity by 'layers' or 'kinds', got {self.by!r}")
        if self.layers is not None:
            if self.by == "kinds":
                raise LlmpruneError("layers chooses decoder layers for 'by layers'; 'by kinds' prunes every layer")
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise LlmpruneError(f"layers must be decoder layer indices, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
        for ratio in self.ratios:  # the method with each ratio: its own validation, before any work
            self.prune_config(ratio)

    def prune_config(self, ratio: float) -> PruneConfig:
        return PruneConfig(method=self.method, sparsity=ratio, sequential=self.sequential)


@dataclass
class SensitivityResult:
    """``curves``: per layer ("layer 3") or kind ("q_proj"), the perplexity at each ratio."""

    config: SensitivityConfig
    dense_ppl: float
    curves: dict[str, list[float]]
    layers: list[int] = field(default_factory=list)  # by layers: the index of each curve
    tokens: dict[str, Any] = field(default_factory=dict)  # calibration and evaluation sizes
    seconds: float = 0.0

    def cost(self, name: str) -> list[float]:
        """log(ppl / dense ppl) at each ratio: what the allocation minimises."""
        return [math.log(p / self.dense_ppl) for p in self.curves[name]]

    def ranking(self) -> list[str]:
        """Most sensitive first: by mean log-perplexity increase over the ratios."""
        return sorted(self.curves, key=lambda n: (-sum(self.cost(n)) / len(self.cost(n)), n))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "sensitivity", "config": asdict(self.config), "dense_ppl": self.dense_ppl,
                "ratios": list(self.config.ratios), "curves": self.curves, "layers": self.layers,
                "ranking": self.ranking(), "tokens": self.tokens, "seconds": self.seconds}


@torch.no_grad()
def sensitivity(model: nn.Module, config: SensitivityConfig, calibration: torch.Tensor, windows: torch.Tensor, *,
                device: str | torch.device | None = None, batch_size: int | None = None,
                progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
                gradients: LossGradients | None = None) -> SensitivityResult:
    """Measure ``config``'s curves on ``model`` (left dense at the end): ``calibration`` (n,
    seqlen) token ids for the statistics, ``windows`` (m, seqlen) held-out token ids for the
    perplexity. Progress: "gradients" (obd, taylor), then stage "sensitivity" in points."""
    start = time.perf_counter()
    layers_path, layers = find_decoder_layers(model)
    method = get_method(config.method)
    options = config.prune_config(config.ratios[0]).options()
    if options.group == "global":  # one layer pruned alone: its global group is the layer
        options = replace(options, group="layer")
    kinds = pieces.needs(method, options)
    check_gradients_possible(method, kinds, layers, streamed=False)
    chosen = list(range(len(layers))) if config.layers is None else list(config.layers)
    for index in chosen:
        if not 0 <= index < len(layers):
            raise LlmpruneError(f"layer {index} does not exist: the model has decoder layers 0 to {len(layers) - 1}")
    if config.by == "kinds" and any(expert_containers(layer) for layer in layers):
        raise LlmpruneError("sensitivity by kinds covers linear layers, and this model's experts are fused "
                            "weights: use sensitivity by layers")
    names = _kind_names(layers) if config.by == "kinds" else {}
    check_finite(model)
    run_device = resolve_device(device)
    model.eval()
    if kinds & PER_WEIGHT and gradients is None:
        gradients = loss_gradients(model, calibration, run_device, progress=progress, cancel=cancel)
        model.eval()
    size = batch_size or auto_batch_size(calibration.shape[0], calibration.shape[1],
                                         max(widest_width(layer) for layer in layers), run_device)
    cal_hidden, cal_calls = capture_layer_calls(model, layers, list(calibration.split(size)))
    eval_batches = list(windows.split(1))
    ev_hidden, ev_calls = capture_layer_calls(model, layers, eval_batches)
    tokens = windows[:, 1:].numel()

    def ppl(first: int, hidden: list[torch.Tensor]) -> float:
        return math.exp(nll_from(model, layers_path, layers, ev_calls, first, hidden, eval_batches, run_device)
                        / tokens)

    dense_ppl = ppl(0, ev_hidden)
    ev_first = ev_hidden  # the evaluation inputs of layer 0 (the walk replaces, never changes, the list)
    units = [f"layer {i}" for i in chosen] if config.by == "layers" else list(names)
    curves: dict[str, list[float]] = {unit: [] for unit in units}
    # Kinds: the pruning walk first (stage "sensitivity walk", in layers), then one point per evaluation.
    walk = Steps(progress, cancel, f"{STAGE} walk", len(layers), "layers") if config.by == "kinds" else None
    steps = Steps(progress, cancel, STAGE, len(units) * len(config.ratios), "points")
    if walk is not None:
        walk(0)
    else:
        steps(0)
    done = 0
    kept: dict[tuple[str, float], dict[str, torch.Tensor]] = {}  # by kinds: pruned weights
    for index, layer in enumerate(layers):
        if config.by == "layers" and index > max(chosen):
            break
        prefix = f"{layers_path}.{index}"
        wanted: list[tuple[str, set[str] | None]] = []
        if config.by == "layers" and index in chosen:
            wanted = [(f"layer {index}", None)]
        if config.by == "kinds":
            wanted = [(kind, {n for n in find_linears(layer) if n.rsplit(".", 1)[-1] == kind}) for kind in names]
        if wanted:
            dense = {k: v.clone() for k, v in layer.state_dict().items()}
            for unit, only in wanted:
                for ratio in config.ratios:
                    try:  # the layer is dense again afterwards, also when cancelled or failed
                        with Visit(layer, run_device) as visit, unfused(layer):  # fused experts as linears
                            weight_stats = layer_weight_stats(gradients, kinds, prefix, layer, run_device)
                            prune_layer(layer, cal_hidden, cal_calls[index], method,
                                        replace(options, sparsity=ratio), config.sequential, run_device,
                                        out=Discard(), storage=visit.storage, weight_stats=weight_stats,
                                        only=only)
                        if config.by == "layers":
                            curves[unit].append(ppl(index, ev_hidden))
                        else:
                            assert only is not None
                            linears = find_linears(layer)
                            kept.setdefault((unit, ratio), {}).update(
                                {f"{prefix}.{n}": get_weight(linears[n]).detach().clone() for n in only})
                    finally:
                        layer.load_state_dict(dense)
                    if config.by == "layers":
                        done += 1
                        steps(done)
        if index < len(layers) - 1:
            cal_hidden = advance(layer, cal_hidden, cal_calls[index], run_device)
            if config.by == "layers":  # kinds evaluate from layer 0 only
                ev_hidden = advance(layer, ev_hidden, ev_calls[index], run_device)
        if walk is not None:
            walk(index + 1)
    if config.by == "kinds":
        steps(0)
        for unit in units:
            for ratio in config.ratios:
                originals = _swap(model, kept.pop((unit, ratio)))
                try:
                    curves[unit].append(ppl(0, ev_first))
                finally:
                    _swap(model, originals)
                done += 1
                steps(done)
    return SensitivityResult(config, dense_ppl, curves, chosen if config.by == "layers" else [],
                             {"calibration": list(calibration.shape), "evaluation": list(windows.shape)},
                             time.perf_counter() - start)


def _kind_names(layers: nn.ModuleList) -> dict[str, int]:
    """The linear kinds (last name part) found in every decoder layer, in call-like order."""
    found: dict[str, int] = {}
    for layer in layers:
        for name in find_linears(layer):
            kind = name.rsplit(".", 1)[-1]
            found[kind] = found.get(kind, 0) + 1
    order = {k: i for i, k in enumerate(KINDS)}
    kinds = {k: n for k, n in found.items() if n == len(layers)}
    if not kinds:
        raise LlmpruneError("no kind of linear layer appears in every decoder layer; use sensitivity by layers")
    return dict(sorted(kinds.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def _swap(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put ``weights`` (by linear name) into ``model``; returns what they replaced."""
    originals = {}
    for name, weight in weights.items():
        linear = model.get_submodule(name)
        originals[name] = get_weight(linear).detach().clone()
        set_weight(linear, weight)
    return originals
