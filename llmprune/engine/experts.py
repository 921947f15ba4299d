"""Mixture-of-experts layers: fused expert weights as linears of their own while a layer is pruned.

In transformers 5 the experts of an MoE layer are one module holding 3-D parameters
(``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), transposed in gpt-oss, with biases
there), called with the routing decisions: ``experts(hidden (T, H), top_k_index (T, k),
top_k_weights (T, k))``. Hooks on linears never see them. While a decoder layer is pruned,
:func:`unfused` replaces each such container by one small module per expert whose gate, up and
down are ``nn.Linear`` copies of the expert's slices, and a forward that routes every token
exactly as the container does (the layout flags are transformers' own: ``has_gate``,
``has_bias``, ``is_transposed``, ``is_concatenated``, ``_apply_gate``). Every expert's linears
then get the generic treatment: statistics from the tokens routed to it, one pass per layer
(each expert runs on every batch, with zero rows where none is routed, so the batches reach the
linears in one order and the lockstep holds), its own report. On exit the 3-D parameters are
rebuilt from the linears in the original layout, under the original names.

Containers are discovered, not listed: a module with a 3-D ``down_proj`` and a 3-D
``gate_up_proj`` (or ``up_proj``), whose forward takes (hidden, index, weights).

A second kind is called with one tensor, every token for every expert, already scaled by its
routing weight (Llama 4: ``experts(routed_in (E·T, H))``, the rows of expert e its tokens times
their router score, zero where the router did not choose e; no biases). Such a container is
*pre-routed*: its tokens are the non-zero rows of its input, and the unscaled hidden states
(needed for router-weighted and all-token statistics) are read off the input of the router
beside it, the sibling linear with one row per expert.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from llmprune.errors import LlmpruneError

# How each expert's statistics are gathered (PruneConfig.expert_statistics):
# routed: from the tokens routed to it; weighted: the same, each token weighted by its routing
# weight (MoE-Pruner); all: from every calibration token, as if every token were routed to every
# expert (the layer's output still uses only the routed ones).
ExpertStatistics = Literal["routed", "weighted", "all"]
EXPERT_STATISTICS = ("routed", "weighted", "all")
# The attribute an expert's input tensor carries into the statistics hooks (see StatSet.add).
ROUTING = "_llmprune_routing"
UNFUSED = "_llmprune_unfused"  # on a container while it is unfused: its expert count
# Sees each expert's routed output: (container, expert, routing weights (n,), outputs (n, H)).
Observer = Callable[[str, int, torch.Tensor, torch.Tensor], None]


@dataclass
class Routing:
    """What the statistics need to know about an expert's input rows."""

    routed: int  # rows that were routed to the expert (all rows, unless statistics see every token)
    weights: torch.Tensor | None = None  # per row, for router-weighted statistics
    rows: torch.Tensor | None = None  # when statistics see every token: which rows were routed here


def routing_of(x: torch.Tensor) -> Routing | None:
    value = x.__dict__.get(ROUTING)
    return value if isinstance(value, Routing) else None


def _mark(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    setattr(x, ROUTING, routing)  # a plain Python attribute: it does not survive detach() or ops
    return x


@dataclass(frozen=True)
class Layout:
    experts: int
    intermediate: int
    hidden: int
    has_gate: bool  # gate_up_proj (gate and up) rather than up_proj alone
    has_bias: bool
    transposed: bool  # weights stored (in, out) per expert
    concatenated: bool  # gate rows then up rows; False: interleaved (gate0, up0, gate1, ...)
    prerouted: bool = False  # called with (E·T, H) rows already scaled by the router (Llama 4)

    @property
    def up_name(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"


def layout_of(module: nn.Module) -> Layout | None:
    """The layout of a fused expert container, or None if ``module`` is not one."""
    params = dict(module.named_parameters(recurse=False))
    down = params.get("down_proj")
    has_gate = "gate_up_proj" in params
    up = params.get("gate_up_proj" if has_gate else "up_proj")
    if down is None or up is None or down.ndim != 3 or up.ndim != 3 or up.shape[0] != down.shape[0]:
        return None
    up_name = "gate_up_proj" if has_gate else "up_proj"
    if set(params) - {up_name, "down_proj", up_name + "_bias", "down_proj_bias"} or (
            (up_name + "_bias" in params) != ("down_proj_bias" in params)):
        return None  # other weights, or one bias without the other: not a layout this module rebuilds
    try:
        takes = [p for p in inspect.signature(module.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # pragma: no cover - a builtin forward
        return None
    prerouted = len(takes) == 1  # one tensor: every token for every expert, scaled by the router
    if (len(takes) < 3 and not prerouted) or (prerouted and "down_proj_bias" in params):
        return None  # not called with the routing; or pre-routed with biases, whose zero rows are not silent
    transposed = getattr(module, "is_transposed", None)
    if transposed is None:  # no transformers flag: read it off the shapes, if they tell
        plain, flipped = up.shape[2] == down.shape[1], up.shape[1] == down.shape[2]
        if plain == flipped:
            return None
        transposed = flipped
    hidden, inner = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
    if (up.shape[2] if transposed else up.shape[1]) != (2 if has_gate else 1) * inner:
        return None
    return Layout(int(down.shape[0]), int(inner), int(hidden), has_gate,
                  "down_proj_bias" in params, bool(transposed), bool(getattr(module, "is_concatenated", True)),
                  prerouted)


def expert_containers(block: nn.Module) -> dict[str, nn.Module]:
    """The fused expert containers inside ``block``, by name."""
    return {name: module for name, module in block.named_modules() if layout_of(module) is not None}


def expert_count(module: nn.Module) -> int | None:
    """E for a fused or currently unfused expert container; None otherwise."""
    unfused = getattr(module, UNFUSED, None)
    if isinstance(unfused, int):
        return unfused
    layout = layout_of(module)
    return layout.experts if layout is not None else None


def slice_shapes(layout: Layout) -> dict[str, tuple[int, int]]:
    """Each expert's prunable matrices, (out, in) as in ``nn.Linear``."""
    shapes = {"up_proj": (layout.intermediate, layout.hidden), "down_proj": (layout.hidden, layout.intermediate)}
    return {"gate_proj": (layout.intermediate, layout.hidden), **shapes} if layout.has_gate else shapes


def _halves(t: torch.Tensor, layout: Layout, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) parts of a gate_up tensor along ``dim``."""
    if layout.concatenated:
        gate, up = t.chunk(2, dim=dim)
        return gate, up
    index = [slice(None)] * t.ndim
    index[dim] = slice(0, None, 2)
    gate = t[tuple(index)]
    index[dim] = slice(1, None, 2)
    return gate, t[tuple(index)]


def _join(gate: torch.Tensor, up: torch.Tensor, layout: Layout, dim: int) -> torch.Tensor:
    """The inverse of :func:`_halves` (``dim`` 0 or -1)."""
    if layout.concatenated:
        return torch.cat([gate, up], dim=dim)
    if dim == 0:  # (I, ...) pairs -> (2I, ...) rows gate0, up0, gate1, up1, ...
        return torch.stack([gate, up], dim=1).flatten(0, 1)
    return torch.stack([gate, up], dim=-1).flatten(-2, -1)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=False)
    return linear


class Expert(nn.Module):
    """One expert as linears: ``gate_proj`` (absent without a gate), ``up_proj``, ``down_proj``."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        super().__init__()
        for name, linear in linears.items():
            self.add_module(name, linear)

    def part(self, name: str) -> nn.Linear:
        module = self.get_submodule(name)
        assert isinstance(module, nn.Linear)
        return module


class _Unfused:
    """One container, unfused: holds what refusing needs."""

    def __init__(self, name: str, module: nn.Module, layout: Layout, statistics: ExpertStatistics,
                 observe: Observer | None = None, parent: nn.Module | None = None) -> None:
        self.name, self.module, self.layout, self.statistics, self.observe = name, module, layout, statistics, observe
        self.hidden: torch.Tensor | None = None  # pre-routed: the router's input, the unscaled hidden states
        self.hook: Any = None
        if layout.prerouted and parent is not None:
            beside = [child for child in parent.children()
                      if isinstance(weight := getattr(child, "weight", None), torch.Tensor)
                      and tuple(weight.shape) == (layout.experts, layout.hidden)]
            if len(beside) == 1:
                self.hook = beside[0].register_forward_pre_hook(self._read_hidden)
        params = dict(module.named_parameters(recurse=False))
        self.names = list(params)
        self.requires_grad = {name: p.requires_grad for name, p in params.items()}
        up, down = params[layout.up_name], params["down_proj"]
        up_bias, down_bias = params.get(layout.up_name + "_bias"), params.get("down_proj_bias")
        for e in range(layout.experts):
            u = up[e].T if layout.transposed else up[e]  # (out, in)
            d = down[e].T if layout.transposed else down[e]
            linears: dict[str, nn.Linear] = {}
            if layout.has_gate:
                gate_w, up_w = _halves(u, layout, 0)
                gate_b, up_b = _halves(up_bias[e], layout, 0) if up_bias is not None else (None, None)
                linears["gate_proj"] = _linear(gate_w, gate_b)
                linears["up_proj"] = _linear(up_w, up_b)
            else:
                linears["up_proj"] = _linear(u, up_bias[e] if up_bias is not None else None)
            linears["down_proj"] = _linear(d, down_bias[e] if down_bias is not None else None)
            module.add_module(str(e), Expert(linears))
        del params, up, down, up_bias, down_bias
        for name in self.names:
            delattr(module, name)  # the copies above are now the only weights
        setattr(module, UNFUSED, layout.experts)
        # An instance attribute: the class's forward is left alone.
        module.forward = self.forward_prerouted if layout.prerouted else self.forward

    def _read_hidden(self, _router: nn.Module, args: tuple[Any, ...]) -> None:
        self.hidden = args[0].reshape(-1, self.layout.hidden) if args else None

    def experts(self) -> list[Expert]:
        return [self.module.get_submodule(str(e)) for e in range(self.layout.experts)]  # type: ignore[misc]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        """The container's own computation, expert by expert: each routed token's expert output,
        times its routing weight, summed (transformers' eager forward, expert order kept)."""
        out = torch.zeros_like(hidden_states)
        everyone = self.statistics == "all"
        for e, expert in enumerate(self.experts()):
            token, slot = torch.where(top_k_index == e)
            weights = top_k_weights[token, slot]
            x = hidden_states if everyone else hidden_states[token]
            row_weights = weights if self.statistics == "weighted" else None
            routing = Routing(int(token.numel()), row_weights, token if everyone else None)
            y = self._expert_output(expert, x, routing)
            if everyone:
                y = y[token]
            if self.observe is not None:
                self.observe(self.name, e, weights, y)
            out.index_add_(0, token, (y * weights[:, None]).to(out.dtype))
        return out

    def forward_prerouted(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """A pre-routed container's computation: expert e on its rows of (E·T, H); its tokens are
        the non-zero rows (an unrouted row is zero, and so is its output: no biases), already
        scaled by their router scores. Router-weighted statistics read each score off the row,
        ‖s·h‖ / ‖h‖; all-token statistics add the tokens not routed to e at weight 1 (their
        unscaled hidden state), while the output uses the routed rows alone."""
        layout = self.layout
        rows = hidden_states.view(layout.experts, -1, layout.hidden)
        out = torch.zeros_like(rows)
        plain = self.hidden
        if self.statistics != "routed" and (plain is None or plain.shape[0] != rows.shape[1]):
            raise LlmpruneError(f"{self.name}: {self.statistics} expert statistics need the hidden states the "
                                "router beside this pre-routed container reads, and none was seen")
        for e, expert in enumerate(self.experts()):
            routed = rows[e].ne(0).any(dim=-1)
            token = torch.where(routed)[0]
            x = rows[e][token]
            row_weights = None
            if self.statistics == "weighted" and plain is not None:
                row_weights = x.norm(dim=-1) / plain[token].norm(dim=-1).clamp_min(torch.finfo(x.dtype).tiny)
            if self.statistics == "all" and plain is not None:
                x = torch.where(routed[:, None], rows[e], plain.to(rows.dtype))
            routing = Routing(int(token.numel()), row_weights, token if self.statistics == "all" else None)
            y = self._expert_output(expert, x, routing)
            if self.statistics == "all":
                y = y[token]
            if self.observe is not None:  # the output already carries the router's scale
                self.observe(self.name, e, torch.ones(len(token), dtype=y.dtype, device=y.device), y)
            out[e].index_copy_(0, token, y.to(out.dtype))
        return out.view(-1, layout.hidden)

    def _expert_output(self, expert: Expert, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        module, layout = self.module, self.layout
        x = _mark(x.view_as(x), routing)  # a fresh tensor object per expert: statistics are not shared
        act = getattr(module, "act_fn", None)
        if layout.has_gate:
            gate, up = expert.part("gate_proj")(x), expert.part("up_proj")(x)
            apply_gate = getattr(module, "_apply_gate", None)
            if apply_gate is not None:
                h = apply_gate(_join(gate, up, layout, -1))
            else:
                assert act is not None
                h = act(gate) * up
        else:
            assert act is not None
            h = act(expert.part("up_proj")(x))
        y = expert.part("down_proj")(_mark(h, routing))
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)  # type: ignore[operator]
        return y

    def refuse(self) -> None:
        """Rebuild the 3-D parameters from the experts' linears, in the original layout."""
        module, layout = self.module, self.layout
        if self.hook is not None:
            self.hook.remove()
        experts = self.experts()
        ups: list[torch.Tensor] = []
        downs: list[torch.Tensor] = []
        up_biases: list[torch.Tensor] = []
        down_biases: list[torch.Tensor] = []
        for expert in experts:
            up, down = expert.part("up_proj"), expert.part("down_proj")
            if layout.has_gate:
                gate = expert.part("gate_proj")
                ups.append(_join(gate.weight, up.weight, layout, 0))
                if gate.bias is not None and up.bias is not None:
                    up_biases.append(_join(gate.bias, up.bias, layout, 0))
            else:
                ups.append(up.weight)
                if up.bias is not None:
                    up_biases.append(up.bias)
            downs.append(down.weight)
            if down.bias is not None:
                down_biases.append(down.bias)
        stacked = {layout.up_name: torch.stack([u.T if layout.transposed else u for u in ups]),
                   "down_proj": torch.stack([d.T if layout.transposed else d for d in downs])}
        if layout.has_bias:
            stacked[layout.up_name + "_bias"] = torch.stack(up_biases)
            stacked["down_proj_bias"] = torch.stack(down_biases)
        del experts, ups, downs, up_biases, down_biases
        for name in self.names:  # the fused weights first: the experts' copies go only once they are back
            tensor = stacked.pop(name).detach().contiguous()
            module.register_parameter(name, nn.Parameter(tensor, requires_grad=self.requires_grad[name]))
        for e in range(layout.experts):
            delattr(module, str(e))
        del module.forward
        delattr(module, UNFUSED)


@contextlib.contextmanager
def unfused(block: nn.Module, statistics: ExpertStatistics = "routed",
            observe: Observer | None = None) -> Iterator[dict[str, Layout]]:
    """Inside the block, every fused expert container of ``block`` holds one :class:`Expert`
    per expert (named ``<container>.<e>.gate_proj`` and so on) and routes through them; on exit
    the fused parameters are rebuilt from them (changes included). ``observe`` is shown every
    expert's routed outputs. Yields {container: layout}."""
    if statistics not in EXPERT_STATISTICS:
        raise LlmpruneError(f"unknown expert statistics {statistics!r}; use one of {', '.join(EXPERT_STATISTICS)}")
    found = {name: layout for name, module in block.named_modules() if (layout := layout_of(module)) is not None}
    handles: list[_Unfused] = []
    try:
        for name, layout in found.items():
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            handles.append(_Unfused(name, block.get_submodule(name), layout, statistics, observe, parent))
        yield found
    finally:
        for handle in handles:
            handle.refuse()
