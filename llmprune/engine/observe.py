"""Wanda's input norms of every decoder linear, gathered while the model runs for another reason.

OWL's layer sparsities need each linear's input norms ‖X_j‖ on the *dense* model, so they cost a
pass of the dense layers over calibration text before the pruning starts (on a CPU about as long
as the sampling of the generated windows). When the default recipe has the dense model write
calibration windows anyway, every linear already runs on every token it writes:
:class:`InputNorms` listens to those calls, and OWL reads its norms instead of making its own
pass (:func:`~llmprune.engine.driver.owl_allocation`).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import nn

from llmprune.core.stats import ColumnNorms
from llmprune.engine.model import find_decoder_layers, find_linears


def plain_layers(layers: nn.ModuleList) -> bool:
    """No experts anywhere: every linear sees every token, as in OWL's own pass (a mixture of
    experts' statistics follow the routing options, which only that pass applies)."""
    return not any("expert" in name for layer in layers for name, _ in layer.named_modules())


class InputNorms:
    """While entered, accumulates ‖X_j‖² of the inputs of every linear in every decoder layer
    of ``model``. :meth:`norms` gives, per layer, each linear's ‖X_j‖ (as OWL's pass computes
    them, :class:`~llmprune.core.stats.ColumnNorms`), and ``tokens`` the tokens counted."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = find_decoder_layers(model)[1]
        self.acc: list[dict[str, ColumnNorms]] = [{} for _ in self.layers]
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.tokens = 0

    def _hook(self, index: int, name: str) -> Any:
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
        self.first = next(iter(find_linears(self.layers[0])), "")
        for index, layer in enumerate(self.layers):
            for name, linear in find_linears(layer).items():
                self.handles.append(linear.register_forward_pre_hook(self._hook(index, name)))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def norms(self) -> list[dict[str, torch.Tensor]]:
        return [{name: acc.value().cpu() for name, acc in layer.items()} for layer in self.acc]
