"""The dense model's inputs at each linear of a decoder layer, kept batch by batch, so that a
pruned linear's statistics can pair its inputs with the dense model's token for token (the
refit toward the dense model's outputs, ``model_target``: :data:`~llmprune.methods.base.CROSS`).

The layer runs once, still dense, on the dense model's own activations; that same run gives the
dense model's activations at the next layer, so the stream costs one forward per layer. What it
holds: every linear input of one layer for every calibration token (linears fed one tensor,
q/k/v or gate/up, share one copy), about (3·hidden + intermediate) values a token for a Llama
layer.

The dense pass runs in the precision of the pruning's calibration passes (``pass_dtype``,
:mod:`llmprune.engine.precision`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from llmprune.engine.capture import LayerCall
from llmprune.engine.model import find_linears
from llmprune.engine.precision import calibration_pass


class DenseInputs:
    """Per batch, the dense model's input at each linear (by name within the layer), on the CPU."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def of(self, name: str, index: int) -> torch.Tensor:
        return self.batches[index][name]


@torch.no_grad()
def dense_linear_inputs(layer: nn.Module, hidden: Sequence[torch.Tensor], calls: Sequence[LayerCall],
                        device: torch.device, dtype: torch.dtype = torch.float32,
                        ) -> tuple[list[torch.Tensor], DenseInputs]:
    """Run ``layer`` (not yet pruned) on the dense model's activations ``hidden``: its outputs
    per batch (the dense model's activations at the next layer, on the CPU, in ``hidden``'s
    dtype) and each linear's inputs on the way, in the pass precision ``dtype`` (each input kept
    in the precision the linear received it: a norm's output stays float32)."""
    current: dict[str, torch.Tensor] = {}
    shared: list[tuple[weakref.ref[torch.Tensor], torch.Tensor]] = []

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            # By identity, through a weak reference: q/k/v read one tensor, stored once.
            kept = next((copy for ref, copy in shared if ref() is x), None)
            if kept is None:
                kept = x.detach().to("cpu", copy=True)
                shared.append((weakref.ref(x), kept))
            current[name] = kept

        return pre_hook

    handles = [linear.register_forward_pre_hook(hook(name)) for name, linear in find_linears(layer).items()]
    outputs: list[torch.Tensor] = []
    batches: list[dict[str, torch.Tensor]] = []
    try:
        for state, call in zip(hidden, calls, strict=True):
            current, shared[:] = {}, []
            with calibration_pass(layer, device, dtype):
                output = call.run(layer, state.to(device), device)
            outputs.append(output.to("cpu", dtype=state.dtype))
            batches.append(current)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, DenseInputs(batches)
