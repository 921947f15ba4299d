"""Pruning methods: pure functions ``prune(W, stats, options) -> Result`` plus ``needs(options)``,
the statistics they use. New methods register here; the driver never names one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmprune.core.patterns import Group
from llmprune.errors import LlmpruneError
from llmprune.methods import magnitude, sparsegpt, wanda
from llmprune.methods.base import COLUMN_NORMS, HESSIAN, Options, Result, Stats


@dataclass(frozen=True)
class Method:
    name: str
    needs: Callable[[Options], set[str]]
    # Derived statistics computed once per shared input (e.g. the factor of H⁻¹).
    prepare: Callable[[Stats, Options], Stats]
    prune: Callable[[torch.Tensor, Stats, Options], Result]
    default_group: Group  # comparison group of unstructured masks in the reference implementation
    always_updates: bool = False  # the OBS update is part of the method


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", magnitude.needs, magnitude.prepare_stats, magnitude.prune, "layer"),
    "wanda": Method("wanda", wanda.needs, wanda.prepare_stats, wanda.prune, "row"),
    "sparsegpt": Method(
        "sparsegpt", sparsegpt.needs, sparsegpt.prepare_stats, sparsegpt.prune, "layer", always_updates=True
    ),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise LlmpruneError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


__all__ = ["COLUMN_NORMS", "HESSIAN", "METHODS", "Method", "Options", "Result", "get_method"]
