"""Wanda's input norms of every decoder linear, gathered while the model runs for another reason.

OWL's layer sparsities need each linear's input norms ‖X_j‖ on the *dense* model, so they cost a
pass of the dense layers over calibration text before the pruning starts (on a CPU about as long
as the sampling of the generated windows). When the default recipe has the dense model write
calibration windows anyway, every linear already runs on every token it reads while writing:
:class:`InputNorms` listens to those calls, and OWL reads its norms instead of making its own
pass (:func:`~llmprune.engine.driver.owl_allocation`).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn

from llmprune.core.stats import ColumnNorms
from llmprune.engine.experts import expert_containers
from llmprune.engine.model import find_decoder_layers, find_linears

Hook = Callable[[nn.Module, tuple[Any, ...]], None]


def plain_layers(layers: nn.ModuleList) -> bool:
    """No experts anywhere, fused or by name: every linear sees every token, as in OWL's own
    pass (a mixture of experts' statistics follow the routing options, which only that pass
    applies)."""
    return not any(expert_containers(layer) or any("expert" in name for name, _ in layer.named_modules())
                   for layer in layers)


class InputNorms:
    """While entered, accumulates ‖X_j‖² of the inputs of every linear in every decoder layer
    of ``model``. On leaving, :attr:`result` holds per layer each linear's ‖X_j‖ on the CPU (as
    OWL's pass computes them, :class:`~llmprune.core.stats.ColumnNorms`) and :attr:`tokens` the
    tokens counted; nothing of the model is kept. Entered once."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: nn.ModuleList | None = find_decoder_layers(model)[1]
        self.acc: list[dict[str, ColumnNorms]] = [{} for _ in self.layers]
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.first = next(iter(find_linears(self.layers[0])), "")  # counts the tokens
        self.tokens = 0
        self.result: list[dict[str, torch.Tensor]] = []

    def _hook(self, index: int, name: str) -> Hook:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            acc = self.acc[index].get(name)
            if acc is None:
                acc = self.acc[index][name] = ColumnNorms(x.shape[-1], x.device)
            acc.add(x)
            if index == 0 and name == self.first:
                self.tokens += x.numel() // x.shape[-1]
        return hook

    def __enter__(self) -> InputNorms:
        if self.layers is None:
            raise RuntimeError("InputNorms is entered once")
        try:
            for index, layer in enumerate(self.layers):
                for name, linear in find_linears(layer).items():
                    self.handles.append(linear.register_forward_pre_hook(self._hook(index, name)))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._remove()
        self.result = [{name: acc.value().cpu() for name, acc in layer.items()} for layer in self.acc]
        self.layers, self.acc = None, []  # the model and the device's accumulators are let go
