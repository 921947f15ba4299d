"""Which rows and columns of a decoder layer's linears make up one attention head or one MLP
channel, read from the module names and checked against the config's widths.

Structured pruning removes a query head as rows [h·d, (h+1)·d) of q (and, with its KV head, the
same rows of k and v) plus the matching input columns of o; an MLP channel j as row j of gate
and up plus input column j of down. Fused projections (Phi-3's ``qkv_proj`` = [q; k; v] and
``gate_up_proj`` = [gate; up]) hold several of those row ranges. Roles are recognised by the
usual projection names and every width is verified, so an unfamiliar layout fails with a clear
error instead of being sliced wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from llmprune.engine.model import find_linears, get_weight
from llmprune.errors import LlmpruneError

# Leaf names of each role, as used by the Llama family, Qwen2, Mistral, Gemma 3, Phi-3 and others.
ROLE_NAMES = {
    "q": ("q_proj",),
    "k": ("k_proj",),
    "v": ("v_proj",),
    "qkv": ("qkv_proj",),
    "o": ("o_proj",),
    "gate": ("gate_proj",),
    "up": ("up_proj",),
    "gate_up": ("gate_up_proj",),
    "down": ("down_proj",),
}


@dataclass
class Widths:
    """The config's view of a decoder layer: what a rewritten config must express."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int | None
    hidden: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads


def widths_of(config: Any) -> Widths:
    """Head counts, head_dim and MLP width from a transformers config (text part for multimodal)."""
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(heads, int) or not isinstance(hidden, int):
        raise LlmpruneError(
            f"{type(config).__name__} has no num_attention_heads/hidden_size: structured pruning cannot "
            "express a smaller model in this config"
        )
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return Widths(heads, kv_heads, head_dim, getattr(config, "intermediate_size", None), hidden)


@dataclass
class RowBlock:
    """Rows [offset, offset + count · size) of a linear, ``count`` units of ``size`` rows each."""

    name: str
    offset: int
    size: int


@dataclass
class LayerAnatomy:
    """Where each head and channel lives in one decoder layer (names relative to the layer)."""

    widths: Widths
    q_rows: list[RowBlock] = field(default_factory=list)  # one block per query-head-indexed range
    kv_rows: list[RowBlock] = field(default_factory=list)  # k and v ranges, indexed by KV head
    o: str = ""
    channel_rows: list[RowBlock] = field(default_factory=list)  # gate and up ranges
    down: str = ""


def _roles(layer: nn.Module) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in find_linears(layer):
        leaf = name.rsplit(".", 1)[-1]
        for role, leaves in ROLE_NAMES.items():
            if leaf in leaves:
                if role in found:
                    raise LlmpruneError(f"two {role} projections in one decoder layer: {found[role]}, {name}")
                found[role] = name
    return found


def inspect_layer(layer: nn.Module, widths: Widths, need_attention: bool, need_mlp: bool) -> LayerAnatomy:
    """The anatomy of ``layer``; raises LlmpruneError if the needed roles or widths do not match."""
    roles = _roles(layer)
    linears = find_linears(layer)
    found = ", ".join(sorted(linears)) or "none"
    anatomy = LayerAnatomy(widths)

    def shape(role: str) -> tuple[int, int]:
        out, inp = get_weight(linears[roles[role]]).shape
        return int(out), int(inp)

    def expect(role: str, out: int | None, inp: int | None) -> None:
        got = shape(role)
        if (out is not None and got[0] != out) or (inp is not None and got[1] != inp):
            raise LlmpruneError(
                f"{roles[role]} has shape (out={got[0]}, in={got[1]}), but the config implies "
                f"(out={out}, in={inp}); structured pruning cannot slice this layer safely"
            )

    w = widths
    if need_attention:
        if w.heads % w.kv_heads:
            raise LlmpruneError(f"{w.heads} attention heads are not a multiple of {w.kv_heads} KV heads")
        q_width, kv_width = w.heads * w.head_dim, w.kv_heads * w.head_dim
        if {"q", "k", "v", "o"} <= roles.keys():
            expect("q", q_width, w.hidden)
            expect("k", kv_width, w.hidden)
            expect("v", kv_width, w.hidden)
            anatomy.q_rows = [RowBlock(roles["q"], 0, w.head_dim)]
            anatomy.kv_rows = [RowBlock(roles["k"], 0, w.head_dim), RowBlock(roles["v"], 0, w.head_dim)]
        elif {"qkv", "o"} <= roles.keys():
            expect("qkv", q_width + 2 * kv_width, w.hidden)
            anatomy.q_rows = [RowBlock(roles["qkv"], 0, w.head_dim)]
            anatomy.kv_rows = [RowBlock(roles["qkv"], q_width, w.head_dim),
                               RowBlock(roles["qkv"], q_width + kv_width, w.head_dim)]
        else:
            raise LlmpruneError(
                f"cannot find the attention projections (q/k/v or qkv, and o) among this layer's linears: {found}"
            )
        expect("o", w.hidden, q_width)
        anatomy.o = roles["o"]
    if need_mlp:
        if w.intermediate is None:
            raise LlmpruneError("the config has no intermediate_size: MLP channels cannot be expressed")
        if {"gate", "up", "down"} <= roles.keys():
            expect("gate", w.intermediate, w.hidden)
            expect("up", w.intermediate, w.hidden)
            anatomy.channel_rows = [RowBlock(roles["gate"], 0, 1), RowBlock(roles["up"], 0, 1)]
        elif {"gate_up", "down"} <= roles.keys():
            expect("gate_up", 2 * w.intermediate, w.hidden)
            anatomy.channel_rows = [RowBlock(roles["gate_up"], 0, 1),
                                    RowBlock(roles["gate_up"], w.intermediate, 1)]
        else:
            raise LlmpruneError(
                f"cannot find the MLP projections (gate/up or gate_up, and down) among this layer's linears: {found}"
            )
        expect("down", w.hidden, w.intermediate)
        anatomy.down = roles["down"]
    return anatomy
