"""Saliency criteria ranked against an exhaustive oracle (Molchanov et al. 2016, "Pruning
Convolutional Neural Networks for Resource Efficient Inference", section 3.3).

For each chosen decoder layer and kind of structural unit (attention heads; groups of
``channel_group`` consecutive MLP channels), the oracle of a unit is the exact change in the
calibration loss (mean next-token NLL) when that unit alone is removed: its input columns of
o_proj (down_proj) zeroed, everything else dense. One forward per unit, from that layer on (the
earlier layers' outputs are reused). Each criterion scores the same units from the dense model
(higher = more important) and is compared with the oracle by Spearman's rank correlation:

* ``magnitude``: L1 norm of the unit's weights (Li et al.); ``wanda-sp``; ``flap``;
  ``taylor`` ((Σ w·g)², first-order Taylor); ``obd`` (Σ ½·F·w²): as the structured scores
  (:mod:`llmprune.structured.scores`);
* ``obs``: the structured OBS error of removing the unit's columns alone, tr(W_S [H⁻¹]_SS⁻¹ W_Sᵀ)
  (:func:`llmprune.structured.obs.group_errors`);
* ``random``: seeded uniform scores (what no criterion should be worse than).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from llmprune.analysis.forward import Visit, advance, nll_from
from llmprune.core.factor import damped_inverse
from llmprune.core.ranking import spearman
from llmprune.core.stats import MEAN_VAR
from llmprune.engine.capture import capture_layer_calls
from llmprune.engine.driver import Discard, StatSet, auto_batch_size, resolve_device, visit_layer, widest_width
from llmprune.engine.experts import expert_containers
from llmprune.engine.gradients import LossGradients, loss_gradients
from llmprune.engine.model import check_finite, find_decoder_layers, find_linears, get_weight, set_weight
from llmprune.errors import LlmpruneError
from llmprune.methods import COLUMN_NORMS, HESSIAN
from llmprune.progress import Progress, Steps, check_cancel
from llmprune.structured.anatomy import LayerAnatomy, inspect_layer, widths_of
from llmprune.structured.obs import group_errors
from llmprune.structured.run import channel_units, head_units
from llmprune.structured.scores import Unit, unit_scores

UNIT_KINDS = ("heads", "channels")
CRITERIA = ("magnitude", "wanda-sp", "flap", "taylor", "obd", "obs", "random")
STAGE = "oracle"


@dataclass(frozen=True)
class SaliencyConfig:
    """``units``: ``heads`` and/or ``channels``; ``layers``: decoder layer indices (None: the
    first, the middle and the last); ``channel_group``: MLP channels per unit; ``criteria``:
    any of :data:`CRITERIA`; ``seed``: of ``random``; ``damp``: of the OBS inverse;
    ``oracle_samples``: the oracle's loss on the first this many calibration sequences (None:
    all; the criteria always read all): each unit costs a forward over them from its layer on."""

    units: tuple[str, ...] = UNIT_KINDS
    layers: tuple[int, ...] | None = None
    channel_group: int = 64
    criteria: tuple[str, ...] = CRITERIA
    seed: int = 0
    damp: float = 0.01
    oracle_samples: int | None = None

    def __post_init__(self) -> None:
        if not self.units or any(u not in UNIT_KINDS for u in self.units) or len(set(self.units)) < len(self.units):
            raise LlmpruneError(f"units must be heads and/or channels, got {','.join(map(str, self.units))!r}")
        if not self.criteria or any(c not in CRITERIA for c in self.criteria):
            raise LlmpruneError(f"criteria must be among {', '.join(CRITERIA)}; got {', '.join(self.criteria)}")
        if self.layers is not None and (not self.layers or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers)):
            raise LlmpruneError(f"layers must be decoder layer indices, got {self.layers!r}")
        if not (isinstance(self.channel_group, int) and not isinstance(self.channel_group, bool)
                and self.channel_group > 0):
            raise LlmpruneError(f"channel_group must be a positive number of channels, got {self.channel_group!r}")
        if not (math.isfinite(self.damp) and self.damp > 0):
            raise LlmpruneError(f"damp must be positive, got {self.damp}")
        if self.oracle_samples is not None and not (isinstance(self.oracle_samples, int) and not isinstance(
                self.oracle_samples, bool) and self.oracle_samples > 0):
            raise LlmpruneError(f"oracle_samples must be a positive number of sequences, got {self.oracle_samples!r}")


@dataclass
class UnitStudy:
    """One decoder layer and unit kind: per unit the oracle (loss change when removed) and each
    criterion's score, and each criterion's Spearman correlation with the oracle."""

    layer: int
    unit: str
    oracle: list[float]
    scores: dict[str, list[float]]
    spearman: dict[str, float]


@dataclass
class SaliencyResult:
    config: SaliencyConfig
    dense_loss: float
    studies: list[UnitStudy] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # calibration (sequences, length): the criteria's
    oracle_tokens: list[int] = field(default_factory=list)  # the oracle's
    seconds: float = 0.0

    def mean_correlation(self) -> dict[str, float]:
        """Each criterion's Spearman ρ averaged over the studies (NaN ones left out)."""
        out = {}
        for criterion in self.config.criteria:
            values = [s.spearman[criterion] for s in self.studies if not math.isnan(s.spearman[criterion])]
            out[criterion] = sum(values) / len(values) if values else math.nan
        return out

    def best(self) -> str:
        means = {c: v for c, v in self.mean_correlation().items() if not math.isnan(v)}
        return max(means, key=lambda c: (means[c], c)) if means else ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: an undefined correlation (a constant score) is None, not NaN."""
        studies = [{**asdict(s), "spearman": {c: _finite(v) for c, v in s.spearman.items()}} for s in self.studies]
        means = {c: _finite(v) for c, v in self.mean_correlation().items()}
        return {"kind": "saliency", "config": asdict(self.config), "dense_loss": self.dense_loss,
                "studies": studies, "mean_spearman": means,
                "best": self.best(), "tokens": self.tokens, "oracle_tokens": self.oracle_tokens,
                "seconds": self.seconds}


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def channel_groups(anatomy: LayerAnatomy, size: int) -> list[Unit]:
    """MLP channels in consecutive groups of ``size`` (the last may be smaller)."""
    singles = channel_units(anatomy)
    if size > len(singles):
        raise LlmpruneError(f"channel_group {size} is wider than the MLP ({len(singles)} channels)")
    groups = []
    for start in range(0, len(singles), size):
        members = singles[start:start + size]
        rows: dict[str, list[int]] = {}
        for unit in members:
            for name, r in unit.rows.items():
                rows.setdefault(name, []).extend(r)
        groups.append(Unit(rows, [c for unit in members for c in unit.columns]))
    return groups


@torch.no_grad()
def saliency(model: nn.Module, config: SaliencyConfig, calibration: torch.Tensor, *,
             device: str | torch.device | None = None, batch_size: int | None = None,
             progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
             gradients: LossGradients | None = None) -> SaliencyResult:
    """Run the oracle study (see the module) on ``model`` (left dense); ``calibration``: (n,
    seqlen) token ids, for the criteria's statistics and the oracle's loss alike. Progress:
    "gradients" (taylor, obd), then stage "oracle" in units."""
    start = time.perf_counter()
    layers_path, layers = find_decoder_layers(model)
    count = len(layers)
    chosen = sorted(set(config.layers)) if config.layers is not None else sorted({0, count // 2, count - 1})
    for index in chosen:
        if not 0 <= index < count:
            raise LlmpruneError(f"layer {index} does not exist: the model has decoder layers 0 to {count - 1}")
    widths = widths_of(model.config)
    anatomies = {}
    for index in chosen:
        if expert_containers(layers[index]):
            raise LlmpruneError(f"decoder layer {index} holds experts; the oracle study covers heads and dense "
                                "MLP channels")
        anatomies[index] = inspect_layer(layers[index], widths, "heads" in config.units, "channels" in config.units)
    if "channels" in config.units:
        for index in chosen:  # too wide a group: refused before work
            channel_groups(anatomies[index], config.channel_group)
    check_finite(model)
    run_device = resolve_device(device)
    model.eval()
    if {"taylor", "obd"} & set(config.criteria) and gradients is None:
        gradients = loss_gradients(model, calibration, run_device, progress=progress, cancel=cancel)
        model.eval()
    size = batch_size or auto_batch_size(calibration.shape[0], calibration.shape[1],
                                         max(widest_width(layer) for layer in layers), run_device)
    hidden, calls = capture_layer_calls(model, layers, list(calibration.split(size)))
    judged = calibration[:config.oracle_samples] if config.oracle_samples else calibration
    batches = list(judged.split(size))
    if judged.shape[0] < calibration.shape[0]:  # the oracle's own sequences
        states, judged_calls = capture_layer_calls(model, layers, batches)
    else:
        states, judged_calls = hidden, calls
    tokens = judged[:, 1:].numel()

    def loss(first: int, inputs: list[torch.Tensor]) -> float:
        return nll_from(model, layers_path, layers, judged_calls, first, inputs, batches, run_device) / tokens

    dense_loss = loss(0, states)
    plans = {index: _units(anatomies[index], config) for index in chosen}
    steps = Steps(progress, cancel, STAGE, sum(len(u) for p in plans.values() for _, u, _ in p), "units")
    steps(0)
    result = SaliencyResult(config, dense_loss, tokens=list(calibration.shape), oracle_tokens=list(judged.shape))
    done = 0
    for index, layer in enumerate(layers[:chosen[-1] + 1]):
        check_cancel(cancel, f"oracle study, at decoder layer {index}")
        if index in plans:
            raw = _dense_stats(layer, hidden, calls[index], anatomies[index], run_device)
            for kind, units, out_name in plans[index]:
                linear = find_linears(layer)[out_name]
                oracle = []
                for unit in units:
                    W = get_weight(linear).detach().clone()
                    removed = W.clone()
                    removed[:, unit.columns] = 0
                    set_weight(linear, removed)
                    try:
                        oracle.append(loss(index, states) - dense_loss)
                    finally:
                        set_weight(linear, W)
                    done += 1
                    steps(done)
                scores = _criteria(config, layer, f"{layers_path}.{index}", units, out_name, raw[out_name],
                                   gradients)
                target = torch.tensor(oracle, dtype=torch.float64)
                result.studies.append(UnitStudy(index, kind, oracle, {c: s.tolist() for c, s in scores.items()},
                                                {c: spearman(s, target) for c, s in scores.items()}))
        if index < chosen[-1]:
            same = states is hidden
            hidden = advance(layer, hidden, calls[index], run_device)
            states = hidden if same else advance(layer, states, judged_calls[index], run_device)
    result.seconds = time.perf_counter() - start
    return result


def _units(anatomy: LayerAnatomy, config: SaliencyConfig) -> list[tuple[str, list[Unit], str]]:
    plan = []
    if "heads" in config.units:
        assert anatomy.o is not None
        plan.append(("heads", head_units(anatomy, "query"), anatomy.o))
    if "channels" in config.units:
        assert anatomy.down is not None
        plan.append(("channels", channel_groups(anatomy, config.channel_group), anatomy.down))
    return plan


def _dense_stats(layer: nn.Module, hidden: list[torch.Tensor], calls: Any, anatomy: LayerAnatomy,
                 device: torch.device) -> dict[str, dict[str, Any]]:
    """Input statistics of o_proj and down_proj on the dense layer (all that any criterion reads)."""
    targets = {n: m for n, m in find_linears(layer).items() if n in (anatomy.o, anatomy.down)}
    found: dict[str, dict[str, Any]] = {}

    def keep(name: str, stats: StatSet) -> None:
        found[name] = stats.raw()

    with Visit(layer, device):  # dense: nothing changes, so no rounding to mind
        visit_layer(layer, hidden, calls, targets, {HESSIAN, COLUMN_NORMS, MEAN_VAR}, keep, False, device,
                    out=Discard())
    return {n: {k: (tuple(x.cpu() for x in v) if isinstance(v, tuple) else v.cpu()) for k, v in s.items()}
            for n, s in found.items()}


def _criteria(config: SaliencyConfig, layer: nn.Module, prefix: str, units: list[Unit], out_name: str,
              raw: dict[str, Any], gradients: LossGradients | None) -> dict[str, torch.Tensor]:
    linears = find_linears(layer)
    weights = {n: get_weight(m).detach().float().cpu() for n, m in linears.items()}
    grads = None
    if gradients is not None:
        grads = {n: gradients.of(f"{prefix}.{n}", m) for n, m in linears.items()}
    scores: dict[str, torch.Tensor] = {}
    for criterion in config.criteria:
        if criterion == "obs":
            Hinv, _ = damped_inverse(raw[HESSIAN], config.damp)
            W = weights[out_name].double()
            sizes = {len(u.columns) for u in units}
            if len(sizes) == 1:
                scores[criterion] = group_errors(W, Hinv, [u.columns for u in units]).double()
            else:  # a smaller last channel group: one solve per group
                scores[criterion] = torch.cat([group_errors(W, Hinv, [u.columns]) for u in units]).double()
        elif criterion == "random":
            generator = torch.Generator().manual_seed(config.seed)
            scores[criterion] = torch.rand(len(units), generator=generator, dtype=torch.float64)
        else:
            scores[criterion] = unit_scores(criterion, units, weights, out_name, raw, grads).double()
    return scores
