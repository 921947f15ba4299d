"""Physically smaller model: slice the weights, rewrite the config, rebuild with stock classes.

The result is built by ``AutoModelForCausalLM.from_config`` from the rewritten config and gets
the sliced state dict, i.e. exactly what ``from_pretrained`` will build from the saved folder,
so the in-memory pruned model and the checkpoint cannot disagree. Widths stay uniform across
layers because a transformers config has one ``num_attention_heads``/``intermediate_size``
for all layers (non-uniform widths would need per-layer config fields and modeling code that
reads them, i.e. custom code, which llmprune does not ship).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmprune.engine.model import find_decoder_layers
from llmprune.errors import LlmpruneError
from llmprune.io.threads import MODEL_BUILD
from llmprune.structured.anatomy import LayerAnatomy, RowBlock, Widths


@dataclass
class Plan:
    """What survives. Per kept decoder layer (by original index): the query heads, KV heads and
    MLP channels kept (absent: all)."""

    layers: list[int]
    heads: dict[int, list[int]] = field(default_factory=dict)
    kv_heads: dict[int, list[int]] = field(default_factory=dict)
    channels: dict[int, list[int]] = field(default_factory=dict)


def _rows(blocks: list[RowBlock], units: list[int]) -> dict[str, list[int]]:
    """Row indices to keep per linear name, for the given unit indices of each block."""
    keep: dict[str, list[int]] = {}
    for block in blocks:
        rows = [block.offset + u * block.size + r for u in units for r in range(block.size)]
        keep.setdefault(block.name, []).extend(rows)
    return keep


def _counts(plan: Plan, widths: Widths) -> tuple[int, int, int | None]:
    """Uniform (heads, kv_heads, intermediate) after the plan; refuses non-uniform plans."""
    def one(values: set[int], what: str) -> int | None:
        if len(values) > 1:
            raise LlmpruneError(f"{what} differ between layers ({sorted(values)}): a config cannot express that")
        return values.pop() if values else None

    heads = one({len(plan.heads.get(i, range(widths.heads))) for i in plan.layers}, "head counts")
    kv = one({len(plan.kv_heads.get(i, range(widths.kv_heads))) for i in plan.layers}, "KV head counts")
    inter = one({len(plan.channels[i]) for i in plan.layers if i in plan.channels}, "MLP widths")
    heads = heads if heads is not None else widths.heads
    kv = kv if kv is not None else widths.kv_heads
    if heads == 0 or kv == 0 or heads % kv:
        raise LlmpruneError(f"{heads} query heads over {kv} KV heads is not a valid attention layout")
    if inter == 0:
        raise LlmpruneError("the plan removes every MLP channel")
    if not plan.layers:
        raise LlmpruneError("the plan removes every decoder layer")
    return heads, kv, inter if inter is not None else widths.intermediate


def rewrite_config(config: Any, plan: Plan, widths: Widths, n_layers: int) -> Any:
    """A copy of ``config`` (its text part, for multimodal configs) with the new widths."""
    new = copy.deepcopy(config)
    text = getattr(new, "text_config", None) or new
    heads, kv, inter = _counts(plan, widths)
    text.num_attention_heads = heads
    if hasattr(text, "num_key_value_heads"):
        text.num_key_value_heads = kv
    elif kv != heads:
        raise LlmpruneError(f"{type(text).__name__} has no num_key_value_heads; it cannot express {kv} KV heads")
    text.head_dim = widths.head_dim  # rotary and attention keep their width
    if inter is not None:
        text.intermediate_size = inter
    # Per-layer lists (Gemma 3's layer_types, ...) follow the layers that stay.
    for key, value in list(vars(text).items()):
        if isinstance(value, (list, tuple)) and len(value) == n_layers and key != "architectures":
            setattr(text, key, type(value)(value[i] for i in plan.layers))
    text.num_hidden_layers = len(plan.layers)
    for key, value in list(vars(text).items()):  # e.g. Qwen2's max_window_layers
        if key == "max_window_layers" and isinstance(value, int):
            setattr(text, key, sum(1 for i in plan.layers if i < value))
    return new


def _bias_flags(state: dict[str, torch.Tensor], prefix: str, anatomy: LayerAnatomy) -> dict[str, str]:
    """Config flags to switch on so the rebuilt model has the biases the state carries (FLAP's
    compensation gives o_proj/down_proj a bias they may not have had)."""
    flags = {}
    for name, flag in ((anatomy.o, "attention_bias"), (anatomy.down, "mlp_bias")):
        if name and any(k.startswith(prefix) and k.endswith(f".{name}.bias") for k in state):
            flags[flag] = name
    return flags


def shrink(model: nn.Module, plan: Plan, anatomy: LayerAnatomy) -> nn.Module:
    """A new, physically smaller model following ``plan``. ``model`` is left as it is, and shares
    its unsliced tensors with the new one: drop it (or copy the new model) before changing
    either in place."""
    from transformers import AutoModelForCausalLM

    layers_path, layers = find_decoder_layers(model)
    widths = anatomy.widths
    config = rewrite_config(model.config, plan, widths, len(layers))
    text = getattr(config, "text_config", None) or config
    dtype = next(model.parameters()).dtype
    state = model.state_dict()
    for flag, linear in _bias_flags(state, layers_path + ".", anatomy).items():
        if not hasattr(text, flag):
            raise LlmpruneError(f"{type(text).__name__} cannot take a bias on {linear} (no {flag} option)")
        setattr(text, flag, True)
    new_state: dict[str, torch.Tensor] = {}
    prefix = layers_path + "."
    for key, value in state.items():
        if not key.startswith(prefix):
            new_state[key] = value
    for new_index, old_index in enumerate(plan.layers):
        old_prefix, new_prefix = f"{prefix}{old_index}.", f"{prefix}{new_index}."
        row_keep: dict[str, list[int]] = {}
        col_keep: dict[str, list[int]] = {}
        if old_index in plan.heads or old_index in plan.kv_heads:
            heads = sorted(plan.heads.get(old_index, range(widths.heads)))
            kv_heads = sorted(plan.kv_heads.get(old_index, range(widths.kv_heads)))
            for name, rows in _rows(anatomy.q_rows, heads).items():
                row_keep.setdefault(name, []).extend(rows)
            for name, rows in _rows(anatomy.kv_rows, kv_heads).items():
                row_keep.setdefault(name, []).extend(rows)
            col_keep[anatomy.o] = [h * widths.head_dim + r for h in heads for r in range(widths.head_dim)]
        if old_index in plan.channels:
            channels = sorted(plan.channels[old_index])
            for name, rows in _rows(anatomy.channel_rows, channels).items():
                row_keep.setdefault(name, []).extend(rows)
            col_keep[anatomy.down] = list(channels)
        for key, value in state.items():
            if not key.startswith(old_prefix):
                continue
            rest = key[len(old_prefix):]
            module, _, kind = rest.rpartition(".")
            if module in row_keep:
                value = value.index_select(0, torch.tensor(sorted(row_keep[module])))
            if module in col_keep and kind == "weight":
                value = value.index_select(1, torch.tensor(col_keep[module]))
            new_state[new_prefix + rest] = value

    # Built on the meta device (thread-local, unlike accelerate's init_empty_weights, which
    # patches torch for the whole process) and given the sliced tensors themselves: no second
    # full model is allocated and randomly initialised, and the tensors left unsliced
    # (embeddings, norms, the head) are shared with ``model``.
    with MODEL_BUILD, torch.device("meta"):
        new_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = new_model.state_dict()
    for key, value in expected.items():  # biases switched on by a flag start at zero
        if key not in new_state and key.endswith(".bias"):
            new_state[key] = torch.zeros(value.shape, dtype=value.dtype)
    for key, value in new_state.items():  # the new model's dtypes, as a copy into it would give
        if key in expected and value.dtype != expected[key].dtype:
            new_state[key] = value.to(expected[key].dtype)
    _copy_buffers(new_model, model, prefix, plan)
    mismatched = [k for k, v in new_state.items() if k in expected and expected[k].shape != v.shape]
    if mismatched:
        raise LlmpruneError(
            f"{type(new_model).__name__} built from the rewritten config does not take the sliced weights "
            f"({mismatched[0]}: {tuple(expected[mismatched[0]].shape)} vs {tuple(new_state[mismatched[0]].shape)}); "
            "its config cannot express this structure"
        )
    new_model.load_state_dict(new_state, strict=True, assign=True)
    new_model.tie_weights()
    new_model.eval()
    if hasattr(model, "generation_config") and model.generation_config is not None:
        new_model.generation_config = copy.deepcopy(model.generation_config)
    return new_model


def _copy_buffers(new_model: nn.Module, model: nn.Module, prefix: str, plan: Plan) -> None:
    """The buffers the state dict does not hold (rotary frequencies), from ``model``: a model
    built on the meta device has them on the meta device too. Layer ``i`` of the new model is
    layer ``plan.layers[i]`` of the old one."""
    persistent = set(new_model.state_dict())
    for name, buffer in list(new_model.named_buffers()):
        if name in persistent or buffer.device.type != "meta":
            continue
        old = name
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            old = f"{prefix}{plan.layers[int(index)]}.{rest}"
        try:
            source = model.get_buffer(old)
        except AttributeError:
            source = None
        if source is None or source.shape != buffer.shape:
            raise LlmpruneError(f"cannot rebuild buffer {name} of the smaller {type(new_model).__name__}")
        owner, _, leaf = name.rpartition(".")
        new_model.get_submodule(owner).register_buffer(leaf, source.clone(), persistent=False)
