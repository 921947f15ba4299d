"""Capture what every decoder layer is called with, without running the layers.

transformers 5.x hands each decoder layer more than hidden states: ``position_embeddings``,
per-layer attention masks (sliding-window vs full in Gemma 3), position ids. Keeping only
``attention_mask`` (as the reference implementations do) silently breaks such models, so every
positional and keyword argument of every layer is recorded, for every calibration batch.

The layers' ``forward`` is temporarily replaced by a recorder that passes the hidden states
through unchanged, so the model's own loop builds each layer's arguments at almost no cost;
the last layer raises :class:`StopForward` so the final norm and ``lm_head`` never run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a forward pass to end it early once the needed tensors are recorded."""


@dataclass
class LayerCall:
    """The arguments of one decoder-layer call, minus the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_as_kwarg: bool

    def run(self, layer: nn.Module, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The layer's output for ``hidden``. Inputs are cast to the layer's precision (which may be
        a wider compute dtype); the output keeps ``hidden``'s, the model's own between layers."""
        dtype = next(layer.parameters()).dtype
        args, kwargs = to_device((self.args, self.kwargs), device, dtype)
        state = hidden.to(device=device, dtype=dtype)
        if self.hidden_as_kwarg:
            out = layer(*args, hidden_states=state, **kwargs)
        else:
            out = layer(state, *args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.to(hidden.dtype)


def to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device`` (floating ones also to
    ``dtype`` when given)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(item, device, dtype) for item in obj)
    if isinstance(obj, list):
        return [to_device(item, device, dtype) for item in obj]
    if isinstance(obj, dict):
        return {key: to_device(value, device, dtype) for key, value in obj.items()}
    return obj


def _split_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, LayerCall]:
    cpu = torch.device("cpu")
    kwargs = dict(kwargs)
    if args:
        return args[0], LayerCall(to_device(tuple(args[1:]), cpu), to_device(kwargs, cpu), False)
    state = kwargs.pop("hidden_states")
    return state, LayerCall((), to_device(kwargs, cpu), True)


@torch.no_grad()
def capture_layer_calls(
    model: nn.Module, layers: nn.ModuleList | Sequence[nn.Module], batches: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """Run the model's front end on each batch of token ids.

    Returns the hidden states entering layer 0 (one tensor per batch, on the CPU) and
    ``calls[layer][batch]``, the remaining arguments of each layer call.
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in layers]
    saved = [layer.__dict__.get("forward") for layer in layers]

    def recorder(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            state, call = _split_hidden(args, kwargs)
            if index == 0:
                hidden.append(state.detach().to("cpu"))
            calls[index].append(call)
            if index == len(layers) - 1:
                raise StopForward
            return state

        return forward

    try:
        for index, layer in enumerate(layers):
            layer.forward = recorder(index)
        device = next(model.parameters()).device
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for layer, original in zip(layers, saved, strict=True):
            if original is None:
                del layer.forward
            else:
                layer.forward = original
    return hidden, calls
