"""The pruning loop: one decoder layer at a time, from captured calibration inputs.

For each decoder layer: move it to the execution device, accumulate fp32 statistics of its
linears' inputs with forward pre-hooks (linears fed the same tensor share one set), prune the
linears, run the *pruned* layer to make the next layer's inputs, move it back. Only one decoder
layer and the calibration activations need to be on the device at once.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from llmprune.core.allocation import outlier_ratio, owl_sparsities
from llmprune.core.stats import MEAN_VAR, ColumnNorms, CrossDifference, Hessian, InputSample, MeanVar, relative_error
from llmprune.engine.capture import LayerCall, StopForward, capture_layer_calls
from llmprune.engine.config import PruneConfig
from llmprune.engine.curves import curve_allocation
from llmprune.engine.experts import UNFUSED, expert_containers, layout_of, routing_of, slice_shapes, unfused
from llmprune.engine.gradients import LossGradients, loss_gradients
from llmprune.engine.lockstep import Diverged, Lockstep
from llmprune.engine.model import (
    check_finite,
    count_zeros,
    eager_attention_width,
    find_decoder_layers,
    find_linears,
    floating_dtypes,
    get_weight,
    restore_dtypes,
    set_weight,
    unprunable_weights,
    weight_matrices,
)
from llmprune.engine.observe import InputNorms, plain_layers
from llmprune.engine.paired import DenseInputs, dense_linear_inputs
from llmprune.engine.precision import calibration_pass, dtype_name, full_precision, layer_pass_dtype, pass_dtype
from llmprune.engine.recover import RecoverSettings, dense_targets, recover_layer
from llmprune.engine.saliency import check_gradients_possible, global_allocation, layer_weight_stats
from llmprune.errors import LlmpruneError
from llmprune.io.activations import BatchFile
from llmprune.io.memory import available_bytes
from llmprune.methods import COLUMN_NORMS, HESSIAN, PER_WEIGHT, Method, Options, Stats, get_method, pieces
from llmprune.methods.base import CROSS
from llmprune.progress import Event, Progress, check_cancel

log = logging.getLogger(__name__)



# Where a layer's outputs go, one batch at a time: a list, or a file (activation offload).
Sink = list[torch.Tensor] | BatchFile
# Elements of the widest activation of one calibration batch: small batches are faster on a CPU
# (they stay in cache), while a GPU prefers them large.
CPU_BATCH_BUDGET = 2**22
DEVICE_BATCH_BUDGET = 2**26
# Elements of the widest activation of all batches together, which the lockstep mode keeps alive
# at once: at least LOCKSTEP_BUDGET (256 MB in fp32), more while LOCKSTEP_COPIES fp32 copies of
# it take at most LOCKSTEP_SHARE of the memory still free where the layer runs. Above it
# true-sequential pruning takes one pass per input group (the same result, more compute).
LOCKSTEP_BUDGET = 2**26
LOCKSTEP_SHARE = 1 / 3
LOCKSTEP_COPIES = 3  # the widest point's activations alive together (MLP gate, up and their product)
ERROR_SAMPLE_ROWS = 256  # calibration rows (over all batches) on which reconstruction error is measured


@dataclass
class LinearReport:
    name: str
    shape: tuple[int, int]
    sparsity: float  # fraction of exact zeros in the written weight
    error: float  # ‖(W − Ŵ)X‖² / ‖WX‖² on sampled calibration inputs (before any recovery)
    damp: float | None = None  # dampening actually used by the OBS solve
    tokens: int | None = None  # an expert's: calibration tokens routed to it
    fallback: str | None = None  # why its method was not the run's (a starving expert: "magnitude")


@dataclass
class PruneReport:
    config: PruneConfig
    layers_path: str
    linears: list[LinearReport] = field(default_factory=list)
    layer_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    batch_size: int = 0
    one_pass: bool = False  # true-sequential in a single forward per layer (batches in lockstep)
    weight_counts: list[tuple[int, int]] = field(default_factory=list)  # per layer: (zeros, elements)
    unpruned: list[str] = field(default_factory=list)  # weight matrices no method could prune
    allocation: dict[str, Any] | None = None  # per-layer sparsities when not uniform (OWL), and why
    recovery: list[dict[str, Any]] = field(default_factory=list)  # per layer: held-out error before/after
    model_target: float = 0.0  # the refit's pull toward the dense model (options.model_target)
    pass_dtype: str = "float32"  # the calibration passes' precision (config.pass_dtype, resolved)

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros over **every** weight matrix inside the decoder layers: what
        the checkpoint really holds, whatever the method could reach."""
        zeros, total = (sum(c[i] for c in self.weight_counts) for i in (0, 1))
        return zeros / total if total else 0.0

    def experts(self) -> dict[str, Any] | None:
        """Per expert container (mixture-of-experts layers): the calibration tokens routed to
        each expert and the experts pruned by magnitude for want of them; None without experts."""
        found: dict[str, dict[str, Any]] = {}
        for item in self.linears:
            if item.tokens is None:
                continue
            container, expert, _ = item.name.rsplit(".", 2)
            entry = found.setdefault(container, {"tokens": {}, "magnitude_fallback": set()})
            entry["tokens"][int(expert)] = item.tokens
            if item.fallback == "magnitude":
                entry["magnitude_fallback"].add(int(expert))
        if not found:
            return None
        return {"statistics": self.config.expert_statistics, "min_tokens": self.config.min_expert_tokens,
                "containers": {name: {"tokens": [e["tokens"][i] for i in sorted(e["tokens"])],
                                      "magnitude_fallback": sorted(e["magnitude_fallback"])}
                               for name, e in found.items()}}

    @property
    def linear_sparsity(self) -> float:
        """Fraction of zeros over the pruned linears only (weighted by size)."""
        total = sum(r.shape[0] * r.shape[1] for r in self.linears)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.linears)
        return zeros / total if total else 0.0


def as_token_ids(calibration: Any) -> torch.Tensor:
    """Calibration token ids as a (nsamples, seqlen) integer tensor; equal-length lists of ids
    are accepted too."""
    if isinstance(calibration, (list, tuple)):
        try:
            calibration = torch.tensor(calibration, dtype=torch.long)
        except (ValueError, TypeError, RuntimeError):
            raise LlmpruneError("calibration must be (nsamples, seqlen) token ids: a tensor, or a list of "
                                "equal-length lists of ints (see llmprune.calibration_data)") from None
    if not isinstance(calibration, torch.Tensor) or calibration.ndim != 2 or calibration.dtype not in (
            torch.int64, torch.int32) or calibration.numel() == 0:
        got = (f"{tuple(calibration.shape)} {calibration.dtype}" if isinstance(calibration, torch.Tensor)
               else type(calibration).__name__)
        raise LlmpruneError(f"calibration must be a (nsamples, seqlen) tensor of token ids, got {got} "
                            "(see llmprune.calibration_data)")
    return calibration


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto": CUDA when present, else the CPU. An explicit device must exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LlmpruneError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LlmpruneError(f"device {device!r} requested but CUDA is not available here")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise LlmpruneError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if resolved.type == "meta":
        raise LlmpruneError("device 'meta' holds no data; use auto, cpu, cuda or cuda:N")
    if resolved.type not in ("cpu", "cuda"):
        # mps, xpu, ...: torch has a backend module per device type that says whether it works here
        backend = getattr(torch.backends, resolved.type, None) or getattr(torch, resolved.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise LlmpruneError(f"device {device!r} requested but this torch build or machine has no "
                                f"{resolved.type} support; use auto, cpu, cuda or cuda:N")
    return resolved


def auto_batch_size(nsamples: int, seqlen: int, widest: int, device: torch.device) -> int:
    """Samples per forward: as many as keep the widest activation of a batch within budget."""
    budget = CPU_BATCH_BUDGET if device.type == "cpu" else DEVICE_BATCH_BUDGET
    return max(1, min(nsamples, budget // max(1, seqlen * widest)))


def free_bytes(device: torch.device) -> int | None:
    """Memory still free on ``device`` (the system's for the CPU), if known."""
    if device.type == "cpu":
        return available_bytes()
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def lockstep_budget(device: torch.device) -> int:
    """Elements of the widest activation, over all batches, that lockstep may keep alive on
    ``device``: a fixed floor, or what a share of its free memory holds."""
    free = free_bytes(device)
    from_memory = int(LOCKSTEP_SHARE * free) // (4 * LOCKSTEP_COPIES) if free else 0
    return max(LOCKSTEP_BUDGET, from_memory)


def fits_lockstep(nsamples: int, seqlen: int, widest: int, budget: int | None = None,
                  device: torch.device | None = None) -> bool:
    """Whether every batch's activations may be alive at once (one-pass true-sequential);
    ``budget`` None: :func:`lockstep_budget` of ``device`` (default: the CPU)."""
    if budget is None:
        budget = lockstep_budget(device or torch.device("cpu"))
    return nsamples * seqlen * widest <= budget


class StatSet:
    """The statistics of one shared input tensor."""

    def __init__(self, dim: int, kinds: set[str], device: torch.device, batches: int,
                 dtype: torch.dtype = torch.float32) -> None:
        # ``dtype``: of the Hessian's and the cross statistic's products (the pass precision).
        self.acc: dict[str, Hessian | ColumnNorms | MeanVar] = {}
        if HESSIAN in kinds:
            self.acc[HESSIAN] = Hessian(dim, device, dtype)
        if COLUMN_NORMS in kinds:
            self.acc[COLUMN_NORMS] = ColumnNorms(dim, device)
        if MEAN_VAR in kinds:
            self.acc[MEAN_VAR] = MeanVar(dim, device)
        # Paired with the dense model's inputs at the same linear (given to ``add``).
        self.cross = CrossDifference(dim, device, dtype) if CROSS in kinds else None
        self.sample = InputSample(max(1, ERROR_SAMPLE_ROWS // batches))
        self.tokens = 0  # rows routed here (an expert's); every row for other linears
        self.rows = 0  # rows the statistics are made of
        self._prepared: dict[str, torch.Tensor] | None = None

    def add(self, x: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        routing = routing_of(x)  # read before detach(), which drops it
        x = x.detach()
        if self.cross is not None:
            if dense is None or routing is not None:
                raise LlmpruneError("the refit toward the dense model needs the dense model's inputs at every "
                                    "linear, token for token (no experts)")
            self.cross.add(x, dense)
        rows = x.numel() // max(1, x.shape[-1])
        self.rows += rows
        self.tokens += routing.routed if routing is not None else rows
        # The error is measured where the weights act: an expert's routed rows only.
        routed = routing.rows if routing is not None else None
        self.sample.add(x if routed is None else x.reshape(-1, x.shape[-1])[routed])
        if routing is not None and routing.weights is not None:
            # Router-weighted statistics: each row counts with its routing weight (H = Σ w x xᵀ).
            weights = routing.weights.to(x.dtype).clamp_min(0).sqrt()
            x = x.reshape(-1, x.shape[-1]) * weights[:, None]
        for acc in self.acc.values():
            acc.add(x)

    def raw(self) -> dict[str, torch.Tensor]:
        raw = {kind: acc.value() for kind, acc in self.acc.items()}
        return raw if self.cross is None else {**raw, CROSS: self.cross.value()}

    def values(self, method: Method, options: Options) -> dict[str, torch.Tensor]:
        """Final statistics plus the method's derived ones, computed once for all sharers."""
        if self._prepared is None:
            self._prepared = pieces.prepare(method, self.raw(), options)
        return self._prepared


class _Watcher:
    """Forward pre-hooks on a layer's linears. Linears fed the same tensor object share one
    :class:`StatSet` (q/k/v, gate/up), keyed by the first of them to run (its "leader").

    Modes, each ending a batch's forward as early as it can (StopForward):

    * ``"all"``: record every linear; stop once all have been seen in the batch.
    * ``"first_group"``: record only the first input group reached; stop at the next group.
    * ``"observe"``: record every linear and run each batch to the end, so the pass also gives
      the layer's outputs (for callers that change nothing).
    """

    def __init__(
        self, linears: dict[str, nn.Module], kinds: set[str], device: torch.device, mode: str,
        dense: DenseInputs | None = None, dtype: torch.dtype = torch.float32,
    ) -> None:
        self.linears, self.kinds, self.device, self.mode = linears, kinds, device, mode
        self.dense = dense
        self.dtype = dtype  # of the statistics' products
        self.index = 0  # the batch running
        self.leader: dict[str, str] = {}  # linear -> first linear seen with the same input
        self.stats: dict[str, StatSet] = {}  # leader -> statistics
        self.order: list[str] = []  # linears in call order, as first seen
        self._batch: list[tuple[weakref.ref[torch.Tensor], str]] = []
        self._seen: set[str] = set()
        self.batches = 1

    def _leader_of(self, name: str, x: torch.Tensor) -> str:
        if name not in self.leader:
            self.leader[name] = next((lead for ref, lead in self._batch if ref() is x), name)
            self.order.append(name)
        return self.leader[name]

    def hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            leader = self._leader_of(name, x)
            if self.mode == "first_group" and leader != self.leader[self.order[0]]:
                raise StopForward
            if leader == name:
                if name not in self.stats:
                    self.stats[name] = StatSet(x.shape[-1], self.kinds, self.device, self.batches, self.dtype)
                with full_precision(self.device):
                    self.stats[name].add(x, None if self.dense is None else self.dense.of(name, self.index))
            # A weak reference: identity checks stay exact (a dead tensor matches nothing)
            # without keeping every input of the layer alive.
            self._batch.append((weakref.ref(x), leader))
            self._seen.add(name)
            if self.mode == "all" and self._seen >= set(self.linears):
                raise StopForward

        return pre_hook

    def run(self, layer: nn.Module, hidden: Sequence[torch.Tensor], calls: Sequence[LayerCall]) -> list[torch.Tensor]:
        handles = [lin.register_forward_pre_hook(self.hook(n)) for n, lin in self.linears.items()]
        outputs: list[torch.Tensor] = []
        self.batches = len(hidden)
        try:
            for index, (state, call) in enumerate(zip(hidden, calls, strict=True)):
                self._batch, self._seen, self.index = [], set(), index
                try:
                    outputs.append(call.run(layer, state.to(self.device), self.device).to("cpu"))
                except StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
            self._batch = []
        return outputs


def _prune_linear(
    name: str, linear: nn.Module, stats: StatSet, method: Method, options: Options,
    storage: torch.dtype | None = None, dense: torch.Tensor | None = None, extra: Stats | None = None,
) -> LinearReport:
    W = get_weight(linear).detach()
    values = stats.values(method, options)
    result = pieces.prune(method, W, {**values, **extra} if extra else values, options)
    # Computing in a wider dtype than the checkpoint's: round to what will be saved, so the next
    # linears and layers see the weights the checkpoint will hold.
    new = result.weight if storage is None else result.weight.to(storage)
    # The error is against the dense weights, also in a later step of a schedule.
    reference = W if dense is None else dense.to(W.device)
    error = relative_error(reference, new.to(W.dtype), stats.sample.value())
    set_weight(linear, new)
    written = get_weight(linear)
    zeros = (written.numel() - torch.count_nonzero(written).item()) / written.numel()
    return LinearReport(name, (W.shape[0], W.shape[1]), zeros, error, result.damp_used)


@torch.no_grad()
def run_batches(
    layer: nn.Module, hidden: Sequence[torch.Tensor], calls: Sequence[LayerCall], device: torch.device,
    out: Sink,
) -> Sink:
    for state, call in zip(hidden, calls, strict=True):
        out.append(call.run(layer, state.to(device), device).to("cpu"))
    return out


@torch.no_grad()
def visit_layer(
    layer: nn.Module, hidden: Sequence[torch.Tensor], calls: Sequence[LayerCall], targets: dict[str, nn.Module],
    kinds: set[str], on_ready: Callable[[str, StatSet], None], sequential: bool, device: torch.device,
    lockstep: bool = False, out: Sink | None = None, observe: bool = False, dense: DenseInputs | None = None,
    dtype: torch.dtype = torch.float32,
) -> Sink:
    """Run one decoder layer on the calibration batches, calling ``on_ready(name, stats)`` for
    each of ``targets`` once its input statistics are complete (``on_ready`` may change the
    linear; with ``sequential`` later linears then see its effect). Returns the layer's outputs
    after all changes, appended to ``out`` (default: a new list) one batch at a time.
    ``observe``: ``on_ready`` changes nothing, so one pass gives the statistics and the outputs
    (a dense pre-pass: half the forward passes of the general path). ``dense``: the dense model's
    inputs at each linear, batch by batch, for statistics paired with them (:data:`CROSS`).
    ``dtype``: the passes' precision (:mod:`llmprune.engine.precision`); statistics and
    ``on_ready`` always run in full precision."""
    pending = dict(targets)
    sink: Sink = [] if out is None else out

    def ready(name: str, stats: StatSet) -> None:
        with full_precision(device):
            on_ready(name, stats)

    # One autocast region around the whole layer, not one per batch: in lockstep the batches
    # are greenlets on one thread, and a region per batch would end under the others' feet.
    with calibration_pass(layer, device, dtype):
        return _visit_layer(layer, hidden, calls, pending, kinds, ready, sequential, device, lockstep, sink, observe,
                            dense, dtype)


def _visit_layer(
    layer: nn.Module, hidden: Sequence[torch.Tensor], calls: Sequence[LayerCall], pending: dict[str, nn.Module],
    kinds: set[str], on_ready: Callable[[str, StatSet], None], sequential: bool, device: torch.device,
    lockstep: bool, sink: Sink, observe: bool, dense: DenseInputs | None, dtype: torch.dtype,
) -> Sink:
    if observe and not isinstance(sink, Discard):
        watcher = _Watcher(pending, kinds, device, "observe", dtype=dtype)
        for output in watcher.run(layer, hidden, calls):
            sink.append(output)
        for name in watcher.order:
            if name in pending and watcher.leader[name] in watcher.stats:
                on_ready(name, watcher.stats[watcher.leader[name]])
        return sink
    if sequential and lockstep:
        # Every batch waits at each linear until all batches have reached it; the linear's
        # statistics are then complete, so it is handled right there, before it is applied.
        # One pass gives true-sequential pruning and the changed layer's outputs together.
        shared: list[tuple[weakref.ref[torch.Tensor], StatSet]] = []  # by identity of batch 0's input

        def on_arrival(name: str, inputs: list[torch.Tensor]) -> None:
            with full_precision(device):
                arrive(name, inputs)

        def arrive(name: str, inputs: list[torch.Tensor]) -> None:
            stats = next((s for ref, s in shared if ref() is inputs[0]), None)
            if stats is None:
                # A new input: the group before it is complete in every stock layer (q/k/v, then
                # o; gate/up, then down), so its statistics and factor (3·n² for a SparseGPT
                # down_proj) go now, not at the end of the layer. Should a later linear read
                # an earlier input after all (parallel attention and MLP blocks), its
                # statistics are rebuilt from the same inputs: the same numbers, more compute.
                shared.clear()
                stats = StatSet(inputs[0].shape[-1], kinds, device, len(inputs), dtype)
                for number, x in enumerate(inputs):
                    stats.add(x, None if dense is None else dense.of(name, number))
                shared.append((weakref.ref(inputs[0]), stats))
            if name in pending:  # a linear may run twice in a layer
                del pending[name]
                on_ready(name, stats)
            if not pending:
                shared.clear()  # the last target: nothing reads these statistics again

        try:
            Lockstep(dict(pending), on_arrival).run(layer, hidden, calls, device, sink)
            return sink
        except Diverged as why:
            log.info("%s; handling the rest of this layer group by group", why)
            sink.clear()  # batches that finished before the run diverged saw a partly pruned layer
    while pending:
        watcher = _Watcher(pending, kinds, device, "first_group" if sequential else "all", dense, dtype)
        watcher.run(layer, hidden, calls)
        # In "first_group" mode the next group's first linear was seen but not recorded.
        ready = [n for n in watcher.order if watcher.leader[n] in watcher.stats]
        for name in ready:
            del pending[name]
            on_ready(name, watcher.stats[watcher.leader[name]])
        if not ready:
            break  # the rest never runs on calibration data
    if isinstance(sink, Discard):
        return sink  # nobody reads this layer's outputs: no pass to make them
    return run_batches(layer, hidden, calls, device, sink)


@torch.no_grad()
def prune_layer(
    layer: nn.Module, hidden: Sequence[torch.Tensor], calls: Sequence[LayerCall],
    method: Method, options: Options, sequential: bool, device: torch.device, lockstep: bool = False,
    out: Sink | None = None, storage: torch.dtype | None = None,
    dense: dict[str, torch.Tensor] | None = None, min_expert_tokens: int = 0,
    weight_stats: dict[str, Stats] | None = None, linear_sparsity: dict[str, float] | None = None,
    only: set[str] | None = None, dense_inputs: DenseInputs | None = None, precision: torch.dtype = torch.float32,
) -> tuple[Sink, list[LinearReport]]:
    """Prune one decoder layer in place; returns its pruned outputs and per-linear reports.
    ``storage``: the checkpoint's dtype when the layer is computed in a wider one. ``dense``:
    the linears' dense weights, when the layer is already partly pruned (a schedule's later
    step): the reports' errors are measured against them. An expert's linear (the layer's
    experts unfused, :func:`~llmprune.engine.experts.unfused`) whose statistics hold fewer than
    ``min_expert_tokens`` tokens is pruned by magnitude, without an update (a starving expert).
    ``weight_stats``: per-weight statistics by linear name (gradients of the network loss);
    ``linear_sparsity``: each linear's own sparsity, compared over the whole matrix (a global
    comparison group resolved beforehand). ``only``: prune just these linears (names relative to
    the layer), the rest left as they are. ``dense_inputs``: the dense model's inputs at each
    linear (:func:`dense_linear_inputs`), which a refit toward the dense model (``model_target``) needs.
    ``precision``: the calibration passes' (:mod:`llmprune.engine.precision`)."""
    linears = find_linears(layer)
    if only is not None:
        linears = {name: linear for name, linear in linears.items() if name in only}
    experts = expert_linears(layer)
    reports: dict[str, LinearReport] = {}
    fallback = get_method("magnitude")
    needs = pieces.needs(method, options)  # magnitude reads none: no expert of it starves

    def prune(name: str, stats: StatSet) -> None:
        # Fewer than one token: no statistics at all, whatever the threshold.
        starving = bool(needs) and name in experts and stats.rows < max(1, min_expert_tokens)
        own = options if linear_sparsity is None else replace(options, sparsity=linear_sparsity[name], group="layer")
        plain = replace(own, update="none", refine="none")
        reports[name] = _prune_linear(name, linears[name], stats, fallback if starving else method,
                                      plain if starving else own, storage,
                                      None if dense is None else dense[name],
                                      None if weight_stats is None else weight_stats[name])
        if name in experts:
            reports[name].tokens = stats.tokens
            reports[name].fallback = "magnitude" if starving else None

    if CROSS in needs and dense_inputs is None:
        raise LlmpruneError("the refit toward the dense model needs the dense model's activations")
    outputs = visit_layer(layer, hidden, calls, linears, needs - PER_WEIGHT, prune, sequential, device, lockstep, out,
                          dense=dense_inputs, dtype=precision)
    _warn_unreached(linears, set(reports))
    return outputs, list(reports.values())


def expert_linears(layer: nn.Module) -> set[str]:
    """Names of the linears that are slices of unfused experts."""
    inside = [name for name, module in layer.named_modules() if hasattr(module, UNFUSED)]
    return {name for name in find_linears(layer) if any(name.startswith(c + ".") for c in inside)}


# Calibration samples the dense pre-pass reads (OWL): enough for stable input norms. With 8 the
# default at 70% lost about 3% on validation with either calibration text (README).
PREPASS_SAMPLES = 16


def given_norms_fit(layers: nn.ModuleList, given: InputNorms | None) -> bool:
    """Whether ``given`` input norms (gathered while the dense model wrote calibration windows)
    cover every linear of every decoder layer, with its width, so OWL needs no pass of its own."""
    if given is None:
        return False
    norms = given.result
    fits = given.tokens > 0 and plain_layers(layers) and len(norms) == len(layers) and all(
        set(found) == set(linears) and all(found[n].numel() == get_weight(m).shape[1] for n, m in linears.items())
        for found, linears in ((found, find_linears(layer)) for layer, found in zip(layers, norms, strict=False)))
    if not fits:
        log.info("the input norms gathered while the model wrote calibration windows do not cover every "
                 "linear; OWL makes its own dense pass")
    return fits


@torch.no_grad()
def owl_allocation(layers: nn.ModuleList, inputs: Sequence[torch.Tensor], calls: Sequence[Sequence[LayerCall]],
                   host: LayerHost, devices: Sequence[torch.device], config: PruneConfig, target: float,
                   progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
                   given: InputNorms | None = None) -> dict[str, Any]:
    """OWL's layer sparsities from a pass over the *dense* layers on the first
    :data:`PREPASS_SAMPLES` calibration samples (``inputs`` as the pruning captures them: one
    batch of exactly those; batches a caller captured are read whole, up to at least that many):
    each layer's outlier ratio of Wanda scores (:mod:`llmprune.core.allocation`). With ``given``
    norms (the dense model's while it wrote the generated windows, which the caller found to fit:
    :func:`given_norms_fit`) there is no pass: the scores read them. Progress: stage "allocate",
    in layers."""
    take, samples = [], 0
    for batch in inputs:
        if samples >= PREPASS_SAMPLES:
            break
        take.append(batch)
        samples += batch.shape[0]
    hidden: Sequence[torch.Tensor] = take
    ratios, sizes = [], []
    norms: dict[str, torch.Tensor] = {}
    read = None if given is None else given.result

    def collect(name: str, stats: StatSet) -> None:
        norms[name] = stats.raw()[COLUMN_NORMS]

    if progress is not None:
        progress(Event("allocate", 0, len(layers), "layers"))
    for index, layer in enumerate(layers):
        check_cancel(cancel, f"during allocate, after {index} of {len(layers)} layers")
        host.fetch(index, layer)
        if read is not None:  # no pass: the scores where the weights are (plain layers, no experts)
            linears = find_linears(layer)
            ratios.append(outlier_ratio([get_weight(linears[n]).detach().float().abs()
                                         * read[index][n].to(get_weight(linears[n]).device)[None, :]
                                         for n in linears], config.owl_m))
            sizes.append(sum(get_weight(linear).numel() for linear in linears.values()))
        else:
            param = next(layer.parameters())
            home, storage, dtypes = param.device, param.dtype, floating_dtypes(layer)
            layer.to(devices[index], dtype=compute_dtype(devices[index], storage))
            with unfused(layer, config.expert_statistics):
                linears = find_linears(layer)
                norms.clear()
                hidden = list(visit_layer(layer, hidden, calls[index][: len(take)], linears, {COLUMN_NORMS}, collect,
                                          False, devices[index], observe=True))
                scores = [get_weight(linears[n]).detach().float().abs() * norms[n].float()[None, :] for n in norms]
                ratios.append(outlier_ratio(scores, config.owl_m))
                sizes.append(sum(get_weight(linear).numel() for linear in linears.values()))
                del scores
            layer.to(home)
            restore_dtypes(layer, dtypes)
        del linears
        host.release(index, layer)
        if progress is not None:
            progress(Event("allocate", index + 1, len(layers), "layers"))
    sparsity = owl_sparsities(ratios, sizes, target, config.owl_lambda)
    log.info("OWL layer sparsity: %s", ", ".join(f"{s:.3f}" for s in sparsity))
    # Where the norms came from: the first calibration samples, or the generated windows' tokens.
    source = {"samples": samples} if given is None else {"samples": 0, "generated_tokens": given.tokens}
    return {"kind": "owl", "m": config.owl_m, "lambda": config.owl_lambda, **source,
            "outlier_ratio": ratios, "sparsity": sparsity}


def _prune_in_steps(layer: nn.Module, hidden: Sequence[torch.Tensor], calls: Sequence[LayerCall], method: Method,
                    options: Options, config: PruneConfig, device: torch.device, lockstep: bool, sink: Sink,
                    index: int, report: PruneReport, storage: torch.dtype | None,
                    weight_stats: dict[str, Stats] | None = None, linear_sparsity: dict[str, float] | None = None,
                    dense_inputs: list[torch.Tensor] | None = None,
                    ) -> tuple[Sink, list[LinearReport], list[torch.Tensor] | None]:
    """Prune one decoder layer: in one step, or through ``config.schedule`` (each step's
    sparsity scaled to this layer's target), each step followed by block-wise recovery when
    asked. Recovery entries go to ``report.recovery``. ``dense_inputs``: the dense model's own
    activations at this layer, given when recovery aims at the dense model (its targets are then
    the dense layer's outputs on them) or the refit does (``options.model_target``: the dense
    layer runs on them first, its linears' inputs kept); the dense layer's outputs on them, the
    dense model's activations at the next layer, are returned third (and ``dense_inputs`` is
    emptied once read: only one copy of the dense activations stays alive)."""
    recovering = config.recover == "blockwise"
    precision = layer_pass_dtype(config.pass_dtype or "float32", device, layer)
    final = options.sparsity
    steps = [final * s / config.schedule[-1] for s in config.schedule] if config.schedule else [final]
    dense_outputs = linear_inputs = None
    if options.model_target > 0:
        if dense_inputs is None:
            raise LlmpruneError("the refit toward the dense model needs the dense model's activations")
        dense_outputs, linear_inputs = dense_linear_inputs(layer, dense_inputs, calls, device, precision)
    toward_model = recovering and config.recover_target == "model"
    targets = dense_targets(layer, dense_inputs if toward_model and dense_inputs is not None else hidden, calls,
                            device) if recovering else None
    if dense_inputs is not None:
        dtype = dense_inputs[0].dtype
        dense_inputs.clear()  # a half-precision model would otherwise hold two copies for the layer
        if dense_outputs is None and targets is not None:
            dense_outputs = [t.to(dtype) for t in targets[1]]
    settings = RecoverSettings(config.recover_epochs, config.recover_lr, config.recover_schedule, config.recover_keep,
                               config.recover_mlp_steps)
    reports: list[LinearReport] = []
    dense = ({n: get_weight(m).detach().to("cpu", copy=True) for n, m in find_linears(layer).items()}
             if len(steps) > 1 else None)
    for number, sparsity in enumerate(steps):
        last = number == len(steps) - 1
        direct = last and not recovering  # this pass's outputs are the layer's final ones
        step = replace(options, sparsity=sparsity, keep_zeros=number > 0)
        outputs, reports = prune_layer(layer, hidden, calls, method, step,
                                       config.sequential, device, lockstep, sink if direct else Discard(), storage,
                                       dense, config.min_expert_tokens, weight_stats, linear_sparsity,
                                       dense_inputs=linear_inputs, precision=precision)
        if targets is not None:  # judged on the weights the checkpoint will hold
            item = recover_layer(layer, hidden, calls, *targets, device, settings, storage)
            report.recovery.append({"layer": index, "step_sparsity": sparsity, **item})
    if not direct:  # the next layer's inputs from a pass like the direct path's
        with calibration_pass(layer, device, precision):
            outputs = run_batches(layer, hidden, calls, device, sink)
    return outputs, reports, dense_outputs


class Discard(list[torch.Tensor]):
    """A sink that keeps nothing: the outputs of a layer that is changed again afterwards."""

    def append(self, item: torch.Tensor) -> None:
        pass


def _warn_unreached(linears: dict[str, nn.Module], pruned: set[str]) -> None:
    for name in sorted(set(linears) - pruned):
        log.warning("linear %s never ran on the calibration data; left dense", name)


def widest_width(layer: nn.Module) -> int:
    """The widest input or output of the layer's linears and expert slices: what sizes the
    activations of a calibration batch."""
    widths = [max(get_weight(lin).shape) for lin in find_linears(layer).values()]
    for module in expert_containers(layer).values():
        layout = layout_of(module)
        assert layout is not None
        widths += [max(shape) for shape in slice_shapes(layout).values()]
    return max(widths)


def validate_widths(layers_path: str, layers: nn.ModuleList, options: Options) -> None:
    """Fail before any work if an N:M pattern does not divide a linear's input width."""
    if options.pattern.kind != "nm":
        return
    m = options.pattern.m
    for index, layer in enumerate(layers):
        widths = {name: get_weight(linear).shape[1] for name, linear in find_linears(layer).items()}
        for container, module in expert_containers(layer).items():
            layout = layout_of(module)
            assert layout is not None
            widths |= {f"{container}.<expert>.{kind}": shape[1] for kind, shape in slice_shapes(layout).items()}
        for name, width in widths.items():
            if width % m:
                raise LlmpruneError(
                    f"pattern {options.pattern}: input width {width} of {layers_path}.{index}.{name} "
                    f"is not divisible by M={m}"
                )


def check_prunable(model: nn.Module, allow_partial: bool) -> list[str]:
    """Names of the decoder-layer weight matrices no method can prune (fused 3-D expert weights,
    say). Unless ``allow_partial``, any such weight stops the run before work: the checkpoint
    would be called pruned while much of it is untouched."""
    layers_path, layers = find_decoder_layers(model)
    unpruned, sizes = [], [0, 0]
    for index, layer in enumerate(layers):
        found = unprunable_weights(layer)
        unpruned += [f"{layers_path}.{index}.{name}" for name in found]
        sizes[0] += sum(p.numel() for p in found.values())
        sizes[1] += sum(p.numel() for p in weight_matrices(layer).values())
    if unpruned and not allow_partial:
        name = unpruned[0]
        param = model.get_parameter(name)
        raise LlmpruneError(
            f"the decoder layers hold {len(unpruned)} weight matrices that are not linear layers, "
            f"{sizes[0] / sizes[1]:.1%} of their weights (e.g. {name}, shape {'x'.join(map(str, param.shape))}, "
            "neither linear layers nor fused expert containers, e.g. a convolution kernel): pruning would "
            "leave them dense; "
            "allow_partial (--allow-partial) prunes the linear layers anyway and reports both sparsities"
        )
    return unpruned


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer is processed in: float16 and bfloat16 on a CPU are computed in float32
    (CPU half-precision matmuls are several times slower than float32 ones, and bfloat16
    statistics would lose most of their bits); weights are rounded back before the next linear
    sees them, so the checkpoint keeps its dtype."""
    return torch.float32 if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass
class Resumed:
    """Where a run picks up: the first layer still to prune and the inputs that feed it."""

    start: int
    hidden: Sequence[torch.Tensor]
    linears: list[LinearReport] = field(default_factory=list)
    layer_seconds: list[float] = field(default_factory=list)
    weight_counts: list[tuple[int, int]] = field(default_factory=list)
    recovery: list[dict[str, Any]] = field(default_factory=list)
    dense: list[torch.Tensor] | None = None  # the dense model's activations at ``start`` (None: not stored)


class LayerHost:
    """Where the decoder layers' weights live between visits. This default keeps the whole model
    in memory; :mod:`llmprune.engine.stream` reads each layer from disk and writes it back pruned."""

    def captured(self, model: nn.Module) -> None:
        """Called once the calibration inputs of layer 0 are captured."""

    def lockstep_budget(self) -> int | None:
        """Elements of the widest activation of all batches that may be alive at once
        (None: :func:`lockstep_budget` of the device)."""
        return None

    def resume(self, hidden: list[torch.Tensor]) -> Resumed:
        return Resumed(0, hidden)

    def fetch(self, index: int, layer: nn.Module) -> None:
        """Make layer ``index``'s weights present (on the CPU or any device)."""

    def release(self, index: int, layer: nn.Module) -> None:
        """Layer ``index`` was only read (the dense pre-pass): its weights may go again."""

    def sink(self, index: int) -> Sink:
        """Where layer ``index``'s outputs go."""
        return []

    def finish(self, index: int, layer: nn.Module, outputs: Sink, report: PruneReport,
               dense: list[torch.Tensor] | None = None) -> Sequence[torch.Tensor]:
        """Layer ``index`` is pruned (its reports are the last in ``report``); returns the
        next layer's inputs. ``dense``: the dense model's activations there (recovery toward
        the dense model), kept in memory; a host that resumes stores them too."""
        return outputs


@torch.no_grad()
def prune(
    model: nn.Module,
    config: PruneConfig,
    calibration: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    layer_devices: Sequence[torch.device] | None = None,
    host: LayerHost | None = None,
    captured: tuple[list[torch.Tensor], list[list[LayerCall]]] | None = None,
    gradients: LossGradients | None = None,
    owl_norms: InputNorms | None = None,
) -> PruneReport:
    """Prune ``model`` in place, one decoder layer at a time.

    ``calibration``: (nsamples, seqlen) token ids. ``device``: where each layer is processed
    (default: CUDA if present); the model itself may stay on the CPU. ``layer_devices``: one
    device per decoder layer instead (from an accelerate device map). ``progress`` is given an
    :class:`~llmprune.progress.Event` ("prune", layers done, total, "layers") once the inputs are captured and after
    each layer;
    ``cancel`` is polled between layers; when it returns True the run stops with :class:`Cancelled` (the model is
    then partly pruned). ``host`` decides where layer weights live between visits (default: in
    ``model``). ``captured``: the inputs of layer 0 and every layer's call arguments, from an
    earlier :func:`capture_layer_calls` of the same calibration batches (a sweep reuses them).
    ``gradients``: for the methods that read the network loss's gradients (``obd``, ``taylor``),
    those of this dense model (:func:`~llmprune.engine.gradients.loss_gradients`) if already
    computed; otherwise they are computed here first (progress stage "gradients").
    ``owl_norms``: the dense model's input norms, gathered while it wrote generated calibration
    windows (:class:`~llmprune.engine.observe.InputNorms`): OWL reads them instead of making a
    dense pass of its own, where they cover every linear (no experts).
    Embeddings, norms and ``lm_head`` are never pruned.
    """
    start = time.perf_counter()
    calibration = as_token_ids(calibration)
    method = get_method(config.method_name)
    options = config.options()
    host = host or LayerHost()
    layers_path, layers = find_decoder_layers(model)
    if options.model_target > 0 and not plain_layers(layers) and config.recipe_target:
        log.info("the default recipe's refit toward the dense model is off for a model with experts (the dense "
                 "and the pruned model route tokens differently, so there are no token pairs)")
        options = replace(options, model_target=0.0)
    if options.model_target > 0 and not plain_layers(layers):
        # The refit pairs each token's inputs in the pruned and the dense model; with experts
        # the two route tokens differently, so there are no pairs.
        raise LlmpruneError("model_target pairs each token's inputs in the pruned and the dense model, which a "
                            "model with experts cannot (the two route tokens differently); drop model_target")
    unpruned = check_prunable(model, config.allow_partial)
    validate_widths(layers_path, layers, options)
    check_finite(model, skip=layers)
    run_device = resolve_device(device)
    devices = list(layer_devices) if layer_devices is not None else [run_device] * len(layers)
    if len(devices) != len(layers):
        raise LlmpruneError(f"{len(devices)} layer devices given for {len(layers)} decoder layers")
    for where in {d.type: d for d in devices}.values():  # refused before any work
        pass_dtype(config.pass_dtype or "float32", where)
    kinds = pieces.needs(method, options)
    check_gradients_possible(method, kinds, layers, streamed=type(host) is not LayerHost and gradients is None)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        if kinds & PER_WEIGHT and gradients is None:
            gradients = loss_gradients(model, calibration, run_device, layer_devices, progress, cancel)
            model.eval()
        return _prune_layers(model, config, calibration, method, options, host, layers_path, layers, run_device,
                             devices, batch_size, progress, cancel, captured, unpruned, start, gradients, kinds,
                             owl_norms)
    finally:
        for module, training in modes.items():  # the caller's model keeps the modes it had
            module.training = training


def _prune_layers(model: nn.Module, config: PruneConfig, calibration: torch.Tensor, method: Method, options: Options,
                  host: LayerHost, layers_path: str, layers: nn.ModuleList, run_device: torch.device,
                  devices: list[torch.device], batch_size: int | None, progress: Progress | None,
                  cancel: Callable[[], bool] | None,
                  captured: tuple[list[torch.Tensor], list[list[LayerCall]]] | None, unpruned: list[str],
                  start: float, gradients: LossGradients | None, kinds: set[str],
                  owl_norms: InputNorms | None = None) -> PruneReport:
    widest = max(widest_width(layer) for layer in layers)  # DeepSeek's first layers are dense
    size = batch_size or auto_batch_size(calibration.shape[0], calibration.shape[1], widest, run_device)
    if config.recover == "blockwise" and not batch_size:  # recovery takes an Adam step per batch
        size = min(size, config.recover_batch)
    budget = host.lockstep_budget()
    if budget is None:  # the tightest of the devices the layers run on
        budget = min(lockstep_budget(d) for d in set(devices))
    alive = max(widest, eager_attention_width(model, calibration.shape[1]))
    lockstep = config.sequential and fits_lockstep(calibration.shape[0], calibration.shape[1], alive, budget)
    batches = list(calibration.split(size))
    if captured is not None and len(captured[0]) != len(batches):
        raise LlmpruneError(f"captured inputs hold {len(captured[0])} batches, calibration has {len(batches)}")
    inputs, calls = captured or capture_layer_calls(model, layers, batches)
    # OWL's pre-pass reads exactly its first samples, whatever the batch size (a batch of 16 would
    # cost it twice the forward); sweeps hand in their captured batches and give it whole ones.
    # With norms from the generated windows there is no pass, and nothing to capture for it.
    given = owl_norms if config.allocation == "owl" and given_norms_fit(layers, owl_norms) else None
    prepass = capture_layer_calls(model, layers, [calibration[:PREPASS_SAMPLES]]) \
        if config.allocation == "owl" and captured is None and given is None else (inputs, calls)
    host.captured(model)
    allocation = None
    if config.allocation == "owl":
        allocation = owl_allocation(layers, *prepass, host, devices, config, options.sparsity, progress, cancel,
                                    given)
    del prepass
    if config.allocation == "sensitivity":
        assert config.sensitivity is not None
        allocation = curve_allocation(config.sensitivity, layers, options.sparsity)
    if options.group == "global" and options.pattern.kind == "unstructured":
        allocation = global_allocation(method, layers_path, layers, host, gradients, kinds, options.sparsity,
                                       config.expert_statistics, progress, cancel)
    resumed = host.resume(inputs)
    del inputs
    hidden: Sequence[torch.Tensor] = resumed.hidden
    # Recovery or the refit toward the dense model carries its activations beside the pruned
    # ones (in memory: one more copy of a layer's inputs); at the first layer both are the
    # captured inputs.
    dense: list[torch.Tensor] | None = None
    if (config.recover == "blockwise" and config.recover_target == "model") or options.model_target > 0:
        dense = resumed.dense if resumed.start > 0 else list(hidden)
        if dense is None:
            raise LlmpruneError("the resume journal holds no dense activations to recover or refit toward")
    report = PruneReport(config, layers_path, list(resumed.linears), list(resumed.layer_seconds),
                         device=str(run_device), batch_size=size, one_pass=lockstep,
                         weight_counts=list(resumed.weight_counts), unpruned=unpruned, allocation=allocation,
                         recovery=list(resumed.recovery), model_target=options.model_target,
                         pass_dtype=dtype_name(pass_dtype(config.pass_dtype or "float32", run_device)))
    first = resumed.start
    # Only ``hidden`` may keep the inputs alive: each layer's are freed once the next are made.
    del resumed
    if progress is not None:  # the stage's start (its pace is measured from here)
        progress(Event("prune", first, len(layers), "layers"))
    for index in range(first, len(layers)):
        layer = layers[index]
        check_cancel(cancel, f"after {index} of {len(layers)} decoder layers")
        tick = time.perf_counter()
        host.fetch(index, layer)
        check_finite(layer, prefix=f"{layers_path}.{index}")
        param = next(layer.parameters())
        home, storage, dtypes = param.device, param.dtype, floating_dtypes(layer)
        compute = compute_dtype(devices[index], storage)
        # What this layer's passes multiply in (the record's pass_dtype): a 16-bit layer its own.
        report.pass_dtype = dtype_name(pass_dtype(config.pass_dtype or "float32", devices[index])
                                       if compute == torch.float32 else compute)
        # Widening is lossless; on the way back each tensor returns to its own dtype.
        layer.to(devices[index], dtype=compute) if compute != storage else layer.to(devices[index])
        layer_options = options if allocation is None else replace(options, sparsity=allocation["sparsity"][index])
        prefix = f"{layers_path}.{index}"
        linear_sparsity = None
        if allocation is not None and allocation["kind"] == "global":
            # Half a weight above each count: floor(size · sparsity) then lands on the count exactly,
            # whatever the rounding of count / size.
            linear_sparsity = {name[len(prefix) + 1:]: (count + 0.5) / size
                               for name, (count, size) in allocation["linear_counts"].items()
                               if name.startswith(prefix + ".")}
        with unfused(layer, config.expert_statistics):  # fused experts as linears of their own, meanwhile
            weight_stats = layer_weight_stats(gradients, kinds, prefix, layer, devices[index])
            outputs, linear_reports, dense = _prune_in_steps(
                layer, hidden, calls[index], method, layer_options, config, devices[index], lockstep,
                host.sink(index), index, report, storage if compute != storage else None, weight_stats,
                linear_sparsity, dense)
        layer.to(home)
        restore_dtypes(layer, dtypes)
        report.weight_counts.append(count_zeros(layer))
        for item in linear_reports:
            item.name = f"{layers_path}.{index}.{item.name}"
        report.linears.extend(linear_reports)
        report.layer_seconds.append(time.perf_counter() - tick)
        hidden = host.finish(index, layer, outputs, report, dense)
        if progress is not None:
            progress(Event("prune", index + 1, len(layers), "layers"))
    report.seconds = time.perf_counter() - start
    return report
