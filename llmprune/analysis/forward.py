"""The dense model run from a given decoder layer on, for analyses that change one layer at a
time: the inputs of the earlier layers are kept, only the changed layer and those after it run."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llmprune.engine.capture import LayerCall
from llmprune.engine.driver import compute_dtype, run_batches
from llmprune.engine.model import floating_dtypes, restore_dtypes
from llmprune.eval.perplexity import tail_nll


class Visit:
    """A decoder layer on ``device`` (in its compute dtype) for the ``with`` block, then back
    where it was, each tensor in its own dtype."""

    def __init__(self, layer: nn.Module, device: torch.device) -> None:
        self.layer, self.device = layer, device

    def __enter__(self) -> Visit:
        param = next(self.layer.parameters())
        self.home, self.dtypes = param.device, floating_dtypes(self.layer)
        compute = compute_dtype(self.device, param.dtype)
        # The checkpoint's dtype when computing in a wider one: pruned weights are rounded to it.
        self.storage = param.dtype if compute != param.dtype else None
        self.layer.to(self.device, dtype=compute) if compute != param.dtype else self.layer.to(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self.layer.to(self.home)
        restore_dtypes(self.layer, self.dtypes)


@torch.no_grad()
def advance(layer: nn.Module, hidden: Sequence[torch.Tensor], calls: Sequence[LayerCall],
            device: torch.device) -> list[torch.Tensor]:
    """One layer's outputs from its inputs (one tensor per batch, kept on the CPU)."""
    with Visit(layer, device):
        return list(run_batches(layer, hidden, calls, device, []))


@torch.no_grad()
def nll_from(model: nn.Module, layers_path: str, layers: nn.ModuleList, calls: Sequence[Sequence[LayerCall]],
             start: int, hidden: Sequence[torch.Tensor], batches: list[torch.Tensor], device: torch.device) -> float:
    """Σ next-token NLL over ``batches`` with ``hidden`` the inputs of layer ``start``: layers
    ``start`` to the last, then the model's own tail."""
    states = list(hidden)
    for index in range(start, len(layers) - 1):
        states = advance(layers[index], states, calls[index], device)
    last = layers[-1]
    dtypes = floating_dtypes(last)
    compute = compute_dtype(device, next(last.parameters()).dtype)
    if compute != next(last.parameters()).dtype:
        last.to(dtype=compute)
    try:
        return tail_nll(model, layers_path, layers, states, batches, device)
    finally:
        restore_dtypes(last, dtypes)
